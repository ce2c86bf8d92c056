"""Vocabulary shards and the block-level helpers every vocab-parallel loss uses (docs/method.md,
"Tensor-parallel form").

Shapes on each rank: student ``[N, V_S_pad / tp]``, teacher ``[N, V_T_pad / tp]`` (Megatron's
vocab-parallel output layout: rank r holds columns ``[r * V/tp, (r + 1) * V/tp)``); the real
vocab sizes are given so the padded columns (global id >= V) are masked out. At tp=1 (no group)
the same code is the single-device path. Every vocab-parallel loss returns the mean over chunks
(``reduction="none"``: the ``[N]`` per-chunk vector), replicated on all ranks; gradients flow to
the student logits only (the teacher is frozen: teacher logits get no gradient).

This module holds:
- :class:`Shard` (one rank's slice of a vocabulary), :func:`make_shard` and
  :func:`cross_vocab_shards` (the argument checks of the two-vocabulary losses);
- the finiteness checks: :func:`check_local` (shape only), :func:`check_finite_global` (over the
  whole group) and :func:`raise_if_not_finite` (the post-check of a replicated per-chunk loss);
- block math, no communication: :func:`prep_block` (logits / T with padded columns masked) and
  :func:`token_blocks` / :func:`check_block` (iteration over token blocks);
- the autograd-aware vocab-parallel :func:`vp_lse` / :func:`vp_log_softmax`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.checks import (
    check_logits,
    check_reduction,
    check_same_chunks,
    check_temperature,
    nonfinite_checks_enabled,
)
from xtoken_nemo.losses.common import MASK_VALUE, compute_dtype


# ==========================================================================================
# Shard geometry and validation
# ==========================================================================================
@dataclass(frozen=True)
class Shard:
    """One rank's slice of a vocabulary: columns [start, start + width) of a padded vocab."""

    start: int
    width: int
    vocab_size: int  # real (unpadded) vocab size
    padded: int  # width * world size

    @property
    def valid(self) -> int:
        """Number of real (non-padded) columns in this shard."""
        return max(0, min(self.width, self.vocab_size - self.start))


def make_shard(local_width: int, vocab_size: int, group: object | None, name: str) -> Shard:
    """This rank's :class:`Shard` of a vocabulary of real size ``vocab_size`` whose logits have
    ``local_width`` columns per rank; raises if the vocabulary does not fit the padded width."""
    ws, r = comm.world_size(group), comm.rank(group)
    padded = local_width * ws
    if vocab_size > padded or vocab_size <= 0:
        raise LossInputError(
            f"{name} vocab size {vocab_size} does not fit the sharded logits: {local_width} columns "
            f"per rank x {ws} ranks = {padded}; pass the real (unpadded) vocab size"
        )
    return Shard(r * local_width, local_width, vocab_size, padded)


def cross_vocab_shards(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float,
    reduction: str,
    group: object | None,
) -> tuple[object | None, Shard, Shard]:
    """Argument checks shared by the two-vocabulary losses; (group, student shard, teacher shard)."""
    group = check_pair_args(student_logits, teacher_logits, temperature, reduction, group)
    s_shard = make_shard(student_logits.shape[-1], student_vocab_size, group, "student")
    t_shard = make_shard(teacher_logits.shape[-1], teacher_vocab_size, group, "teacher")
    return group, s_shard, t_shard


def check_pair_args(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str,
    group: object | None,
) -> object | None:
    """Checks of every student/teacher loss (temperature, reduction, [N, width] shapes, same chunk
    count; finiteness is checked later, over the group); returns the resolved group."""
    check_temperature(temperature)
    check_reduction(reduction)
    group = comm.resolve_group(group)
    check_local("student logits", student_logits)
    check_local("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    return group


def check_local(name: str, logits: torch.Tensor) -> None:
    """Shape checks only: finiteness is checked over the whole group (one rank must not raise alone)."""
    check_logits(name, logits, finite=False)


def check_finite_global(name: str, logits: torch.Tensor, group: object | None) -> None:
    """NaN/inf anywhere in the group is an error on every rank (no rank may wait in a collective).

    One pass: the sum of a tensor is finite iff every entry is (short of an fp32 overflow of the
    sum itself, which logits do not reach); the exact count is taken only for the message.
    """
    if not nonfinite_checks_enabled():
        return
    total = torch.sum(logits.detach(), dtype=torch.float32)
    bad = torch.tensor([0.0 if bool(torch.isfinite(total)) else 1.0], device=logits.device)
    comm.all_reduce_(bad, "sum", group)
    if bad.item() > 0:
        bad = (~torch.isfinite(logits.detach())).sum().float().reshape(1)
        comm.all_reduce_(bad, "sum", group)
        raise LossInputError(
            f"{name} contain {int(bad.item())} NaN/inf values (over the tensor-parallel group); check "
            "the model forward (overflow in bf16, a masked position) before the loss"
        )


def raise_if_not_finite(per_chunk: torch.Tensor, what: str) -> None:
    """Post-check of the KL/P-KL Functions (cheaper than scanning the logits first).

    NaN/+inf in any rank's logits makes the all-reduced maxima/sums, hence the replicated per-chunk
    loss, non-finite on every rank: all ranks raise together, none waits in a collective. (A -inf
    student logit is a probability of exactly 0 and is accepted here.)
    """
    if not nonfinite_checks_enabled():
        return
    if not bool(torch.isfinite(per_chunk).all()):
        raise LossInputError(
            f"{what} contain NaN/inf values (the loss of {int((~torch.isfinite(per_chunk)).sum())} chunks is "
            "not finite); check the model forward (overflow in bf16, a masked position) before the loss"
        )


# ==========================================================================================
# Block math (no communication) and block iteration
# ==========================================================================================
def prep_block(x: torch.Tensor, shard: Shard, temperature: float) -> torch.Tensor:
    """[B, width] input-dtype logits -> compute-dtype logits / T, padded columns = MASK_VALUE."""
    y = x.to(compute_dtype(x))
    if temperature != 1.0:
        y = y / temperature
    if shard.valid < shard.width:
        padded = torch.arange(shard.width, device=y.device) >= shard.valid
        y = y.masked_fill(padded, MASK_VALUE)
    return y


def token_blocks(n: int, block: int):
    """(start, end) of the consecutive blocks of ``block`` rows (the last may be shorter) of n rows."""
    for start in range(0, n, block):
        yield start, min(n, start + block)


def check_block(block_size: int) -> int:
    """``block_size`` if it is a positive int, else a LossInputError."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise LossInputError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


# ==========================================================================================
# Autograd-aware vocab-parallel log-softmax
# ==========================================================================================
def vp_lse(y: torch.Tensor, group: object | None) -> torch.Tensor:
    """Autograd-aware vocab-parallel log-sum-exp [B, n] -> [B] (max detached, sum-exp sum-reduced)."""
    m = y.detach().max(dim=-1).values
    comm.all_reduce_(m, "max", group)
    return m + comm.sum_autograd(torch.exp(y - m[:, None]).sum(-1), group).log()


def vp_log_softmax(y: torch.Tensor, group: object | None) -> torch.Tensor:
    """Autograd-aware vocab-parallel log-softmax of [B, n]."""
    return y - vp_lse(y, group)[:, None]
