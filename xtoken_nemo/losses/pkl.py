"""Vocab-parallel P-KL: KL(p_T || W^T p_S) on vocab-sharded logits (docs/method.md, "P-KL" and
"Tensor-parallel form").

Shapes on each rank: student ``[N, V_S_pad / tp]``, teacher ``[N, V_T_pad / tp]``, W
``[V_S, V_T]`` (shard conventions in :mod:`xtoken_nemo.losses.shard`). Each rank projects its
student shard with its rows of W (:class:`LocalProjection`, ``[V_S_pad/tp, V_T_pad]`` sparse CSR):
a full-width partial ``[V_T_pad, block]``, reduce-scattered so each rank gets the sum for exactly
its teacher shard. Backward: the gradient w.r.t. the projected shard is all-gathered back to full
width and mapped through W. The partial exists for one block at a time: extra memory is one
``[block, V_T]`` buffer (plus its gathered twin in backward).

An explicit autograd Function, ``_VocabParallelPKL``: the forward runs in token blocks and keeps
only the per-token log-normalizers; the backward recomputes each block. The loss is split into
the part that trains, the constant and the uncovered teacher mass
(:class:`~xtoken_nemo.losses.common.LossParts`); the unsharded oracle is
:func:`xtoken_nemo.losses.reference.pkl_loss_parts`.
"""

from __future__ import annotations

import math
import warnings

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.checks import check_projection_shape
from xtoken_nemo.losses.common import (
    DEFAULT_BLOCK,
    DEFAULT_EPS,
    MASK_VALUE,
    PROB_FLOOR,
    LossParts,
    compute_dtype,
    split_parts,
)
from xtoken_nemo.losses.shard import (
    Shard,
    check_block,
    cross_vocab_shards,
    make_shard,
    raise_if_not_finite,
    token_blocks,
)
from xtoken_nemo.vocab.projection import ProjectionMatrix


class LocalProjection:
    """This rank's rows of W as sparse CSR: ``[V_S_pad/tp, V_T_pad]`` and its transpose.

    Build once per (W, tp rank) and pass it to :func:`pkl_loss_parallel` (passing the full
    ProjectionMatrix works too, it is then sharded on every call).
    """

    def __init__(self, W: ProjectionMatrix, student_shard: Shard, teacher_padded: int):
        if W.shape[0] != student_shard.vocab_size:
            raise LossInputError(
                f"W has {W.shape[0]} student rows but the student logits have vocab {student_shard.vocab_size}; "
                "W must be built for exactly these tokenizers"
            )
        if W.shape[1] > teacher_padded:
            raise LossInputError(
                f"W has {W.shape[1]} teacher columns, more than the teacher's padded vocab {teacher_padded}"
            )
        if bool((W.values < 0).any()) or not bool(torch.isfinite(W.values).all()):
            raise LossInputError("W has negative or non-finite weights; a projection matrix must be non-negative")
        self.student_shard = student_shard
        self.teacher_padded = teacher_padded
        self.num_teacher_tokens = W.shape[1]
        # [V_T_pad] teacher columns some row of the FULL W reaches (not only this rank's rows)
        reached = torch.zeros(teacher_padded, dtype=torch.bool)
        reached[W.indices[(W.indices >= 0) & (W.values != 0)]] = True
        self._reached = reached
        self._masks: dict = {}
        a = student_shard.start
        b = min(student_shard.start + student_shard.width, W.shape[0])
        idx, val = W.indices[a:b], W.values[a:b]
        mask = (idx >= 0) & (val != 0)
        rows = torch.arange(b - a)[:, None].expand_as(idx)[mask]
        cols = idx[mask]
        shape = (student_shard.width, teacher_padded)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" / invariant-check notices
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), val[mask], shape).coalesce()
            self._csr = {torch.float32: coo.to_sparse_csr()}
            coo_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), val[mask], shape[::-1]).coalesce()
            self._csr_t = {torch.float32: coo_t.to_sparse_csr()}

    def column_masks(self, t_shard: Shard, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_T], [n_T]) 0/1 vectors of this teacher shard: reached by W / real and not reached."""
        key = (t_shard.start, t_shard.width, dtype, str(torch.device(device)))
        if key not in self._masks:
            reached = self._reached[t_shard.start : t_shard.start + t_shard.width]
            real = torch.arange(t_shard.width) < t_shard.valid
            self._masks[key] = (
                reached.to(device=device, dtype=dtype),
                ((~reached) & real).to(device=device, dtype=dtype),
            )
        return self._masks[key]

    def rows(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """[V_S_pad/tp, V_T_pad] CSR on ``device`` (cached per dtype and device)."""
        return self._cached(self._csr, dtype, device)

    def rows_t(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """[V_T_pad, V_S_pad/tp] CSR on ``device`` (cached per dtype and device)."""
        return self._cached(self._csr_t, dtype, device)

    @staticmethod
    def _cached(cache: dict, dtype: torch.dtype, device) -> torch.Tensor:
        key = (dtype, str(torch.device(device)))
        if key not in cache:
            cache[key] = cache[torch.float32].to(device=device, dtype=dtype)
        return cache[key]


def prepare_projection(
    W: ProjectionMatrix,
    student_local_width: int,
    teacher_local_width: int,
    group: object | None = None,
) -> LocalProjection:
    """This rank's LocalProjection for student/teacher shards of the given widths."""
    group = comm.resolve_group(group)
    shard = make_shard(student_local_width, W.shape[0], group, "student")
    return LocalProjection(W, shard, teacher_local_width * comm.world_size(group))


def local_projection(W: ProjectionMatrix | LocalProjection, s_shard: Shard, t_shard: Shard) -> LocalProjection:
    """W as this rank's LocalProjection for these shards: built from a ProjectionMatrix, or a given
    LocalProjection checked against them (LossInputError if it was prepared for other shards)."""
    if isinstance(W, ProjectionMatrix):
        check_projection_shape(W.shape, s_shard.vocab_size, t_shard.vocab_size)
        return LocalProjection(W, s_shard, t_shard.padded)
    if W.student_shard != s_shard or W.teacher_padded != t_shard.padded or W.num_teacher_tokens != t_shard.vocab_size:
        raise LossInputError(
            "the LocalProjection was prepared for other shards/vocab sizes than these logits; "
            "call prepare_projection with this rank's logits"
        )
    return W


def _pkl_terms_(log_pt: torch.Tensor, q: torch.Tensor, reached: torch.Tensor, unreached: torch.Tensor) -> torch.Tensor:
    """In-place (overwrites both) [n, B] -> [3, B]: this rank's partial of (KL over the reached
    columns, sum p_T log p_T over the real unreached ones, teacher mass on those).

    reached/unreached: [n] 0/1 vectors (padded columns in neither). On unreached columns q = 0
    exactly, so the floor gives p_T (log p_T - log PROB_FLOOR) there; the caller swaps the floor
    for eps in the reported constant. The masked sums are matrix-vector products: no [n, B]
    temporary beyond the two inputs.
    """
    d = torch.sub(log_pt, q.clamp_min_(PROB_FLOOR).log_(), out=q)
    pt = log_pt.exp_()
    uncovered = unreached @ pt
    terms = d.mul_(pt)
    out = torch.stack([reached @ terms, unreached @ terms, uncovered])
    out[1] += math.log(PROB_FLOOR) * uncovered  # back to sum p_T log p_T
    return out


def _pkl_grad_q_(log_pt: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """In place (overwrites both inputs; returns log_pt's buffer): d/dq of the trainable P-KL,
    -p_T / q where q > PROB_FLOOR, else 0 (unreached columns have q = 0: no gradient)."""
    keep = q > PROB_FLOOR
    return log_pt.exp_().div_(q.clamp_min_(PROB_FLOOR)).neg_().mul_(keep)


def load_vocab_major(x_blk: torch.Tensor, shard: Shard, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, n] input block -> [n, B] contiguous compute-dtype logits / T, padded rows masked (the
    P-KL layout; NVIDIA's P-KL value in :mod:`xtoken_nemo.losses.paper_pkl` loads the same way)."""
    y = x_blk.new_empty(x_blk.shape[1], x_blk.shape[0], dtype=dtype).copy_(x_blk.t())  # always a fresh copy
    if temperature != 1.0:
        y.div_(temperature)
    if shard.valid < shard.width:
        y[shard.valid :] = MASK_VALUE
    return y


# CSR x dense runs fastest with a contiguous vocab-major [V, B] operand; elementwise math on a
# transposed view is several times slower than on a contiguous tensor, so both sides pay one
# transposing copy instead.
class _VocabParallelPKL(torch.autograd.Function):
    """P-KL in vocab-major layout: every block is transposed once on load ([V/tp, B], fp32), so the
    sparse products, the reduce-scatter/all-gather (over rows) and the elementwise math all run on
    contiguous tensors; the gradient is transposed back once when written."""

    @staticmethod
    def _row_max(x_blk, shard, temperature, dtype):
        """[B] max over this rank's real columns, from the row-major input (fast inner reduction)."""
        if shard.valid == 0:
            return x_blk.new_full((x_blk.shape[0],), MASK_VALUE, dtype=dtype)
        return x_blk[:, : shard.valid].amax(dim=-1).to(dtype) / temperature

    @staticmethod
    def _lse_cols(ys, yt, m, group):
        """Vocab-parallel log-sum-exp over dim 0 of two [n_i, B] blocks given local maxima m [2, B]."""
        comm.all_reduce_(m, "max", group)
        z = torch.stack([(ys - m[0]).exp_().sum(0), (yt - m[1]).exp_().sum(0)])  # one temporary each
        comm.all_reduce_(z, "sum", group)
        lse = m + z.log()
        return lse[0], lse[1]

    @staticmethod
    def _project(ps_t, proj, group):
        """[n_S, B] -> [n_T, B]: this rank's teacher shard of W^T p_S (reduce-scatter of the partial)."""
        return comm.reduce_scatter_rows(torch.sparse.mm(proj.rows_t(ps_t.dtype, ps_t.device), ps_t), group)

    @staticmethod
    def forward(ctx, s_loc, t_loc, proj, s_shard, t_shard, group, temperature, block):  # type: ignore[override]
        n = s_loc.shape[0]
        cdt = compute_dtype(s_loc)
        lse_s = s_loc.new_empty(n, dtype=cdt)
        lse_t = s_loc.new_empty(n, dtype=cdt)
        local = s_loc.new_empty(3, n, dtype=cdt)  # (reached KL, unreached sum p_T log p_T, unreached mass)
        reached, unreached = proj.column_masks(t_shard, cdt, s_loc.device)
        for a, b in token_blocks(n, block):
            ys = load_vocab_major(s_loc[a:b], s_shard, temperature, cdt)  # [n_S, B]
            yt = load_vocab_major(t_loc[a:b], t_shard, temperature, cdt)  # [n_T, B]
            m = torch.stack(
                [
                    _VocabParallelPKL._row_max(s_loc[a:b], s_shard, temperature, cdt),
                    _VocabParallelPKL._row_max(t_loc[a:b], t_shard, temperature, cdt),
                ]
            )
            ls, lt = _VocabParallelPKL._lse_cols(ys, yt, m, group)
            lse_s[a:b], lse_t[a:b] = ls, lt
            q = _VocabParallelPKL._project(ys.sub_(ls).exp_(), proj, group)
            del ys
            local[:, a:b] = _pkl_terms_(yt.sub_(lt), q, reached, unreached)
            del yt, q
        comm.all_reduce_(local, "sum", group)  # one collective for the three
        ctx.save_for_backward(s_loc, t_loc, lse_s, lse_t)
        ctx.cfg = (proj, s_shard, t_shard, group, temperature, block)
        reach_kl, unreach, uncovered = (x.clone() for x in local)  # three outputs, not views of one
        ctx.mark_non_differentiable(unreach, uncovered)
        return reach_kl, unreach, uncovered

    @staticmethod
    def backward(ctx, grad, _grad_const, _grad_uncovered):  # type: ignore[override]
        s_loc, t_loc, lse_s, lse_t = ctx.saved_tensors
        proj, s_shard, t_shard, group, temperature, block = ctx.cfg
        out = torch.empty_like(s_loc)
        for a, b in token_blocks(s_loc.shape[0], block):
            cdt = lse_s.dtype
            ps = load_vocab_major(s_loc[a:b], s_shard, temperature, cdt).sub_(lse_s[a:b]).exp_()
            log_pt = load_vocab_major(t_loc[a:b], t_shard, temperature, cdt).sub_(lse_t[a:b])
            q = _VocabParallelPKL._project(ps, proj, group)  # recomputed, [n_T, B]
            g_q = _pkl_grad_q_(log_pt, q).mul_(grad[a:b].to(cdt))  # consumes log_pt and q
            del log_pt, q
            g_ps = torch.sparse.mm(proj.rows(cdt, g_q.device), comm.all_gather_rows(g_q, group))  # [n_S, B]
            del g_q
            dot = (ps * g_ps).sum(0)
            comm.all_reduce_(dot, "sum", group)
            g = g_ps.sub_(dot).mul_(ps)
            if temperature != 1.0:
                g.div_(temperature)
            out[a:b] = g.t()
        return out, None, None, None, None, None, None, None


def pkl_loss_parallel_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | LocalProjection,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
) -> LossParts:
    """P-KL split into trainable part, constant and uncovered teacher mass (replicated
    :class:`~xtoken_nemo.losses.common.LossParts`, as :func:`~xtoken_nemo.losses.reference.pkl_loss_parts`).

    student [N, V_S_pad/tp], teacher [N, V_T_pad/tp], W [V_S, V_T]. The three per-chunk sums share
    the forward's one final all-reduce; ``eps`` enters only the reported constant.
    """
    group, s_shard, t_shard = cross_vocab_shards(
        student_logits, teacher_logits, student_vocab_size, teacher_vocab_size, temperature, reduction, group
    )
    proj = local_projection(W, s_shard, t_shard)
    reach_kl, unreach, uncovered = _VocabParallelPKL.apply(
        student_logits,
        teacher_logits.detach(),
        proj,
        s_shard,
        t_shard,
        group,
        float(temperature),
        check_block(block_size),
    )
    raise_if_not_finite(reach_kl, "student/teacher logits")
    parts = split_parts(reach_kl, unreach - uncovered * math.log(eps), uncovered)
    return parts.reduce(reduction)


def pkl_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | LocalProjection,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
) -> torch.Tensor:
    """P-KL: KL(p_T || W^T p_S), its trainable part (teacher columns no W row reaches left out).
    student [N, V_S_pad/tp], teacher [N, V_T_pad/tp], W [V_S, V_T]."""
    return pkl_loss_parallel_parts(
        student_logits,
        teacher_logits,
        W,
        student_vocab_size,
        teacher_vocab_size,
        temperature,
        eps,
        group,
        block_size,
        reduction,
    ).trainable
