"""The alignment of two tokenizations of one text: a monotone partition into chunk pairs.

Representation (the same in memory and on disk):

- chunk ``k`` covers student tokens ``[student_ends[k-1], student_ends[k])`` and teacher tokens
  ``[teacher_ends[k-1], teacher_ends[k])`` (``ends[-1]`` is 0). The chunks cover *every* token of
  both sides in order, so nothing can be mis-grouped: a token is in exactly one chunk.
- a **matched** chunk has tokens on both sides whose texts are the same substring (or, for a
  special-token pair, the same role: BOS<->BOS, EOS<->EOS).
- a **gap** chunk has an empty span on one side: a token with no counterpart (Llama-3's
  ``<|begin_of_text|>`` against Qwen3, which adds none). Gaps are kept in the alignment (so the
  boundaries stay exact) but are not part of the loss: :meth:`Alignment.matched_chunks` leaves
  them out.
- the DP fallback may also produce **mismatch** chunks (1 token against 1 token, different
  text), flagged in ``mismatch``; they are not matched chunks either.

On disk a document's alignment is the interleaved int32 array
``[s_end_0, t_end_0, s_end_1, t_end_1, ...]`` (:meth:`interleaved` / :meth:`from_interleaved`).
What the chunk-merge modes of the loss (chain / logmean / first) need is exactly the per-chunk
start/end token index on each side: :meth:`matched_chunks` -> ``[K, 4]`` rows
``(s_start, s_end, t_start, t_end)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """Chunk pairs of a student and a teacher token sequence.

    student_ends: [K] cumulative student token index at the end of each chunk.
    teacher_ends: [K] cumulative teacher token index at the end of each chunk.
    spans:        [K, 2] text span of each chunk in ``unit`` positions of the aligned source
                  (bytes of the UTF-8 text for the byte path, characters for the offsets path,
                  bytes of the student's decoded pieces for the DP path); None if unknown.
    mismatch:     [K] bool, chunks the DP paired although their texts differ.
    """

    student_ends: np.ndarray
    teacher_ends: np.ndarray
    spans: np.ndarray | None = None
    unit: str = "byte"
    method: str = "exact"
    mismatch: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "student_ends", np.asarray(self.student_ends, dtype=np.int64))
        object.__setattr__(self, "teacher_ends", np.asarray(self.teacher_ends, dtype=np.int64))
        if self.student_ends.shape != self.teacher_ends.shape:
            raise ValueError("student_ends and teacher_ends must have the same length")

    # ----- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.student_ends.shape[0])

    @property
    def num_student_tokens(self) -> int:
        return int(self.student_ends[-1]) if len(self) else 0

    @property
    def num_teacher_tokens(self) -> int:
        return int(self.teacher_ends[-1]) if len(self) else 0

    # ----- chunk views ----------------------------------------------------------------------
    @property
    def chunks(self) -> np.ndarray:
        """[K, 4] int64 rows (s_start, s_end, t_start, t_end), gaps and mismatches included."""
        out = np.empty((len(self), 4), dtype=np.int64)
        out[:, 1] = self.student_ends
        out[:, 3] = self.teacher_ends
        out[:, 0] = np.concatenate(([0], self.student_ends[:-1])) if len(self) else []
        out[:, 2] = np.concatenate(([0], self.teacher_ends[:-1])) if len(self) else []
        return out

    @property
    def matched_mask(self) -> np.ndarray:
        """[K] bool: tokens on both sides and not a DP mismatch."""
        c = self.chunks
        mask = (c[:, 1] > c[:, 0]) & (c[:, 3] > c[:, 2])
        if self.mismatch is not None:
            mask &= ~self.mismatch
        return mask

    @property
    def gap_mask(self) -> np.ndarray:
        c = self.chunks
        return (c[:, 1] == c[:, 0]) | (c[:, 3] == c[:, 2])

    def matched_chunks(self) -> np.ndarray:
        """[K_matched, 4] rows (s_start, s_end, t_start, t_end): what the loss uses."""
        return self.chunks[self.matched_mask]

    @property
    def num_gaps(self) -> int:
        return int(self.gap_mask.sum())

    @property
    def num_mismatches(self) -> int:
        return int(self.mismatch.sum()) if self.mismatch is not None else 0

    def max_chunk_tokens(self) -> tuple[int, int]:
        """Largest number of tokens in one chunk on (student, teacher) side."""
        if not len(self):
            return (0, 0)
        c = self.chunks
        return int((c[:, 1] - c[:, 0]).max()), int((c[:, 3] - c[:, 2]).max())

    # ----- text -----------------------------------------------------------------------------
    def texts(self, source: str | bytes) -> list[str]:
        """Text of every chunk ("" for gaps and special pairs) from the aligned source."""
        if self.spans is None:
            raise ValueError("this alignment has no text spans")
        out = []
        for a, b in self.spans.tolist():
            piece = source[a:b]
            out.append(piece.decode("utf-8", errors="backslashreplace") if isinstance(piece, bytes) else piece)
        return out

    def to_records(self, source: str | bytes) -> list[dict]:
        """JSON-ready list of {"student": [start, end), "teacher": [start, end), "text": str}."""
        texts = self.texts(source)
        return [
            {"student": [int(r[0]), int(r[1])], "teacher": [int(r[2]), int(r[3])], "text": t}
            for r, t in zip(self.chunks.tolist(), texts)
        ]

    # ----- storage --------------------------------------------------------------------------
    def interleaved(self) -> np.ndarray:
        """[2K] int32 ``[s_end_0, t_end_0, s_end_1, t_end_1, ...]`` (the on-disk form)."""
        out = np.empty(2 * len(self), dtype=np.int32)
        out[0::2] = self.student_ends
        out[1::2] = self.teacher_ends
        return out

    @classmethod
    def from_interleaved(cls, array: np.ndarray) -> Alignment:
        array = np.asarray(array)
        return cls(array[0::2].astype(np.int64), array[1::2].astype(np.int64), spans=None, method="stored")

    def equals(self, other: Alignment) -> bool:
        """Same chunk boundaries and same mismatch flags."""
        mine = self.mismatch if self.mismatch is not None else np.zeros(len(self), bool)
        theirs = other.mismatch if other.mismatch is not None else np.zeros(len(other), bool)
        return (
            len(self) == len(other)
            and bool(np.array_equal(self.student_ends, other.student_ends))
            and bool(np.array_equal(self.teacher_ends, other.teacher_ends))
            and bool(np.array_equal(mine, theirs))
        )


def identity_alignment(n: int) -> Alignment:
    """Teacher with the student's own tokenizer: chunk k = token k on both sides."""
    ends = np.arange(1, n + 1, dtype=np.int64)
    return Alignment(ends, ends.copy(), spans=None, method="identity")
