"""Span alignment of two tokenizations of one text (docs/method.md, "Span alignment and chunks").

    from xtoken_nemo.align import align_text, align_ids
    aligned = align_text("Hundreds of 2024 cats", load_tokenizer("llama3"), load_tokenizer("qwen3"))
    aligned.alignment.matched_chunks()   # [K, 4] (s_start, s_end, t_start, t_end)
    aligned.records()                    # [{"student": [0, 1], "teacher": [0, 0], "text": ""}, ...]

Exact (linear, from byte/character positions) is the default; the Needleman-Wunsch DP is the
fallback for ids whose decoded texts differ. See :mod:`xtoken_nemo.align.alignment` for the chunk
representation (gaps included, cumulative ends on both sides).
"""

from xtoken_nemo.align.alignment import Alignment, identity_alignment
from xtoken_nemo.align.api import METHODS, AlignedText, align_dp_ids, align_ids, align_text, check_alignment
from xtoken_nemo.align.dp import align_pieces
from xtoken_nemo.align.exact import AlignmentError, align_bytes, align_offsets, align_positions, surface_table

__all__ = [
    "METHODS",
    "AlignedText",
    "Alignment",
    "AlignmentError",
    "align_bytes",
    "align_dp_ids",
    "align_ids",
    "align_offsets",
    "align_pieces",
    "align_positions",
    "align_text",
    "check_alignment",
    "identity_alignment",
    "surface_table",
]
