"""Vocab-parallel KL(p_T || p_S) for a teacher that shares the student's tokenizer.

Student and teacher logits ``[N, V_pad / tp]`` on each rank, one shared vocabulary (shard
conventions in :mod:`xtoken_nemo.losses.shard`). An explicit autograd Function (like
megatron-core's vocab-parallel cross entropy): the forward runs in token blocks and keeps only
the per-token log-normalizers; the backward recomputes each block. bf16/fp16 logits in, fp32
accumulation, gradient returned in the input dtype. The unsharded oracle is
:func:`xtoken_nemo.losses.reference.kl_loss`.
"""

from __future__ import annotations

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.checks import reduce_chunks
from xtoken_nemo.losses.common import DEFAULT_BLOCK, compute_dtype
from xtoken_nemo.losses.shard import (
    check_block,
    check_pair_args,
    make_shard,
    prep_block,
    raise_if_not_finite,
    token_blocks,
)


def _sum_exp(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.exp(y - m[:, None]).sum(-1)


def _kl_terms(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """[B, n] -> [B] local part of sum p_T (log p_T - log p_S)."""
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def _lse_pair(ys: list[torch.Tensor], group: object | None) -> list[torch.Tensor]:
    """Vocab-parallel log-sum-exp of several [B, n_i] blocks, two collectives in all (no autograd)."""
    m = torch.stack([y.max(dim=-1).values for y in ys])  # [k, B]
    comm.all_reduce_(m, "max", group)
    s = torch.stack([_sum_exp(y, m[i]) for i, y in enumerate(ys)])
    comm.all_reduce_(s, "sum", group)
    return list(m + s.log())


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_loc, t_loc, shard, group, temperature, block):  # type: ignore[override]
        n = s_loc.shape[0]
        cdt = compute_dtype(s_loc)
        lse_s = s_loc.new_empty(n, dtype=cdt)
        lse_t = s_loc.new_empty(n, dtype=cdt)
        local = s_loc.new_empty(n, dtype=cdt)
        for a, b in token_blocks(n, block):
            ys = prep_block(s_loc[a:b], shard, temperature)
            yt = prep_block(t_loc[a:b], shard, temperature)
            ls, lt = _lse_pair([ys, yt], group)
            lse_s[a:b], lse_t[a:b] = ls, lt
            local[a:b] = _kl_terms(yt - lt[:, None], ys - ls[:, None])
        comm.all_reduce_(local, "sum", group)
        ctx.save_for_backward(s_loc, t_loc, lse_s, lse_t)
        ctx.cfg = (shard, temperature, block)
        return local

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s_loc, t_loc, lse_s, lse_t = ctx.saved_tensors
        shard, temperature, block = ctx.cfg
        out = torch.empty_like(s_loc)
        for a, b in token_blocks(s_loc.shape[0], block):
            ps = (prep_block(s_loc[a:b], shard, temperature) - lse_s[a:b, None]).exp()
            pt = (prep_block(t_loc[a:b], shard, temperature) - lse_t[a:b, None]).exp()
            out[a:b] = ((ps - pt) * (grad[a:b, None] / temperature)).to(out.dtype)
        return out, None, None, None, None, None


def kl_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_T || p_S); student/teacher [N, V_pad/tp] with one shared vocabulary of real size vocab_size."""
    group = check_pair_args(student_logits, teacher_logits, temperature, reduction, group)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise LossInputError(
            f"KL needs one vocabulary: student shard has {student_logits.shape[-1]} columns, teacher "
            f"{teacher_logits.shape[-1]}; use P-KL or H-KL for a teacher with another tokenizer"
        )
    shard = make_shard(student_logits.shape[-1], vocab_size, group, "student")
    per_chunk = _VocabParallelKL.apply(
        student_logits, teacher_logits.detach(), shard, group, float(temperature), check_block(block_size)
    )
    raise_if_not_finite(per_chunk, "student/teacher logits")
    return reduce_chunks(per_chunk, reduction)
