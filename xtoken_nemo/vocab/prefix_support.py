"""The prefix support of J-KL (joint-chunk KL, docs/method.md "J-KL"): for every teacher piece
sequence that is a proper prefix of some student token's teacher tokenization, the student tokens
whose teacher tokenization is that prefix plus exactly one more piece.

Example (Llama-3 student, Qwen3 teacher, which writes numbers digit by digit): the student token
"47" is the teacher pieces ("4", "7"); under the prefix ("4",) the support holds the ten student
tokens "40" ... "49", each with its last piece "0" ... "9". When a chunk's one student token faces
the teacher pieces "4", "7", the loss reads the row of prefix ("4",) and compares the student's
probabilities of "40" ... "49" with the teacher's chain products p_T("4") * p_T(x | "4").

Built once from the two tokenizers (the pieces are W's: :func:`~xtoken_nemo.vocab.build.teacher_pieces`),
deterministic (prefixes in lexicographic order, entries by (last piece, student id)), and saved as
safetensors with both tokenizers' fingerprints, like W. Single-piece student tokens are not in it
(their prefix is empty: that is the first position's distribution, which P-KL's term covers).

Layout (host int64 tensors, CSR over prefixes):
- ``prefix_offsets`` [P + 1], ``prefix_pieces`` [sum of prefix lengths]: prefix p is
  ``prefix_pieces[prefix_offsets[p]:prefix_offsets[p + 1]]``;
- ``entry_offsets`` [P + 1], ``entry_pieces`` [E], ``entry_students`` [E]: prefix p's entries are
  ``[entry_offsets[p], entry_offsets[p + 1])``, each (last teacher piece, student id).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xtoken_nemo.errors import ProjectionMatrixError
from xtoken_nemo.tokenizers.base import Tokenizer
from xtoken_nemo.vocab.build import pair_metadata, teacher_pieces
from xtoken_nemo.vocab.canonical import exact_matches
from xtoken_nemo.vocab.pair_file import PairFileKind, check_pair_tokenizers, read_pair_file

FORMAT_NAME = "xtoken-nemo/prefix-support"
FORMAT_VERSION = "1"
_TENSORS = ("prefix_offsets", "prefix_pieces", "entry_offsets", "entry_pieces", "entry_students")


class PrefixSupportError(ProjectionMatrixError):
    """A prefix-support file is missing, corrupt or built for other tokenizers."""


SUPPORT_FILE = PairFileKind(
    FORMAT_NAME, FORMAT_VERSION, "prefix-support file", "`xtoken build-support`", PrefixSupportError
)


@dataclass
class PrefixSupport:
    """Student tokens by the teacher prefix they extend by one piece (module docstring for the layout)."""

    prefix_offsets: torch.Tensor
    prefix_pieces: torch.Tensor
    entry_offsets: torch.Tensor
    entry_pieces: torch.Tensor
    entry_students: torch.Tensor
    num_student_tokens: int
    num_teacher_tokens: int
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _TENSORS:
            setattr(self, name, getattr(self, name).to(torch.int64).contiguous())
        num_prefixes = self.prefix_offsets.numel() - 1
        if num_prefixes < 0 or self.entry_offsets.numel() != num_prefixes + 1:
            raise PrefixSupportError("prefix support: offsets of prefixes and entries disagree; rebuild it")
        self._entry_offsets = self.entry_offsets.numpy()
        self._pieces = self.entry_pieces.numpy()
        self._students = self.entry_students.numpy()
        offsets, pieces = self.prefix_offsets.tolist(), self.prefix_pieces.tolist()
        self._lookup = {tuple(pieces[offsets[p] : offsets[p + 1]]): p for p in range(num_prefixes)}

    @classmethod
    def from_prefix_map(
        cls,
        by_prefix: dict[tuple[int, ...], list[tuple[int, int]]],
        num_student_tokens: int,
        num_teacher_tokens: int,
        metadata: dict[str, str] | None = None,
    ) -> PrefixSupport:
        """From {teacher prefix: [(last teacher piece, student id)]}, in the canonical order
        (prefixes lexicographic, entries sorted): equal maps give equal tensors."""
        prefixes = sorted(tuple(int(t) for t in p) for p in by_prefix)
        rows = [sorted((int(x), int(v)) for x, v in by_prefix[p]) for p in prefixes]
        prefix_offsets = np.zeros(len(prefixes) + 1, dtype=np.int64)
        prefix_offsets[1:] = np.cumsum([len(p) for p in prefixes])
        entry_offsets = np.zeros(len(prefixes) + 1, dtype=np.int64)
        entry_offsets[1:] = np.cumsum([len(r) for r in rows])
        entries = [e for r in rows for e in r]
        return cls(
            prefix_offsets=torch.from_numpy(prefix_offsets),
            prefix_pieces=torch.tensor([t for p in prefixes for t in p], dtype=torch.int64),
            entry_offsets=torch.from_numpy(entry_offsets),
            entry_pieces=torch.tensor([e[0] for e in entries], dtype=torch.int64),
            entry_students=torch.tensor([e[1] for e in entries], dtype=torch.int64),
            num_student_tokens=num_student_tokens,
            num_teacher_tokens=num_teacher_tokens,
            metadata=dict(metadata or {}),
        )

    # ----- rows -----------------------------------------------------------------------------
    @property
    def num_prefixes(self) -> int:
        return len(self._lookup)

    @property
    def num_entries(self) -> int:
        return int(self.entry_students.numel())

    def row_of(self, prefix: tuple[int, ...]) -> int:
        """Index of ``prefix`` (teacher ids), or -1 when no student token extends it by one piece."""
        return self._lookup.get(tuple(prefix), -1)

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(last teacher pieces [n], student ids [n]) of one prefix row (numpy views)."""
        a, b = self._entry_offsets[row], self._entry_offsets[row + 1]
        return self._pieces[a:b], self._students[a:b]

    def entries(self, prefix: tuple[int, ...]) -> list[tuple[int, int]]:
        """[(last teacher piece, student id)] of the student tokens whose teacher tokenization is
        ``prefix`` plus one piece (empty when there are none)."""
        row = self.row_of(prefix)
        if row < 0:
            return []
        pieces, students = self.row(row)
        return list(zip(pieces.tolist(), students.tolist()))

    # ----- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors with metadata, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            num_student_tokens=str(self.num_student_tokens),
            num_teacher_tokens=str(self.num_teacher_tokens),
        )
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: getattr(self, name) for name in _TENSORS}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, student: Tokenizer | None = None, teacher: Tokenizer | None = None
    ) -> PrefixSupport:
        """Read a support file; with tokenizers given, refuse one built for other tokenizers."""
        meta, tensors = read_pair_file(path, SUPPORT_FILE, _TENSORS)
        support = cls(**tensors, num_student_tokens=int(meta["num_student_tokens"]),
                      num_teacher_tokens=int(meta["num_teacher_tokens"]), metadata=meta)  # fmt: skip
        support.check_tokenizers(student, teacher, source=str(path))
        return support

    def check_tokenizers(self, student: Tokenizer | None, teacher: Tokenizer | None, source: str = "support") -> None:
        """Raise PrefixSupportError unless the support was built from exactly these tokenizers."""
        sizes = {"student": self.num_student_tokens, "teacher": self.num_teacher_tokens}
        check_pair_tokenizers(self.metadata, sizes, student, teacher, source, SUPPORT_FILE)

    def stats(self) -> dict:
        return json.loads(self.metadata.get("stats", "{}"))


def build_prefix_support(student: Tokenizer, teacher: Tokenizer, progress: bool = True) -> PrefixSupport:
    """The prefix support of ``student`` -> ``teacher`` (module docstring): every ordinary student
    token whose teacher pieces number n >= 2 is an entry under its first n - 1 pieces."""
    started = time.perf_counter()
    matches = exact_matches(student, teacher)  # one piece by definition: not in the support
    pieces_by_row, _ = teacher_pieces(student, teacher, skip=matches.ordinary, progress=progress)
    by_prefix: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for sid, pieces in pieces_by_row.items():
        if len(pieces) >= 2:
            by_prefix.setdefault(tuple(pieces[:-1]), []).append((pieces[-1], sid))
    by_length: dict[int, int] = {}
    for p, row in by_prefix.items():
        by_length[len(p) + 1] = by_length.get(len(p) + 1, 0) + len(row)
    stats = {
        "prefixes": len(by_prefix),
        "entries": sum(by_length.values()),
        "entries_by_pieces": {str(k): v for k, v in sorted(by_length.items())},
        "largest_row": max((len(v) for v in by_prefix.values()), default=0),
        "seconds": round(time.perf_counter() - started, 3),
    }
    metadata = {**pair_metadata(student, teacher), "stats": json.dumps(stats, sort_keys=True)}
    return PrefixSupport.from_prefix_map(by_prefix, student.vocab_size, teacher.vocab_size, metadata)
