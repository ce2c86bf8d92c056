"""NVIDIA's P-KL value on vocab-parallel shards: what the dynamic KD/CE scale divides by under
``train.kd_scale_value="paper"`` (docs/losses.md, "Which value sets the dynamic scale"). No
gradient: it only sets the scale; the loss that trains is :mod:`xtoken_nemo.losses.pkl`'s.

The unsharded definition (NeMo-RL's X-Token P-KL, without its T^2 factor) and the oracle of the
tests is :func:`xtoken_nemo.losses.reference.paper_pkl_value`. Shapes on each rank: student
``[N, V_S_pad/tp]``, teacher ``[N, V_T_pad/tp]``, W as :class:`~xtoken_nemo.losses.pkl.LocalProjection`
(or the full ProjectionMatrix); the result is replicated on every rank.

1. The teacher columns K: the ``min(topk, V_T)`` largest per-column maxima over the N rows (padded
   columns excluded; ties to the lower id). Each rank takes its local top-k, the candidates are
   all-gathered (one collective of ``[k, 2]``) in id order and the top-k of those is taken again.
2. Per token block, in the vocab-major layout of the P-KL (``[V/tp, B]``): the student softmax
   over its whole vocabulary, q = W^T p_S for this rank's teacher shard (CSR product and
   reduce-scatter, as the P-KL forward), the teacher log-softmax renormalised over K, sum_K q
   (all-reduced), and this rank's partial of sum_K p_T (log p_T - log(q / (sum_K q + eps) + eps)).
   The partials of all blocks are summed over the ranks in one final all-reduce.
"""

from __future__ import annotations

import torch

from xtoken_nemo.losses import comm
from xtoken_nemo.losses.checks import check_topk, reduce_chunks
from xtoken_nemo.losses.common import (
    DEFAULT_BLOCK,
    MASK_VALUE,
    PAPER_EPS,
    PAPER_TOPK,
    compute_dtype,
    top_columns,
)
from xtoken_nemo.losses.pkl import LocalProjection, load_vocab_major, local_projection
from xtoken_nemo.losses.shard import Shard, check_block, cross_vocab_shards, raise_if_not_finite, token_blocks
from xtoken_nemo.vocab.projection import ProjectionMatrix


def select_teacher_columns(teacher_logits: torch.Tensor, shard: Shard, k: int, group: object | None) -> torch.Tensor:
    """[n_T] bool: this rank's columns among the k teacher columns of largest max logit over the
    rows (the same global set on every rank as :func:`~xtoken_nemo.losses.common.top_columns` on
    the unsharded logits)."""
    dev = teacher_logits.device
    candidates = torch.full((k, 2), float("-inf"), dtype=torch.float64, device=dev)  # (value, global id)
    candidates[:, 1] = -1.0
    if shard.valid > 0:
        importance = teacher_logits[:, : shard.valid].amax(dim=0)
        local = top_columns(importance, min(k, shard.valid))  # ascending local ids
        candidates[: local.numel(), 0] = importance[local].to(torch.float64)
        candidates[: local.numel(), 1] = (local + shard.start).to(torch.float64)
    gathered = comm.all_gather_rows(candidates, group)  # rank order: real ids ascending
    # the padding (-inf) loses to every real candidate (there are >= k); no boolean indexing, so
    # nothing here waits for the device
    ids = gathered[top_columns(gathered[:, 0], k), 1].to(torch.int64) - shard.start
    ids = torch.where((ids >= 0) & (ids < shard.width), ids, shard.width)  # other ranks' -> a spare slot
    return torch.zeros(shard.width + 1, dtype=torch.bool, device=dev).index_fill_(0, ids, True)[: shard.width]


def paper_pkl_value_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | LocalProjection,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    topk: int = PAPER_TOPK,
    eps: float = PAPER_EPS,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
) -> torch.Tensor:
    """NVIDIA's P-KL value (detached; per chunk [N] or its mean) on this rank's vocab shards:
    student [N, V_S_pad/tp], teacher [N, V_T_pad/tp], W [V_S, V_T]. Equals
    :func:`~xtoken_nemo.losses.reference.paper_pkl_value` on the gathered real columns."""
    group, s_shard, t_shard = cross_vocab_shards(
        student_logits, teacher_logits, student_vocab_size, teacher_vocab_size, temperature, reduction, group
    )
    check_topk(topk)
    proj = local_projection(W, s_shard, t_shard)
    block = check_block(block_size)
    with torch.no_grad():
        s_loc, t_loc = student_logits.detach(), teacher_logits.detach()
        n, dev, cdt = s_loc.shape[0], s_loc.device, compute_dtype(s_loc)
        selected = select_teacher_columns(t_loc, t_shard, min(topk, teacher_vocab_size), group)
        sel = selected.to(cdt)
        w_t = proj.rows_t(cdt, dev)
        out = s_loc.new_zeros(n, dtype=cdt)
        for a, b in token_blocks(n, block):
            ys = load_vocab_major(s_loc[a:b], s_shard, temperature, cdt)  # [n_S, B]
            # [n_T, B], only K's columns (K holds no padded column)
            yt = load_vocab_major(t_loc[a:b], t_shard, temperature, cdt).masked_fill_(~selected[:, None], MASK_VALUE)
            m = torch.stack([ys.amax(0), yt.amax(0)])
            comm.all_reduce_(m, "max", group)
            z = torch.stack([(ys - m[0]).exp_().sum(0), (yt - m[1]).exp_().sum(0)])
            comm.all_reduce_(z, "sum", group)
            lse = m + z.log()
            q = comm.reduce_scatter_rows(torch.sparse.mm(w_t, ys.sub_(lse[0]).exp_()), group)  # [n_T, B]
            del ys
            mass = sel @ q  # [B] this rank's part of sum_K q
            comm.all_reduce_(mass, "sum", group)
            log_q = q.div_(mass + eps).add_(eps).log_()
            log_pt = yt.sub_(lse[1])
            pt = log_pt.exp()  # 0 on the columns outside K
            out[a:b] = sel @ log_pt.sub_(log_q).mul_(pt)  # p_T (log p_T - log q), in yt's buffer
            del yt, q, pt
        comm.all_reduce_(out, "sum", group)
    raise_if_not_finite(out, "student/teacher logits")
    return reduce_chunks(out, reduction)
