"""Builds W from the two tokenizers alone (docs/method.md, "The projection matrix W").

Pass 1: W[s, t] = 1 where the canonical forms are equal (special tokens by role).
Pass 2: a student token without an exact match is tokenized by the teacher as mid-text; n <= 4
pieces t_0..t_{n-1} get W[s, t_i] += beta * gamma^i. Each row keeps its 4 largest entries and is
normalized to sum to 1.

Our choices where the method is silent:
- Rows whose text needs more than ``max_pieces`` teacher pieces: ``long_rows="zero"`` (the
  paper: the row stays 0) or ``"truncate"`` (keep the first ``max_pieces`` pieces). Counted
  either way.
- Byte-level student tokens that are not valid UTF-8 (a fragment of a multi-byte character)
  have no text to tokenize: their bytes are split into teacher tokens by greedy longest match
  over the teacher's surfaces, then weighted like pass 2. Counted as ``byte_rows``.
- A piece repeated in one row (e.g. "...." -> "..", "..") accumulates its weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import xtoken_nemo
from xtoken_nemo.errors import ProjectionMatrixError
from xtoken_nemo.tokenizers.base import Tokenizer
from xtoken_nemo.vocab.canonical import exact_matches, surface_index
from xtoken_nemo.vocab.projection import ProjectionMatrix

log = logging.getLogger(__name__)

LONG_ROW_POLICIES = ("zero", "truncate")


@dataclass
class BuildConfig:
    beta: float = 0.9
    gamma: float = 0.1
    max_pieces: int = 4
    top_k: int = 4
    long_rows: str = "zero"
    batch_size: int = 8192

    def validate(self) -> None:
        if self.long_rows not in LONG_ROW_POLICIES:
            raise ProjectionMatrixError(f"long_rows must be one of {LONG_ROW_POLICIES}, got '{self.long_rows}'")
        if not (0 < self.gamma and 0 < self.beta):
            raise ProjectionMatrixError("beta and gamma must be positive")
        if self.max_pieces < 1 or self.top_k < 1:
            raise ProjectionMatrixError("max_pieces and top_k must be at least 1")


def piece_weights(pieces: list[int], config: BuildConfig) -> dict[int, float]:
    """{teacher id: weight} for one row from its teacher pieces, before top-k/normalization."""
    weights: dict[int, float] = {}
    for i, tid in enumerate(pieces[: config.max_pieces]):
        weights[tid] = weights.get(tid, 0.0) + config.beta * config.gamma**i
    return weights


def greedy_byte_pieces(data: bytes, teacher_index: dict[bytes, int], max_len: int) -> list[int] | None:
    """Split bytes into teacher tokens by greedy longest match; None if some byte has no token."""
    pieces, pos = [], 0
    while pos < len(data):
        for length in range(min(max_len, len(data) - pos), 0, -1):
            tid = teacher_index.get(data[pos : pos + length])
            if tid is not None:
                pieces.append(tid)
                pos += length
                break
        else:
            return None
    return pieces


def pair_metadata(student: Tokenizer, teacher: Tokenizer) -> dict[str, str]:
    """What a file built from two tokenizers records about them (W, the prefix support): names,
    fingerprints (checked when the file is loaded) and the version that wrote it."""
    return {
        "student_name": student.name,
        "teacher_name": teacher.name,
        "student_fingerprint": student.fingerprint,
        "teacher_fingerprint": teacher.fingerprint,
        "xtoken_nemo_version": xtoken_nemo.__version__,
    }


def teacher_pieces(
    student: Tokenizer,
    teacher: Tokenizer,
    skip: Collection[int] = (),
    batch_size: int = 8192,
    progress: bool = True,
) -> tuple[dict[int, list[int]], int]:
    """({student id: teacher ids}, number of byte rows) for every ordinary student token not in
    ``skip``: its text as the teacher tokenizes it mid-text, or for a byte-level token that is not
    valid UTF-8, its bytes split by greedy longest match over the teacher's surfaces (omitted when
    some byte has no teacher token). Empty tokens and tokens without a surface are omitted.
    W's pass 2 and the prefix support of J-KL (``vocab/prefix_support.py``) both read this."""
    texts: list[str] = []
    text_rows: list[int] = []
    byte_rows: list[int] = []
    for sid, surface in enumerate(student.surfaces):
        if surface is None or sid in skip or not surface:
            continue
        try:
            texts.append(surface.decode("utf-8"))
            text_rows.append(sid)
        except UnicodeDecodeError:
            byte_rows.append(sid)

    pieces_by_row: dict[int, list[int]] = {}
    bar = tqdm(
        total=len(texts), desc=f"pieces {student.name}->{teacher.name}", unit="tok", disable=not progress, leave=False
    )
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        for sid, pieces in zip(text_rows[start : start + batch_size], teacher.encode_batch(batch)):
            pieces_by_row[sid] = pieces
        bar.update(len(batch))
    bar.close()

    teacher_index = surface_index(teacher)
    max_len = max((len(s) for s in teacher_index), default=1)
    byte_rows_filled = 0
    for sid in byte_rows:
        pieces = greedy_byte_pieces(student.surfaces[sid], teacher_index, max_len)
        if pieces is not None:
            pieces_by_row[sid] = pieces
            byte_rows_filled += 1
    return pieces_by_row, byte_rows_filled


def build_projection_matrix(
    student: Tokenizer,
    teacher: Tokenizer,
    config: BuildConfig | None = None,
    progress: bool = True,
) -> ProjectionMatrix:
    """W [student.vocab_size, teacher.vocab_size], rows on the simplex or zero."""
    config = config or BuildConfig()
    config.validate()
    started = time.perf_counter()
    num_rows, slots = student.vocab_size, config.top_k
    indices = torch.full((num_rows, slots), -1, dtype=torch.int64)
    values = torch.zeros((num_rows, slots), dtype=torch.float32)

    matches = exact_matches(student, teacher)
    for sid, tid in matches.pairs():
        indices[sid, 0], values[sid, 0] = tid, 1.0

    # Pass 2: ordinary tokens with no exact match, as the teacher tokenizes them.
    pieces_by_row, byte_rows_filled = teacher_pieces(
        student, teacher, skip=matches.ordinary, batch_size=config.batch_size, progress=progress
    )

    by_piece_count: dict[int, int] = {}
    long_rows = 0
    for sid, pieces in pieces_by_row.items():
        n = len(pieces)
        if n == 0:
            continue
        if n > config.max_pieces:
            long_rows += 1
            if config.long_rows == "zero":
                continue
        weights = sorted(piece_weights(pieces, config).items(), key=lambda kv: -kv[1])[:slots]
        total = sum(w for _, w in weights)
        for slot, (tid, w) in enumerate(weights):
            indices[sid, slot], values[sid, slot] = tid, w / total
        by_piece_count[n] = by_piece_count.get(n, 0) + 1

    unused_rows = sum(1 for sid, s in enumerate(student.surfaces) if s is None and sid not in student.special_tokens)
    row_nnz = (indices >= 0).sum(dim=1)
    stats = {
        "exact_rows": len(matches.ordinary),
        "special_rows": len(matches.special),
        "multi_token_rows": {str(k): v for k, v in sorted(by_piece_count.items()) if k > 1},
        "single_piece_rows": by_piece_count.get(1, 0),
        "byte_rows": byte_rows_filled,
        "long_rows": long_rows,
        "long_rows_policy": config.long_rows,
        "zero_rows": int((row_nnz == 0).sum()),
        "unused_rows": unused_rows,
        "unmatched_special_rows": len([s for s in student.special_tokens if s not in matches.special]),
        "nnz": int(row_nnz.sum()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    metadata = {
        **pair_metadata(student, teacher),
        "student_vocab_size": str(student.vocab_size),
        "teacher_vocab_size": str(teacher.vocab_size),
        "builder": json.dumps(asdict(config), sort_keys=True),
        "stats": json.dumps(stats, sort_keys=True),
    }
    log.info("built W %s -> %s: %s", student.name, teacher.name, stats)
    return ProjectionMatrix(indices, values, teacher.vocab_size, metadata)
