"""Entry points: align two tokenizations from text or from ids, choosing the path.

``method``:
- ``"auto"`` (default): exact on bytes when both sides' surfaces concatenate to the same bytes
  (byte-level BPE, tiktoken), exact on character offsets when a text with offsets is given
  (SentencePiece, normalizers), DP otherwise (ids only and the decoded texts differ).
- ``"exact"``: as auto but never DP; raises :class:`AlignmentError` if it would be needed.
- ``"dp"``: always the Needleman-Wunsch fallback on the decoded pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xtoken_nemo.align.alignment import Alignment
from xtoken_nemo.align.dp import align_pieces
from xtoken_nemo.align.exact import AlignmentError, align_bytes, align_offsets, surface_table

METHODS = ("auto", "exact", "dp")


@dataclass(frozen=True)
class AlignedText:
    """Both tokenizations of one text and their alignment; ``source`` is what spans index."""

    student_ids: list[int]
    teacher_ids: list[int]
    alignment: Alignment
    source: str | bytes

    def records(self) -> list[dict]:
        return self.alignment.to_records(self.source)


def align_dp_ids(s_ids, t_ids, student, teacher, **scores) -> tuple[Alignment, bytes]:
    """DP alignment of two id sequences on their surface pieces; returns it and the student bytes."""
    s_tab, t_tab = surface_table(student), surface_table(teacher)
    s_ids, t_ids = [int(i) for i in s_ids], [int(i) for i in t_ids]
    s_pieces = [None if s_tab.special[i] else s_tab.pieces[i] for i in s_ids]
    t_pieces = [None if t_tab.special[i] else t_tab.pieces[i] for i in t_ids]
    s_keys = [s_tab.key(i) if s_tab.special[i] else None for i in s_ids]
    t_keys = [t_tab.key(i) if t_tab.special[i] else None for i in t_ids]
    return align_pieces(s_pieces, t_pieces, s_keys, t_keys, **scores), s_tab.concat(s_ids)


def align_ids(
    s_ids,
    t_ids,
    student,
    teacher,
    method: str = "auto",
    text: str | None = None,
    s_offsets=None,
    t_offsets=None,
) -> tuple[Alignment, str | bytes]:
    """Align two id sequences of the same text. Returns the alignment and the source its
    spans index (bytes for the byte and DP paths, the text for the offsets path).

    s_ids: [n] student ids; t_ids: [m] teacher ids; offsets: [n, 2] / [m, 2] character offsets
    into ``text`` (``Encoding.offsets``), needed only when the surfaces do not reproduce the text.
    """
    if method not in METHODS:
        raise AlignmentError(f"unknown alignment method '{method}'; choose one of {', '.join(METHODS)}")
    if method != "dp":
        s_tab, t_tab = surface_table(student), surface_table(teacher)
        s_bytes, t_bytes = s_tab.concat(s_ids), t_tab.concat(t_ids)
        if s_bytes == t_bytes:
            return align_bytes(s_ids, t_ids, student, teacher), s_bytes
        if text is not None and s_offsets is not None and t_offsets is not None:
            return align_offsets(s_ids, s_offsets, t_ids, t_offsets, student, teacher), text
        if method == "exact":
            raise AlignmentError(
                f"the texts of the {student.name} and {teacher.name} tokenizations differ "
                f"({len(s_bytes)} vs {len(t_bytes)} bytes) and no character offsets were given; "
                "pass the text with offsets (align_text) or use method='dp'"
            )
    return align_dp_ids(s_ids, t_ids, student, teacher)


def align_text(
    text: str,
    student,
    teacher,
    method: str = "auto",
    add_bos: bool | None = None,
    add_eos: bool = False,
    teacher_add_bos: bool | None = None,
) -> AlignedText:
    """Tokenize ``text`` with both tokenizers (with offsets) and align.

    ``add_bos=None`` uses each family's convention (Llama-3 prepends ``<|begin_of_text|>``,
    Qwen3 and Phi-4-mini add nothing); ``teacher_add_bos`` defaults to ``add_bos``.
    """
    teacher_add_bos = add_bos if teacher_add_bos is None else teacher_add_bos
    s_enc = student.encode(text, add_bos=add_bos, add_eos=add_eos)
    t_enc = teacher.encode(text, add_bos=teacher_add_bos, add_eos=add_eos)
    alignment, source = align_ids(s_enc.ids, t_enc.ids, student, teacher, method, text, s_enc.offsets, t_enc.offsets)
    return AlignedText(list(s_enc.ids), list(t_enc.ids), alignment, source)


def check_alignment(alignment: Alignment, n_student: int, n_teacher: int) -> None:
    """Raise if the chunks do not cover exactly ``n_student`` / ``n_teacher`` tokens in order."""
    s, t = alignment.student_ends, alignment.teacher_ends
    ok = (len(alignment) == 0 and n_student == 0 and n_teacher == 0) or (
        len(alignment) > 0
        and int(s[-1]) == n_student
        and int(t[-1]) == n_teacher
        and bool(np.all(np.diff(np.concatenate(([0], s))) >= 0))
        and bool(np.all(np.diff(np.concatenate(([0], t))) >= 0))
        and bool(np.all((np.diff(np.concatenate(([0], s))) + np.diff(np.concatenate(([0], t)))) > 0))
    )
    if not ok:
        raise AlignmentError(
            f"alignment does not cover the sequences: {len(alignment)} chunks ending at "
            f"({alignment.num_student_tokens}, {alignment.num_teacher_tokens}) for {n_student} student "
            f"and {n_teacher} teacher tokens"
        )
