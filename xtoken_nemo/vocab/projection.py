"""The projection matrix W (student vocab -> teacher vocab), its file format and TP sharding.

W is stored in a fixed-width sparse form ("ELL"): every student row has ``K`` slots (K=4 by
default, the method's top-4) holding ``(teacher_id, weight)``; an unused slot has id -1 and
weight 0. That makes a row shard for a tensor-parallel rank a plain slice, and W^T p_S a
gather/scatter of fixed width on any device.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xtoken_nemo.errors import ProjectionMatrixError
from xtoken_nemo.tokenizers.base import Tokenizer
from xtoken_nemo.vocab.pair_file import PairFileKind, check_pair_tokenizers, read_pair_file

FORMAT_NAME = "xtoken-nemo/projection-matrix"
FORMAT_VERSION = "1"
W_FILE = PairFileKind(FORMAT_NAME, FORMAT_VERSION, "W file", "`xtoken build-w`", ProjectionMatrixError)


@dataclass
class ProjectionMatrix:
    """Sparse non-negative W of shape [V_S, V_T]; built rows sum to 1, unmatched rows are 0.

    indices: [V_S, K] int64 teacher ids, -1 marks an empty slot.
    values:  [V_S, K] float32 weights, 0 in empty slots.
    """

    indices: torch.Tensor
    values: torch.Tensor
    num_teacher_tokens: int
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.dim() != 2:
            raise ProjectionMatrixError(
                f"W indices {tuple(self.indices.shape)} and values {tuple(self.values.shape)} must be "
                "equal [V_S, K] shapes; rebuild W with `xtoken build-w`"
            )
        self.indices = self.indices.to(torch.int64)
        self.values = self.values.to(torch.float32)
        if self.indices.numel() and int(self.indices.max()) >= self.num_teacher_tokens:
            raise ProjectionMatrixError(
                f"W names teacher id {int(self.indices.max())} but the teacher vocab has "
                f"{self.num_teacher_tokens} ids; rebuild W with `xtoken build-w`"
            )

    # ----- shape and rows -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.indices.shape[0]), int(self.num_teacher_tokens))

    @property
    def slots(self) -> int:
        """K, the number of (teacher id, weight) slots per row."""
        return int(self.indices.shape[1])

    @property
    def nnz(self) -> int:
        return int((self.indices >= 0).sum())

    def row(self, student_id: int) -> dict[int, float]:
        """{teacher_id: weight} for one student token (empty for a zero row)."""
        if not 0 <= student_id < self.shape[0]:
            raise IndexError(f"student id {student_id} outside W's {self.shape[0]} rows")
        ids, vals = self.indices[student_id].tolist(), self.values[student_id].tolist()
        return {t: v for t, v in zip(ids, vals) if t >= 0}

    def row_nnz(self) -> torch.Tensor:
        """[V_S] number of non-zeros per row."""
        return (self.indices >= 0).sum(dim=1)

    def argmax_pairs(self) -> torch.Tensor:
        """[P, 2] (student_id, teacher_id) with the largest weight of every non-zero row (H-KL)."""
        best = self.values.argmax(dim=1)
        teacher = self.indices.gather(1, best[:, None]).squeeze(1)
        rows = torch.nonzero(teacher >= 0).squeeze(1)
        return torch.stack([rows, teacher[rows]], dim=1)

    # ----- torch views ----------------------------------------------------------------------
    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[V_S, V_T] dense W. Only for small vocabularies and tests: 128k x 152k is 78 GB."""
        dense = torch.zeros(self.shape, dtype=dtype)
        mask = self.indices >= 0
        rows = torch.arange(self.shape[0])[:, None].expand_as(self.indices)
        dense[rows[mask], self.indices[mask]] = self.values[mask].to(dtype)
        return dense

    def to_sparse_coo(self) -> torch.Tensor:
        """[V_S, V_T] torch sparse COO tensor (coalesced)."""
        mask = self.indices >= 0
        rows = torch.arange(self.shape[0])[:, None].expand_as(self.indices)[mask]
        coo = torch.sparse_coo_tensor(torch.stack([rows, self.indices[mask]]), self.values[mask], self.shape)
        return coo.coalesce()

    def to_sparse_csr(self) -> torch.Tensor:
        """[V_S, V_T] torch sparse CSR tensor."""
        return self.to_sparse_coo().to_sparse_csr()

    # ----- tensor parallelism ---------------------------------------------------------------
    def shard_rows(self, rank: int, world_size: int, padded_vocab_size: int | None = None) -> ProjectionMatrix:
        """Rows of W owned by one tensor-parallel rank: [V_S_padded / world_size, K].

        Megatron pads the student vocab (to a multiple of 128 * tp); the padded rows are zero
        rows here, so the shard lines up with the rank's slice of the student logits.
        """
        num_rows = self.shape[0]
        padded = padded_vocab_size if padded_vocab_size is not None else math.ceil(num_rows / world_size) * world_size
        if padded < num_rows or padded % world_size:
            raise ProjectionMatrixError(
                f"padded student vocab {padded} must be >= W's {num_rows} rows and divisible by "
                f"tensor-parallel size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside tensor-parallel size {world_size}")
        per_rank = padded // world_size
        start, stop = rank * per_rank, (rank + 1) * per_rank
        indices = torch.full((per_rank, self.slots), -1, dtype=torch.int64)
        values = torch.zeros((per_rank, self.slots), dtype=torch.float32)
        have = max(0, min(stop, num_rows) - start)
        indices[:have] = self.indices[start : start + have]
        values[:have] = self.values[start : start + have]
        meta = dict(self.metadata, shard=f"{rank}/{world_size}", shard_row_start=str(start))
        return ProjectionMatrix(indices, values, self.num_teacher_tokens, meta)

    # ----- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write W as safetensors (indices int32, values float32) plus metadata, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, num_teacher_tokens=str(self.num_teacher_tokens))
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"indices": self.indices.to(torch.int32).contiguous(), "values": self.values.contiguous()},
            str(tmp),
            metadata=meta,
        )
        os.replace(tmp, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        student: Tokenizer | None = None,
        teacher: Tokenizer | None = None,
    ) -> ProjectionMatrix:
        """Read W; with tokenizers given, refuse a W that was built for other tokenizers."""
        meta, tensors = read_pair_file(path, W_FILE, ("indices", "values"))
        W = cls(tensors["indices"], tensors["values"], int(meta["num_teacher_tokens"]), meta)
        W.check_tokenizers(student, teacher, source=str(path))
        return W

    def check_tokenizers(self, student: Tokenizer | None, teacher: Tokenizer | None, source: str = "W") -> None:
        """Raise ProjectionMatrixError unless W was built from exactly these tokenizers (their
        fingerprints, and W's rows and columns their sizes)."""
        sizes = {"student": self.shape[0], "teacher": self.shape[1]}
        check_pair_tokenizers(self.metadata, sizes, student, teacher, source, W_FILE)

    def builder_stats(self) -> dict:
        """Build summary stored in the metadata (exact rows, rows by piece count, zero rows...)."""
        return json.loads(self.metadata.get("stats", "{}"))
