"""Chunk merge and teacher confidence on vocab-sharded logits: the vocab-parallel
:func:`~xtoken_nemo.losses.reference.merge_chunks` (chain / logmean / first, docs/method.md,
"Chunk merge"), the chain merge's log-mass alone, and
:func:`~xtoken_nemo.losses.weighting.teacher_confidence` (docs/method.md, "Multi-teacher
weighting").

Per-position logits ``[T, V_pad / tp]`` on each rank (shard conventions in
:mod:`xtoken_nemo.losses.shard`); a merge returns this rank's shard of the chunk log-probs
``[N, V_pad / tp]`` and the replicated ``[N]`` log-mass. The chunk lists (or
:class:`~xtoken_nemo.losses.common.ChunkSpans`) are host data: their indices are built on the host
and reach the logits' device in one non-blocking copy (:func:`~xtoken_nemo.losses.common.to_device`).
"""

from __future__ import annotations

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.common import MASK_VALUE, MERGE_MODES, ChunkIndex, MergedChunks, chunk_positions, to_device
from xtoken_nemo.losses.shard import (
    Shard,
    check_finite_global,
    check_local,
    make_shard,
    prep_block,
    vp_log_softmax,
    vp_lse,
)
from xtoken_nemo.losses.weighting import CONFIDENCE_KINDS


def _checked_shard(
    logits: torch.Tensor, vocab_size: int, group: object | None, name: str, shard_name: str, finite: bool = True
) -> tuple[object | None, Shard]:
    """Checks of [T, V_pad/tp] logits (shape; finiteness over the group unless ``finite=False``);
    (resolved group, this rank's shard of a vocabulary of real size ``vocab_size``)."""
    group = comm.resolve_group(group)
    check_local(name, logits)
    if finite:
        check_finite_global(name, logits.detach(), group)
    return group, make_shard(logits.shape[-1], vocab_size, group, shard_name)


def _chain_log_mass(
    logits: torch.Tensor,
    index: ChunkIndex,
    targets,
    shard: Shard,
    group: object | None,
) -> torch.Tensor:
    """[N] sum over each chunk's later positions of log p(actual next token); replicated."""
    if targets is None:
        raise LossInputError("chain merge needs the target token ids (the actual next tokens)")
    targets = torch.as_tensor(targets, dtype=torch.int64)
    later = index.pos != index.first[index.cid]
    # only the later positions' rows are touched: single-token chunks cost nothing here (their
    # log-mass is exactly 0, which chunk_mass_kl_parts reads as "no rest bucket on this side")
    lp_host, lc_host = index.pos[later], index.cid[later]
    lp, lc = to_device(logits.device, lp_host, lc_host)
    y = prep_block(logits[lp], shard, 1.0)  # [L, width]
    if targets.device == logits.device:
        tgt = targets[lp] - shard.start
    else:  # targets given on the host
        tgt = to_device(logits.device, targets[lp_host])[0] - shard.start
    own = (tgt >= 0) & (tgt < shard.width)
    col = tgt.clamp(0, shard.width - 1)[:, None]
    # log p_t = d - log1p(expm1(d) + s), d = y_t - m, s = sum over v != t of exp(y_v - m), m the
    # (detached) global max: exact near p_t = 1, where y_t - lse rounds to 0 (reference.target_log_probs)
    m = y.detach().max(dim=-1).values
    comm.all_reduce_(m, "max", group)
    excluded = torch.zeros_like(y, dtype=torch.bool).scatter_(1, col, own[:, None])
    s = comm.sum_autograd(torch.exp(y.masked_fill(excluded, MASK_VALUE) - m[:, None]).sum(-1), group)
    zero = y.new_zeros(())
    d = torch.where(own, y.gather(1, col).squeeze(1) - m, zero)  # 0 off the owner: finite everywhere
    picked = torch.where(own, d - torch.log1p(torch.expm1(d) + s), zero)
    # each target is owned by one rank: a sum of partials, so that a replicated consumer of
    # log_mass (every rank computes the same loss from it) back-propagates it once
    picked = comm.sum_partials(picked, group)
    return y.new_zeros(len(index.first)).index_add(0, lc, picked)


def chunk_log_mass_parallel(
    logits: torch.Tensor,
    chunks,
    vocab_size: int,
    targets: torch.Tensor,
    group: object | None = None,
) -> torch.Tensor:
    """The chain merge's [N] log-mass alone (replicated), without normalizing the first
    positions: for losses that take the first positions' raw logits as the chunk shape (every
    loss here softmaxes its input, so that is the same shape)."""
    group, shard = _checked_shard(logits, vocab_size, group, "per-position logits", "logits", finite=False)
    return _chain_log_mass(logits, chunk_positions(chunks, logits.shape[0]), targets, shard, group)


def merge_chunks_parallel(
    logits: torch.Tensor,
    chunks,
    vocab_size: int,
    targets: torch.Tensor | None = None,
    mode: str = "chain",
    group: object | None = None,
) -> MergedChunks:
    """Vocab-parallel :func:`~xtoken_nemo.losses.reference.merge_chunks`: [T, V_pad/tp] -> [N, V_pad/tp].

    Returns this rank's shard of the normalized chunk log-probs (padded columns at MASK_VALUE) and
    the replicated [N] log-mass. Autograd flows to ``logits``; the log-mass may be used as it is
    by a loss that every rank computes identically (its backward counts it once, not tp times).
    """
    if mode not in MERGE_MODES:
        raise LossInputError(f"unknown chunk merge {mode!r}; choose one of {MERGE_MODES}")
    group, shard = _checked_shard(logits, vocab_size, group, "per-position logits", "logits")
    index = chunk_positions(chunks, logits.shape[0])
    n = len(index.first)
    if mode in ("first", "chain"):
        (first,) = to_device(logits.device, index.first)
        first_logp = vp_log_softmax(prep_block(logits[first], shard, 1.0), group)
        if mode == "first":
            return MergedChunks(first_logp, first_logp.new_zeros(n))
        return MergedChunks(first_logp, _chain_log_mass(logits, index, targets, shard, group))
    y = prep_block(logits, shard, 1.0)
    # the chunk sizes come from the host: bincount on a GPU would read its input's max (a sync)
    pos, cid, counts = to_device(y.device, index.pos, index.cid, index.counts)
    counts = counts.to(y.dtype)
    logp = vp_log_softmax(y[pos], group)
    mean = y.new_zeros(n, y.shape[1]).index_add(0, cid, logp) / counts[:, None]
    if shard.valid < shard.width:
        mean = mean.masked_fill(torch.arange(shard.width, device=mean.device) >= shard.valid, MASK_VALUE)
    lse = vp_lse(mean, group)
    # lse already back-propagates through an all-reduce; returned as a replicated value whose
    # gradient every rank contributes, it is split into ws equal partials
    log_mass = comm.sum_partials(lse / comm.world_size(group), group)
    return MergedChunks(mean - lse[:, None], log_mass)


def teacher_confidence_parallel(
    teacher_logits: torch.Tensor,
    kind: str,
    vocab_size: int,
    targets: torch.Tensor | None = None,
    group: object | None = None,
) -> torch.Tensor:
    """Vocab-parallel :func:`~xtoken_nemo.losses.weighting.teacher_confidence` (replicated scalar)."""
    if kind not in CONFIDENCE_KINDS:
        raise LossInputError(f"unknown confidence {kind!r}; choose one of {CONFIDENCE_KINDS}")
    group, shard = _checked_shard(teacher_logits, vocab_size, group, "teacher logits", "teacher")
    with torch.no_grad():
        y = prep_block(teacher_logits, shard, 1.0)
        logp = vp_log_softmax(y, group)
        if kind == "ce":
            if targets is None:
                raise LossInputError("confidence 'ce' needs the target token ids of the teacher's chunks")
            tgt = torch.as_tensor(targets, dtype=torch.int64) - shard.start
            own = (tgt >= 0) & (tgt < shard.width)
            v = torch.where(own, logp.gather(1, tgt.clamp(0, shard.width - 1)[:, None]).squeeze(1), logp.new_zeros(()))
        elif kind == "entropy":
            v = (logp.exp() * logp).sum(-1)
        else:
            v = logp.max(dim=-1).values
            comm.all_reduce_(v, "max", group)
            return v.exp().mean()
        comm.all_reduce_(v, "sum", group)
        return v.mean()
