"""A per-process memo of frozen teachers' logits, one entry per token sequence (opt-in: the CPU demo).

The demo trains 30 students on the same 370 windows of text (every seed a permutation of them)
against two frozen teachers: the teacher forward of a window gives the same logits in every run,
and it was a fifth to a third of a KD step. :class:`TeacherLogitsCache` keeps each teacher's logits
per sequence (one row of a micro-batch, with its padding) and serves later batches from it; a
:class:`~xtoken_nemo.distill.trainer.Trainer` given one (``teacher_cache=``) runs the teacher only on
the rows it has not seen. Runs without it (every ``xtoken train`` run) are unchanged.

Exactness. A cached row was computed in another batch: its logits equal the ones the teacher
computes in this batch only if the forward of one sequence does not depend on the others of the
batch (batch invariance). On CPU it holds for the demo's models: megatron's layers are row-wise
matrix products, per-sequence attention and row-wise norms and softmax, and MKL's single-thread
products gave equal bits for a sequence alone and in batches of 5 and 16, in any order, on the AVX2
and the unvectorized ATen paths (docs/demo.md, "Cost of the demo"). It is not guaranteed for every
BLAS or GPU kernel, so it is checked: the first batch of each teacher that a trainer serves entirely
from the cache is also computed, and if a single bit differs the cache is dropped for that teacher
in this process (a warning; the run goes on with computed logits, so the results stay exact).

A teacher's key holds everything its logits depend on besides the tokens: its model config, the
checkpoint's resolved path and modification time, the padded vocabulary and this rank's shard,
dtype, device, thread count and ATen kernel path. Rows are keyed by their token ids (and length).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Rows served from the cache (``hit_rows``), computed by the teacher (``miss_rows``), batches
    also computed to check the cache (``checked_batches``), checks that failed (``failed_checks``)."""

    hit_rows: int = 0
    miss_rows: int = 0
    checked_batches: int = 0
    failed_checks: int = 0

    def minus(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.hit_rows, self.miss_rows, self.checked_batches, self.failed_checks)

    def to_json(self) -> dict:
        return dict(zip(("hit_rows", "miss_rows", "checked_batches", "failed_checks"), self.as_tuple()))


class TeacherLogitsCache:
    """Frozen teachers' logits per token sequence, kept in this process's memory (up to
    ``max_bytes``; beyond it new rows are computed and not kept)."""

    def __init__(self, max_bytes: int = 2**30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.stats = CacheStats()
        self._rows: dict[tuple, torch.Tensor] = {}
        self._refused: set[str] = set()  # teacher keys whose check failed: never cached again here

    def __len__(self) -> int:
        return len(self._rows)

    def logits(
        self,
        teacher_key: str,
        tokens: torch.Tensor,
        forward: Callable[[torch.Tensor], torch.Tensor],
        check: bool = False,
    ) -> torch.Tensor:
        """The teacher's logits [B, T, V] for ``tokens`` [B, T]: cached rows, and ``forward`` (the
        teacher on a [b, T] batch of sequences, b <= B) for the rest. ``check``: if every row is
        cached, compute the batch anyway and compare (once per trainer and teacher); returns
        whether it was equal through :attr:`stats`. The result is a new tensor (the cache's rows
        are never handed out, so nothing downstream can modify them)."""
        if teacher_key in self._refused:
            return forward(tokens)
        B, T = tokens.shape
        host = tokens.detach().cpu()
        keys = [(teacher_key, T, str(host.dtype), row.numpy().tobytes()) for row in host]
        rows = [self._rows.get(k) for k in keys]
        missing = [j for j, row in enumerate(rows) if row is None]
        self.stats.hit_rows += B - len(missing)
        self.stats.miss_rows += len(missing)
        if len(missing) == B:
            out = forward(tokens)
            for j in range(B):
                self._keep(keys[j], out[j])
            return out
        if missing:
            computed = forward(tokens[missing])
            for j, row in zip(missing, computed):
                rows[j] = row
                self._keep(keys[j], row)
        out = torch.stack(rows)
        if check and not missing:
            self.stats.checked_batches += 1
            reference = forward(tokens)
            if not torch.equal(reference, out):
                self.stats.failed_checks += 1
                self.stats.hit_rows -= B  # computed after all
                self.stats.miss_rows += B
                self._refuse(teacher_key)
                return reference
        return out

    def _keep(self, key: tuple, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.nbytes + size > self.max_bytes:
            return
        self._rows[key] = row.detach().clone()
        self.nbytes += size

    def _refuse(self, teacher_key: str) -> None:
        log.warning(
            "teacher logits cache: a batch served from the cache differs from the teacher's forward "
            "(the teacher is not batch-invariant on this machine); not caching this teacher in this process"
        )
        self._refused.add(teacher_key)
        for key in [k for k in self._rows if k[0] == teacher_key]:
            row = self._rows.pop(key)
            self.nbytes -= row.numel() * row.element_size()


def teacher_key(model_config, padded_vocab: int, tp_rank: int, tp: int, dtype, device, parallel=None) -> str:
    """What a teacher's logits depend on besides the tokens (see the module docstring)."""
    import os
    from dataclasses import asdict

    stamp = None
    if model_config.checkpoint:
        path = os.path.realpath(model_config.checkpoint)
        try:
            stamp = (path, os.stat(path).st_mtime_ns)
        except OSError:
            stamp = (path, None)
    return repr(
        (
            sorted(asdict(model_config).items()),
            stamp,
            padded_vocab,
            tp_rank,
            tp,
            str(dtype),
            str(device),
            repr(parallel),
            torch.get_num_threads(),
            torch.backends.cpu.get_cpu_capability(),
        )
    )
