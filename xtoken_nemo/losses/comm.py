"""Tensor-parallel communication for the vocab-parallel losses, by name, apart from the math.

``group=None`` resolves to megatron-core's tensor-parallel group when torch.distributed and
``parallel_state`` are initialized, and to "no group" (world size 1, every collective a no-op)
otherwise: the same loss code is the single-device path.

Autograd rules (design.md): a sum whose result feeds a softmax denominator (or any quantity every
rank then uses) must back-propagate with a sum-all-reduce: :func:`sum_autograd`
(``torch.distributed.nn.functional.all_reduce``). The final per-chunk loss is the sum of the
ranks' partial losses and each rank back-propagates its own partial: :func:`sum_partials`
(forward all-reduce, backward identity). A term every rank computes identically from gathered
data is divided by the world size before :func:`sum_partials`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def _quiet():
    """torch >= 2.10 marks reduce_scatter_tensor / all_gather_into_tensor / torch.distributed.nn
    as deprecated (FutureWarning) in favour of newer names that 2.6 lacks; keep logs readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


Group = "dist.ProcessGroup | None"


def resolve_group(group: object | None = None) -> object | None:
    """The tensor-parallel group to use, or None for single-device."""
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def world_size(group: object | None) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def rank(group: object | None) -> int:
    return 0 if group is None else dist.get_rank(group=group)


# ----- plain collectives (no autograd) ------------------------------------------------------
def all_reduce_(t: torch.Tensor, op: str = "sum", group: object | None = None) -> torch.Tensor:
    """In place; op in {sum, max}."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def reduce_scatter_rows(t: torch.Tensor, group: object | None) -> torch.Tensor:
    """[ws * n, B] partials on every rank -> [n, B]: the sum over ranks of this rank's row slice."""
    ws = world_size(group)
    if ws == 1:
        return t
    out = t.new_empty((t.shape[0] // ws, *t.shape[1:]))
    with _quiet():
        dist.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out


def all_gather_rows(t: torch.Tensor, group: object | None) -> torch.Tensor:
    """[n, B] per rank -> [ws * n, B], rank order."""
    ws = world_size(group)
    if ws == 1:
        return t
    out = t.new_empty((t.shape[0] * ws, *t.shape[1:]))
    with _quiet():
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


# ----- autograd-aware -----------------------------------------------------------------------
def sum_autograd(t: torch.Tensor, group: object | None) -> torch.Tensor:
    """Sum over ranks; backward sums the ranks' gradients (right for shared denominators)."""
    if world_size(group) == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    with _quiet():
        return all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def gather_cols_autograd(t: torch.Tensor, group: object | None) -> torch.Tensor:
    """[B, n] per rank -> [B, ws * n]; backward returns each rank the sum of the gradients of its slice."""
    if world_size(group) == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    with _quiet():
        return torch.cat(all_gather(t.contiguous(), group=group), dim=-1)


class _SumPartials(torch.autograd.Function):
    """Forward: sum of the ranks' partial losses. Backward: identity (each rank owns its partial)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: object) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        all_reduce_(out, "sum", group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def sum_partials(t: torch.Tensor, group: object | None) -> torch.Tensor:
    if world_size(group) == 1:
        return t
    return _SumPartials.apply(t, group)
