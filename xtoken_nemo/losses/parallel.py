"""Vocab-parallel losses: logits sharded over the tensor-parallel group (method.md 3.4).

Shapes on each rank: student ``[N, V_S_pad / tp]``, teacher ``[N, V_T_pad / tp]`` (Megatron's
vocab-parallel output layout: rank r holds columns ``[r * V/tp, (r + 1) * V/tp)``); the real
vocab sizes are given so the padded columns (global id >= V) are masked out. At tp=1 (no group)
the same code is the single-device path. Every function returns the mean over chunks
(``reduction="none"``: the ``[N]`` per-chunk vector), replicated on all ranks; gradients flow to
the student logits only (the teacher is frozen: teacher logits get no gradient).

Implementation:
- KL and P-KL are explicit autograd Functions (like megatron-core's vocab-parallel cross
  entropy): the forward runs in token blocks and keeps only the per-token log-normalizers; the
  backward recomputes each block. Math helpers (``_Math``) are separate from communication
  (``comm``). bf16/fp16 logits in, fp32 accumulation, gradient returned in the input dtype.
- P-KL: each rank projects its student shard with its rows of W (``[V_S_pad/tp, V_T_pad]``
  sparse CSR): a full-width partial ``[V_T_pad, block]``, reduce-scattered so each rank gets the
  sum for exactly its teacher shard. Backward: the gradient w.r.t. the projected shard is
  all-gathered back to full width and mapped through W. The partial exists for one block at a
  time: extra memory is one ``[block, V_T]`` buffer (plus its gathered twin in backward).
- GOLD, H-KL and ULD (default ``uld_method="hist"``): one explicit autograd Function,
  ``_VocabParallelHybrid``, in reused per-block work buffers (one per side, p = exp(y - m) / S in
  place). The common-pair KL needs each side's mass per common teacher token: gathered from the
  probabilities into ``[2, COMMON_ROWS, |T_C|]`` slot buffers (the first local student partner of
  each slot by index_select, H-KL's other partners by index_add) and summed over ranks, then
  p_T log(p_T / q) in place. ULD by the layer-cake histogram (``uld_hist``), int32 bin keys
  ``KEY_ROWS`` rows at a time. Backward recomputes p_S bit-identically, writes the ULD sign and the
  common pairs' -w_c p_T / q into one gradient buffer, and applies the softmax backward in place.
  ``uld_method="sort"`` / ``uld_topk=k``: the older path, autograd-aware collectives
  (``comm.sum_autograd`` / ``comm.gather_cols_autograd``) in an activation-checkpointed per-block
  function; the uncommon probabilities are all-gathered per block and sorted; ``uld_topk=k`` is an
  approximation that sorts only each rank's k largest uncommon probabilities per side (the rest is
  treated as zero; exact when k is at least the shard width).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.checks import (
    check_logits,
    check_pairs,
    check_projection_shape,
    check_reduction,
    check_same_chunks,
    check_temperature,
    nonfinite_checks_enabled,
    reduce_chunks,
)
from xtoken_nemo.losses.reference import (
    DEFAULT_EPS,
    MERGE_MODES,
    PROB_FLOOR,
    LossParts,
    MergedChunks,
    _chunk_index,
    hkl_pairs,
    split_parts,
)
from xtoken_nemo.vocab.projection import ProjectionMatrix

DEFAULT_BLOCK = 256
ULD_METHODS = ("hist", "sort")
MASK_VALUE = -1e30  # finite: exp() underflows to exactly 0 and 0 * MASK_VALUE stays 0 (no NaN)


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


def _shard(local_width: int, vocab_size: int, group: object | None, name: str) -> Shard:
    ws, r = comm.world_size(group), comm.rank(group)
    padded = local_width * ws
    if vocab_size > padded or vocab_size <= 0:
        raise LossInputError(
            f"{name} vocab size {vocab_size} does not fit the sharded logits: {local_width} columns "
            f"per rank x {ws} ranks = {padded}; pass the real (unpadded) vocab size"
        )
    return Shard(r * local_width, local_width, vocab_size, padded)


def _cross_vocab_shards(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float,
    reduction: str,
    group: object | None,
) -> tuple[object | None, Shard, Shard]:
    """Argument checks shared by the two-vocabulary losses; (group, student shard, teacher shard)."""
    check_temperature(temperature)
    check_reduction(reduction)
    group = comm.resolve_group(group)
    _check_local("student logits", student_logits)
    _check_local("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    s_shard = _shard(student_logits.shape[-1], student_vocab_size, group, "student")
    t_shard = _shard(teacher_logits.shape[-1], teacher_vocab_size, group, "teacher")
    return group, s_shard, t_shard


def _check_local(name: str, logits: torch.Tensor) -> None:
    """Shape checks only: finiteness is checked over the whole group (one rank must not raise alone)."""
    check_logits(name, logits, finite=False)


def _check_finite_global(name: str, logits: torch.Tensor, group: object | None) -> None:
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


def _raise_if_not_finite(per_chunk: torch.Tensor, what: str) -> None:
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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Math:
    """Pure math on one block; no communication."""

    @staticmethod
    def prep(x: torch.Tensor, shard: Shard, temperature: float) -> torch.Tensor:
        """[B, width] input-dtype logits -> compute-dtype logits / T, padded columns = MASK_VALUE."""
        y = x.to(_compute_dtype(x))
        if temperature != 1.0:
            y = y / temperature
        if shard.valid < shard.width:
            padded = torch.arange(shard.width, device=y.device) >= shard.valid
            y = y.masked_fill(padded, MASK_VALUE)
        return y

    @staticmethod
    def sum_exp(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.exp(y - m[:, None]).sum(-1)

    @staticmethod
    def kl_terms(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
        """[B, n] -> [B] local part of sum p_T (log p_T - log p_S)."""
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)

    @staticmethod
    def pkl_terms_(
        log_pt: torch.Tensor, q: torch.Tensor, reached: torch.Tensor, unreached: torch.Tensor
    ) -> torch.Tensor:
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

    @staticmethod
    def pkl_grad_q_(log_pt: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """In place (overwrites both inputs; returns log_pt's buffer): d/dq of the trainable P-KL,
        -p_T / q where q > PROB_FLOOR, else 0 (unreached columns have q = 0: no gradient)."""
        keep = q > PROB_FLOOR
        return log_pt.exp_().div_(q.clamp_min_(PROB_FLOOR)).neg_().mul_(keep)

    @staticmethod
    def softmax_backward(p: torch.Tensor, g_p: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
        """d/dz of a function of p = softmax(z): p * (g_p - sum_v p g_p); ``dot`` is that sum."""
        return p * (g_p - dot[:, None])


def _lse_pair(
    ys: list[torch.Tensor], group: object | None
) -> list[torch.Tensor]:
    """Vocab-parallel log-sum-exp of several [B, n_i] blocks, two collectives in all (no autograd)."""
    m = torch.stack([y.max(dim=-1).values for y in ys])  # [k, B]
    comm.all_reduce_(m, "max", group)
    s = torch.stack([_Math.sum_exp(y, m[i]) for i, y in enumerate(ys)])
    comm.all_reduce_(s, "sum", group)
    return list(m + s.log())


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _check_block(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size <= 0:
        raise LossInputError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


# ==========================================================================================
# KL (same tokenizer)
# ==========================================================================================
class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_loc, t_loc, shard, group, temperature, block):  # type: ignore[override]
        n = s_loc.shape[0]
        cdt = _compute_dtype(s_loc)
        lse_s = s_loc.new_empty(n, dtype=cdt)
        lse_t = s_loc.new_empty(n, dtype=cdt)
        local = s_loc.new_empty(n, dtype=cdt)
        for a, b in _blocks(n, block):
            ys = _Math.prep(s_loc[a:b], shard, temperature)
            yt = _Math.prep(t_loc[a:b], shard, temperature)
            ls, lt = _lse_pair([ys, yt], group)
            lse_s[a:b], lse_t[a:b] = ls, lt
            local[a:b] = _Math.kl_terms(yt - lt[:, None], ys - ls[:, None])
        comm.all_reduce_(local, "sum", group)
        ctx.save_for_backward(s_loc, t_loc, lse_s, lse_t)
        ctx.cfg = (shard, temperature, block)
        return local

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s_loc, t_loc, lse_s, lse_t = ctx.saved_tensors
        shard, temperature, block = ctx.cfg
        out = torch.empty_like(s_loc)
        for a, b in _blocks(s_loc.shape[0], block):
            ps = (_Math.prep(s_loc[a:b], shard, temperature) - lse_s[a:b, None]).exp()
            pt = (_Math.prep(t_loc[a:b], shard, temperature) - lse_t[a:b, None]).exp()
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
    check_temperature(temperature)
    check_reduction(reduction)
    group = comm.resolve_group(group)
    _check_local("student logits", student_logits)
    _check_local("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise LossInputError(
            f"KL needs one vocabulary: student shard has {student_logits.shape[-1]} columns, teacher "
            f"{teacher_logits.shape[-1]}; use P-KL or H-KL for a teacher with another tokenizer"
        )
    shard = _shard(student_logits.shape[-1], vocab_size, group, "student")
    per_chunk = _VocabParallelKL.apply(
        student_logits, teacher_logits.detach(), shard, group, float(temperature), _check_block(block_size)
    )
    _raise_if_not_finite(per_chunk, "student/teacher logits")
    return reduce_chunks(per_chunk, reduction)


# ==========================================================================================
# P-KL
# ==========================================================================================
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
            raise LossInputError(f"W has {W.shape[1]} teacher columns, more than the teacher's padded vocab {teacher_padded}")
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

    # CSR x dense runs fastest with a contiguous vocab-major [V, B] operand; elementwise math on a
    # transposed view is several times slower than on a contiguous tensor, so both sides pay one
    # transposing copy instead.
    def partial(self, ps: torch.Tensor) -> torch.Tensor:
        """[B, V_S_pad/tp] local student probabilities -> [V_T_pad, B] partial W_local^T p_S_local."""
        return torch.sparse.mm(self.rows_t(ps.dtype, ps.device), ps.t().contiguous())

    def pull_back(self, g_q_t: torch.Tensor) -> torch.Tensor:
        """[V_T_pad, B] gradient w.r.t. the projection -> [B, V_S_pad/tp] gradient w.r.t. p_S_local."""
        return torch.sparse.mm(self.rows(g_q_t.dtype, g_q_t.device), g_q_t.contiguous()).t().contiguous()


def prepare_projection(
    W: ProjectionMatrix,
    student_local_width: int,
    teacher_local_width: int,
    group: object | None = None,
) -> LocalProjection:
    """This rank's LocalProjection for student/teacher shards of the given widths."""
    group = comm.resolve_group(group)
    shard = _shard(student_local_width, W.shape[0], group, "student")
    return LocalProjection(W, shard, teacher_local_width * comm.world_size(group))


class _VocabParallelPKL(torch.autograd.Function):
    """P-KL in vocab-major layout: every block is transposed once on load ([V/tp, B], fp32), so the
    sparse products, the reduce-scatter/all-gather (over rows) and the elementwise math all run on
    contiguous tensors; the gradient is transposed back once when written."""

    @staticmethod
    def _load(x_blk, shard, temperature, dtype):
        """[B, n] input block -> [n, B] contiguous compute-dtype logits / T, padded rows masked."""
        y = x_blk.new_empty(x_blk.shape[1], x_blk.shape[0], dtype=dtype).copy_(x_blk.t())  # always a fresh copy
        if temperature != 1.0:
            y.div_(temperature)
        if shard.valid < shard.width:
            y[shard.valid :] = MASK_VALUE
        return y

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
        cdt = _compute_dtype(s_loc)
        lse_s = s_loc.new_empty(n, dtype=cdt)
        lse_t = s_loc.new_empty(n, dtype=cdt)
        local = s_loc.new_empty(3, n, dtype=cdt)  # (reached KL, unreached sum p_T log p_T, unreached mass)
        reached, unreached = proj.column_masks(t_shard, cdt, s_loc.device)
        for a, b in _blocks(n, block):
            ys = _VocabParallelPKL._load(s_loc[a:b], s_shard, temperature, cdt)  # [n_S, B]
            yt = _VocabParallelPKL._load(t_loc[a:b], t_shard, temperature, cdt)  # [n_T, B]
            m = torch.stack([
                _VocabParallelPKL._row_max(s_loc[a:b], s_shard, temperature, cdt),
                _VocabParallelPKL._row_max(t_loc[a:b], t_shard, temperature, cdt),
            ])
            ls, lt = _VocabParallelPKL._lse_cols(ys, yt, m, group)
            lse_s[a:b], lse_t[a:b] = ls, lt
            q = _VocabParallelPKL._project(ys.sub_(ls).exp_(), proj, group)
            del ys
            local[:, a:b] = _Math.pkl_terms_(yt.sub_(lt), q, reached, unreached)
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
        for a, b in _blocks(s_loc.shape[0], block):
            cdt = lse_s.dtype
            ps = _VocabParallelPKL._load(s_loc[a:b], s_shard, temperature, cdt).sub_(lse_s[a:b]).exp_()
            log_pt = _VocabParallelPKL._load(t_loc[a:b], t_shard, temperature, cdt).sub_(lse_t[a:b])
            q = _VocabParallelPKL._project(ps, proj, group)  # recomputed, [n_T, B]
            g_q = _Math.pkl_grad_q_(log_pt, q).mul_(grad[a:b].to(cdt))  # consumes log_pt and q
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
    :class:`~xtoken_nemo.losses.reference.LossParts`, as :func:`~xtoken_nemo.losses.reference.pkl_loss_parts`).

    student [N, V_S_pad/tp], teacher [N, V_T_pad/tp], W [V_S, V_T]. The three per-chunk sums share
    the forward's one final all-reduce; ``eps`` enters only the reported constant.
    """
    group, s_shard, t_shard = _cross_vocab_shards(
        student_logits, teacher_logits, student_vocab_size, teacher_vocab_size, temperature, reduction, group
    )
    if isinstance(W, ProjectionMatrix):
        check_projection_shape(W.shape, student_vocab_size, teacher_vocab_size)
        proj = LocalProjection(W, s_shard, t_shard.padded)
    else:
        proj = W
        if (
            proj.student_shard != s_shard
            or proj.teacher_padded != t_shard.padded
            or proj.num_teacher_tokens != teacher_vocab_size
        ):
            raise LossInputError(
                "the LocalProjection was prepared for other shards/vocab sizes than these logits; "
                "call prepare_projection with this rank's logits"
            )
    reach_kl, unreach, uncovered = _VocabParallelPKL.apply(
        student_logits, teacher_logits.detach(), proj, s_shard, t_shard, group,
        float(temperature), _check_block(block_size),
    )
    _raise_if_not_finite(reach_kl, "student/teacher logits")
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
        student_logits, teacher_logits, W, student_vocab_size, teacher_vocab_size, temperature, eps,
        group, block_size, reduction,
    ).trainable


# ==========================================================================================
# GOLD, H-KL, ULD (autograd collectives, checkpointed blocks)
# ==========================================================================================
def _vp_lse(y: torch.Tensor, group: object | None) -> torch.Tensor:
    """Autograd-aware vocab-parallel log-sum-exp [B, n] -> [B] (max detached, sum-exp sum-reduced)."""
    m = y.detach().max(dim=-1).values
    comm.all_reduce_(m, "max", group)
    return m + comm.sum_autograd(torch.exp(y - m[:, None]).sum(-1), group).log()


def _vp_log_softmax(y: torch.Tensor, group: object | None) -> torch.Tensor:
    """Autograd-aware vocab-parallel log-softmax of [B, n]."""
    return y - _vp_lse(y, group)[:, None]


@dataclass
class _HybridLayout:
    """Common-set layout for this rank: which local columns are common, and where they go.

    Slots (``[0, |T_C|)``) are the common teacher tokens in increasing id order. The local student
    columns of the pairs are sorted by (slot, column) and split into the *first* local partner of
    each slot (``s_first_*``, one per slot: a gather) and the other partners (``s_extra_*``, H-KL's
    many-to-one pairs: an index-add). ``*_full``: the first partners / the teacher columns cover every
    slot in order (tp=1), so the gather writes the slot buffer directly.
    """

    num_common_teacher: int  # |T_C|, unique common teacher tokens
    s_local_cols: torch.Tensor  # local student columns in a pair, sorted by (slot, column)
    s_slot: torch.Tensor  # their slot in [0, |T_C|)
    t_local_cols: torch.Tensor  # local teacher columns in T_C (increasing)
    t_slot: torch.Tensor
    s_uncommon: torch.Tensor  # [n_S] bool: real, uncommon student columns
    t_uncommon: torch.Tensor  # [n_T] bool
    s_first_cols: torch.Tensor = None  # type: ignore[assignment]
    s_first_slot: torch.Tensor = None  # type: ignore[assignment]
    s_extra_cols: torch.Tensor = None  # type: ignore[assignment]
    s_extra_slot: torch.Tensor = None  # type: ignore[assignment]
    s_first_full: bool = False
    t_full: bool = False


def _hybrid_layout(pairs: torch.Tensor, s_shard: Shard, t_shard: Shard, device: torch.device | str = "cpu") -> _HybridLayout:
    teachers, inverse = torch.unique(pairs[:, 1], return_inverse=True)
    s_ids = pairs[:, 0]
    s_own = (s_ids >= s_shard.start) & (s_ids < s_shard.start + s_shard.width)
    t_own = (teachers >= t_shard.start) & (teachers < t_shard.start + t_shard.width)
    s_unc = torch.zeros(s_shard.width, dtype=torch.bool)
    s_unc[: s_shard.valid] = True
    s_unc[s_ids[s_own] - s_shard.start] = False
    t_unc = torch.zeros(t_shard.width, dtype=torch.bool)
    t_unc[: t_shard.valid] = True
    t_unc[teachers[t_own] - t_shard.start] = False
    tc = int(teachers.numel())
    s_cols, s_slot = s_ids[s_own] - s_shard.start, inverse[s_own]
    order = torch.argsort(s_slot * s_shard.width + s_cols)
    s_cols, s_slot = s_cols[order], s_slot[order]
    first = torch.ones_like(s_slot, dtype=torch.bool)
    first[1:] = s_slot[1:] != s_slot[:-1]
    t_slot = torch.nonzero(t_own).squeeze(1)
    return _HybridLayout(
        num_common_teacher=tc,
        s_local_cols=s_cols.to(device),
        s_slot=s_slot.to(device),
        t_local_cols=(teachers[t_own] - t_shard.start).to(device),
        t_slot=t_slot.to(device),
        s_uncommon=s_unc.to(device),
        t_uncommon=t_unc.to(device),
        s_first_cols=s_cols[first].to(device),
        s_first_slot=s_slot[first].to(device),
        s_extra_cols=s_cols[~first].to(device),
        s_extra_slot=s_slot[~first].to(device),
        s_first_full=int(first.sum()) == tc,  # slots are unique and sorted: all of them, in order
        t_full=int(t_slot.numel()) == tc,
    )


def _sorted_l1_gathered(
    us: torch.Tensor, ut: torch.Tensor, group: object | None, topk: int | None
) -> torch.Tensor:
    """[B, n_S], [B, n_T] local uncommon probabilities (zeros elsewhere) -> [B] ULD over the group."""
    if topk is not None:
        us = us.topk(min(topk, us.shape[-1]), dim=-1).values
        ut = ut.topk(min(topk, ut.shape[-1]), dim=-1).values
    gs = comm.gather_cols_autograd(us, group)
    gt = comm.gather_cols_autograd(ut, group)
    width = max(gs.shape[-1], gt.shape[-1])
    ss = torch.nn.functional.pad(gs.sort(dim=-1, descending=True).values, (0, width - gs.shape[-1]))
    st = torch.nn.functional.pad(gt.sort(dim=-1, descending=True).values, (0, width - gt.shape[-1]))
    return (ss - st).abs().sum(-1)


COMMON_ROWS = 64
"""Rows per pass of the common-pair KL: its slot buffer is [2, COMMON_ROWS, |T_C|] fp32 (about a third
of a [256, V_T] block buffer at |T_C| = 0.72 V_T), reused for every pass."""


def _slot_view(flat: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """A contiguous [2, rows, width] view of the front of a flat work buffer (collectives need contiguity)."""
    return flat[: 2 * rows * width].view(2, rows, width)


class _VocabParallelHybrid(torch.autograd.Function):
    """GOLD/H-KL/ULD with ULD by the layer-cake histogram (``uld_hist``): no sort, no autograd graph.

    Forward per block, in two reused [block, n] work buffers (one per side): p = exp(y - m) / S in
    place (m the row max, S the sum: one max and one sum all-reduce for both sides); the common
    pairs' masses in [2, rows, |T_C|] slot buffers, ``COMMON_ROWS`` rows at a time (gathered from the
    probabilities, one all-reduce each), their KL sum p_T log(p_T / q) computed in place; the ULD
    histogram counts (one all-reduce of [2, B, K] int32) and, where the counting functions cross
    inside a bin, an all-gather of those few entries. Saves per chunk m and 1/S of both sides and the
    ULD sign tables ([N, K] int8 + the contested student entries).
    Backward per block: recompute p_S with the same operations (bit-identical, so the ULD bins are
    the forward's), the ULD sign times w_u into a reused gradient buffer, the teacher's probabilities
    on its common columns only, -w_c p_T/q_C written over the student's common columns, then the
    softmax backward in place (one all-reduce of [B]).
    """

    @staticmethod
    def _probs_(y, x_blk, shard, temperature, m, inv):
        """y (a work buffer, x_blk's shape) <- softmax of x_blk / T given the row max m and 1/S."""
        y.copy_(x_blk)
        if temperature != 1.0:
            y.div_(temperature)
        if shard.valid < shard.width:
            y[:, shard.valid :] = MASK_VALUE
        if m is None:
            return y
        return y.sub_(m[:, None]).exp_().mul_(inv[:, None])

    @staticmethod
    def _masses(ps, pt, t_blk, t_stats, layout, temperature, group, both):
        """Fill both [2, r, |T_C|] with (q_C, p_T,C), summed over the group in one all-reduce.

        q_C[t] = sum of p_S over t's local student partners; p_T,C from ``pt`` if at hand (forward),
        else recomputed from the teacher logits' common columns only (``t_stats`` = (m_T, 1/S_T))."""
        q, pc = both[0], both[1]
        if layout.s_first_full:
            torch.index_select(ps, 1, layout.s_first_cols, out=q)
        else:
            q.zero_()
            if layout.s_first_cols.numel():
                q.index_copy_(1, layout.s_first_slot, ps.index_select(1, layout.s_first_cols))
        if layout.s_extra_cols.numel():
            q.index_add_(1, layout.s_extra_slot, ps.index_select(1, layout.s_extra_cols))
        if not layout.t_full:
            pc.zero_()
        if layout.t_local_cols.numel():
            if pt is not None:
                if layout.t_full:
                    torch.index_select(pt, 1, layout.t_local_cols, out=pc)
                else:
                    pc.index_copy_(1, layout.t_slot, pt.index_select(1, layout.t_local_cols))
            else:
                m_t, inv_t = t_stats
                yt = t_blk.index_select(1, layout.t_local_cols)
                yt = pc.copy_(yt) if layout.t_full else yt.to(pc.dtype)
                if temperature != 1.0:
                    yt.div_(temperature)
                yt.sub_(m_t[:, None]).exp_().mul_(inv_t[:, None])
                if not layout.t_full:
                    pc.index_copy_(1, layout.t_slot, yt)
        comm.all_reduce_(both, "sum", group)
        return q, pc

    @staticmethod
    def _scatter_common_grad_(g, r, layout):
        """g[:, common student columns] <- r [rows, |T_C|] at each column's slot."""
        if layout.s_first_cols.numel():
            src = r if layout.s_first_full else r.index_select(1, layout.s_first_slot)
            g.index_copy_(1, layout.s_first_cols, src)
        if layout.s_extra_cols.numel():
            g.index_copy_(1, layout.s_extra_cols, r.index_select(1, layout.s_extra_slot))

    @staticmethod
    def forward(ctx, s_loc, t_loc, layout, s_shard, t_shard, group, temperature, weights, eps, bits, block):  # type: ignore[override]
        from xtoken_nemo.losses import uld_hist

        H = _VocabParallelHybrid
        n = s_loc.shape[0]
        cdt = _compute_dtype(s_loc)
        rows = min(block, n)
        stats = s_loc.new_empty(4, n, dtype=cdt)  # m_S, 1/S_S, m_T, 1/S_T per chunk
        common = torch.zeros(n, dtype=torch.float64, device=s_loc.device)
        uld = torch.zeros(n, dtype=torch.float64, device=s_loc.device)
        w_c, w_u = weights
        use_common = bool(layout.num_common_teacher) and w_c != 0.0
        ws_s = s_loc.new_empty(rows, s_loc.shape[1], dtype=cdt)
        ws_t = s_loc.new_empty(rows, t_loc.shape[1], dtype=cdt)
        cr = min(COMMON_ROWS, rows)
        slots = s_loc.new_empty(2 * cr * layout.num_common_teacher, dtype=cdt) if use_common else None
        key_rows = uld_hist.KEY_ROWS
        keys = uld_hist.key_scratch(min(rows, key_rows), max(s_loc.shape[1], t_loc.shape[1]), s_loc.device)
        mask_s, mask_t = ~layout.s_uncommon, ~layout.t_uncommon
        blocks = []
        for a, b in _blocks(n, block):
            r = b - a
            ys = H._probs_(ws_s[:r], s_loc[a:b], s_shard, temperature, None, None)
            yt = H._probs_(ws_t[:r], t_loc[a:b], t_shard, temperature, None, None)
            m = torch.stack([ys.max(dim=-1).values, yt.max(dim=-1).values])
            comm.all_reduce_(m, "max", group)
            ys.sub_(m[0][:, None]).exp_()
            yt.sub_(m[1][:, None]).exp_()
            inv = torch.stack([ys.sum(-1), yt.sum(-1)])
            comm.all_reduce_(inv, "sum", group)
            inv = inv.reciprocal_()
            ps = ys.mul_(inv[0][:, None])
            pt = yt.mul_(inv[1][:, None])
            stats[:, a:b] = torch.stack([m[0], inv[0], m[1], inv[1]])
            if use_common:
                for r0 in range(0, r, cr):
                    r1 = min(r, r0 + cr)
                    q, pc = H._masses(ps[r0:r1], pt[r0:r1], None, None, layout, temperature, group, _slot_view(slots, r1 - r0, layout.num_common_teacher))
                    # sum_t p_T log(p_T / max(q, eps)), in place in q's buffer (0 where p_T = 0)
                    kl = torch.xlogy(pc, torch.div(pc, q.clamp_min_(eps), out=q), out=q)
                    common[a + r0 : a + r1] = kl.sum(-1).double()
            blk = uld_hist.uld_block(
                ps.masked_fill_(mask_s, 0.0), pt.masked_fill_(mask_t, 0.0), group, bits, rows=key_rows, scratch=keys
            )
            uld[a:b] = blk.partial
            blk.partial = None
            blocks.append(blk)
        del ws_s, ws_t, slots, keys
        comm.all_reduce_(uld, "sum", group)
        ctx.save_for_backward(s_loc, t_loc, stats)
        ctx.cfg = (layout, s_shard, t_shard, group, temperature, weights, eps, bits, block)
        ctx.blocks = blocks
        return (w_c * common + w_u * uld).to(cdt)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from xtoken_nemo.losses import uld_hist

        H = _VocabParallelHybrid
        s_loc, t_loc, stats = ctx.saved_tensors
        layout, s_shard, t_shard, group, temperature, weights, eps, bits, block = ctx.cfg
        w_c, w_u = weights
        use_common = bool(layout.num_common_teacher) and w_c != 0.0
        n = s_loc.shape[0]
        cdt = stats.dtype
        rows = min(block, n)
        out = torch.empty_like(s_loc)
        ws_s = s_loc.new_empty(rows, s_loc.shape[1], dtype=cdt)
        ws_g = s_loc.new_empty(rows, s_loc.shape[1], dtype=cdt)
        cr = min(COMMON_ROWS, rows)
        slots = s_loc.new_empty(2 * cr * layout.num_common_teacher, dtype=cdt) if use_common else None
        key_rows = uld_hist.KEY_ROWS
        keys = uld_hist.key_scratch(min(rows, key_rows), s_loc.shape[1], s_loc.device)
        mask_s = ~layout.s_uncommon
        for i, (a, b) in enumerate(_blocks(n, block)):
            r = b - a
            ps = H._probs_(ws_s[:r], s_loc[a:b], s_shard, temperature, stats[0, a:b], stats[1, a:b])
            # ULD sign on every column; the common columns are overwritten below (or zeroed)
            g = uld_hist.uld_grad(ps, ctx.blocks[i], bits, out=ws_g[:r], rows=key_rows, scratch=keys)
            if w_u != 1.0:
                g.mul_(w_u)
            if use_common:
                for r0 in range(0, r, cr):
                    r1 = min(r, r0 + cr)
                    q, pc = H._masses(
                        ps[r0:r1], None, t_loc[a + r0 : a + r1], (stats[2, a + r0 : a + r1], stats[3, a + r0 : a + r1]),
                        layout, temperature, group, _slot_view(slots, r1 - r0, layout.num_common_teacher),
                    )
                    small = q.clamp_min_(eps) <= eps  # q <= eps: no gradient (as the reference's clamp)
                    ratio = pc.div_(q).mul_(-w_c).masked_fill_(small, 0.0)  # d/dq of -w_c p_T log q
                    H._scatter_common_grad_(g[r0:r1], ratio, layout)
            elif layout.num_common_teacher:
                g.masked_fill_(mask_s & torch.arange(g.shape[1], device=g.device).lt(s_shard.valid), 0.0)
            dot = torch.bmm(ps.unsqueeze(1), g.unsqueeze(2)).view(r)
            comm.all_reduce_(dot, "sum", group)
            g.sub_(dot[:, None]).mul_(ps).mul_((grad[a:b] / temperature)[:, None].to(g.dtype))
            out[a:b] = g
        return (out,) + (None,) * 10


def _hybrid_block(
    s_blk: torch.Tensor,
    t_blk: torch.Tensor,
    layout: _HybridLayout,
    s_shard: Shard,
    t_shard: Shard,
    group: object | None,
    temperature: float,
    weights: tuple[float, float],
    eps: float,
    uld_topk: int | None,
) -> torch.Tensor:
    """[B] this rank's partial of the GOLD/H-KL loss of one block (sum over ranks = the loss)."""
    ws = comm.world_size(group)
    log_ps = _vp_log_softmax(_Math.prep(s_blk, s_shard, temperature), group)
    with torch.no_grad():
        log_pt = _vp_log_softmax(_Math.prep(t_blk, t_shard, temperature).to(log_ps.dtype), group)
    ps, pt = log_ps.exp(), log_pt.exp()
    b = ps.shape[0]
    # common term: both sides' mass per common teacher token, summed over ranks
    q_c = ps.new_zeros(b, layout.num_common_teacher).index_add(1, layout.s_slot, ps[:, layout.s_local_cols])
    q_c = comm.sum_autograd(q_c, group)
    pt_c = ps.new_zeros(b, layout.num_common_teacher)
    pt_c[:, layout.t_slot] = pt[:, layout.t_local_cols]
    comm.all_reduce_(pt_c, "sum", group)
    common = (torch.xlogy(pt_c, pt_c) - torch.xlogy(pt_c, q_c.clamp_min(eps))).sum(-1)
    # uncommon term: ULD over the group (zeros in place of common/padded columns: same L1)
    uld = _sorted_l1_gathered(ps * layout.s_uncommon, pt * layout.t_uncommon, group, uld_topk)
    w_c, w_u = weights
    return (w_c * common + w_u * uld) / ws  # replicated on every rank -> each owns 1/ws


def gold_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    common_pairs: torch.Tensor,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = PROB_FLOOR,
    uld_topk: int | None = None,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
    uld_method: str = "hist",
) -> torch.Tensor:
    """GOLD (KL on common pairs + ULD on the rest) on vocab-sharded logits; semantics as the reference.

    ``uld_method``: "hist" (default) computes ULD without sorting (``uld_hist``: the layer-cake form
    on a log grid, same value and gradient as the sort up to float rounding); "sort" all-gathers and
    sorts the uncommon probabilities (the old exact path, for checking). ``uld_topk=k`` (top-k per
    rank, an approximation) always takes the sort path.
    """
    from xtoken_nemo.losses.reference import _hybrid_weights

    group, s_shard, t_shard = _cross_vocab_shards(
        student_logits, teacher_logits, student_vocab_size, teacher_vocab_size, temperature, reduction, group
    )
    pairs = check_pairs(common_pairs, student_vocab_size, teacher_vocab_size)
    if uld_topk is not None and (not isinstance(uld_topk, int) or uld_topk <= 0):
        raise LossInputError(f"uld_topk must be a positive int or None, got {uld_topk!r}")
    _check_finite_global("student logits", student_logits.detach(), group)
    _check_finite_global("teacher logits", teacher_logits.detach(), group)
    layout = _hybrid_layout(pairs, s_shard, t_shard, student_logits.device)
    weights = _hybrid_weights(weighting, layout.num_common_teacher, teacher_vocab_size)
    teacher = teacher_logits.detach()
    block = _check_block(block_size)
    if uld_method not in ULD_METHODS:
        raise LossInputError(f"uld_method must be one of {ULD_METHODS}, got {uld_method!r}")
    if uld_method == "hist" and uld_topk is None:
        from xtoken_nemo.losses.uld_hist import DEFAULT_GRID_BITS

        per_chunk = _VocabParallelHybrid.apply(
            student_logits, teacher, layout, s_shard, t_shard, group, float(temperature), weights, float(eps),
            DEFAULT_GRID_BITS, block,
        )
        return reduce_chunks(per_chunk, reduction)
    parts = []
    for a, b in _blocks(student_logits.shape[0], block):
        args = (layout, s_shard, t_shard, group, float(temperature), weights, float(eps), uld_topk)
        if torch.is_grad_enabled() and student_logits.requires_grad:
            part = checkpoint(_hybrid_block, student_logits[a:b], teacher[a:b], *args, use_reentrant=False)
        else:
            part = _hybrid_block(student_logits[a:b], teacher[a:b], *args)
        parts.append(part)
    per_chunk = comm.sum_partials(torch.cat(parts), group)
    return reduce_chunks(per_chunk, reduction)


def hkl_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    min_weight: float = 0.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = PROB_FLOOR,
    uld_topk: int | None = None,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
    uld_method: str = "hist",
) -> torch.Tensor:
    """H-KL: GOLD with W's argmax pairs as the common set (pass W or precomputed ``hkl_pairs(W)``)."""
    check_projection_shape(W.shape, student_vocab_size, teacher_vocab_size)
    return gold_loss_parallel(
        student_logits, teacher_logits, hkl_pairs(W, min_weight), student_vocab_size, teacher_vocab_size,
        temperature, weighting, eps, uld_topk, group, block_size, reduction, uld_method,
    )


def uld_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    uld_topk: int | None = None,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
    reduction: str = "mean",
    uld_method: str = "hist",
) -> torch.Tensor:
    """ULD on vocab-sharded logits: GOLD with an empty common set and only the ULD term."""
    return gold_loss_parallel(
        student_logits, teacher_logits, torch.zeros(0, 2, dtype=torch.int64), student_vocab_size,
        teacher_vocab_size, temperature, (0.0, 1.0), PROB_FLOOR, uld_topk, group, block_size, reduction,
        uld_method,
    )


# ==========================================================================================
# Chunk merge and teacher confidence on sharded logits
# ==========================================================================================
def _chain_log_mass(
    logits: torch.Tensor, pos: torch.Tensor, cid: torch.Tensor, first: torch.Tensor, n: int,
    targets, shard: Shard, group: object | None,
) -> torch.Tensor:
    """[N] sum over each chunk's later positions of log p(actual next token); replicated."""
    if targets is None:
        raise LossInputError("chain merge needs the target token ids (the actual next tokens)")
    targets = torch.as_tensor(targets, dtype=torch.int64)
    later = pos != first[cid]
    lp, lc = pos[later], cid[later]
    # only the later positions' rows are touched: single-token chunks cost nothing here (their
    # log-mass is exactly 0, which chunk_mass_kl_parts reads as "no rest bucket on this side")
    y = _Math.prep(logits[lp], shard, 1.0)  # [L, width]
    tgt = (targets[lp] - shard.start).to(y.device)
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
    return y.new_zeros(n).index_add(0, lc.to(y.device), picked)


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
    group = comm.resolve_group(group)
    _check_local("per-position logits", logits)
    shard = _shard(logits.shape[-1], vocab_size, group, "logits")
    pos, cid = _chunk_index(chunks, logits.shape[0])
    first = torch.tensor([int(c[0]) for c in chunks], dtype=torch.int64)
    return _chain_log_mass(logits, pos, cid, first, len(chunks), targets, shard, group)


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
    group = comm.resolve_group(group)
    _check_local("per-position logits", logits)
    _check_finite_global("per-position logits", logits.detach(), group)
    shard = _shard(logits.shape[-1], vocab_size, group, "logits")
    pos, cid = _chunk_index(chunks, logits.shape[0])
    n = len(chunks)
    first = torch.tensor([int(c[0]) for c in chunks], dtype=torch.int64)
    if mode in ("first", "chain"):
        first_logp = _vp_log_softmax(_Math.prep(logits[first], shard, 1.0), group)
        if mode == "first":
            return MergedChunks(first_logp, first_logp.new_zeros(n))
        return MergedChunks(first_logp, _chain_log_mass(logits, pos, cid, first, n, targets, shard, group))
    y = _Math.prep(logits, shard, 1.0)
    cid = cid.to(y.device)
    counts = torch.bincount(cid, minlength=n).to(y.dtype)
    logp = _vp_log_softmax(y[pos], group)
    mean = y.new_zeros(n, y.shape[1]).index_add(0, cid, logp) / counts[:, None]
    if shard.valid < shard.width:
        mean = mean.masked_fill(torch.arange(shard.width, device=mean.device) >= shard.valid, MASK_VALUE)
    lse = _vp_lse(mean, group)
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
    from xtoken_nemo.losses.weighting import CONFIDENCE_KINDS

    if kind not in CONFIDENCE_KINDS:
        raise LossInputError(f"unknown confidence {kind!r}; choose one of {CONFIDENCE_KINDS}")
    group = comm.resolve_group(group)
    _check_local("teacher logits", teacher_logits)
    _check_finite_global("teacher logits", teacher_logits.detach(), group)
    shard = _shard(teacher_logits.shape[-1], vocab_size, group, "teacher")
    with torch.no_grad():
        y = _Math.prep(teacher_logits, shard, 1.0)
        logp = _vp_log_softmax(y, group)
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


__all__ = [
    "DEFAULT_BLOCK",
    "ULD_METHODS",
    "chunk_log_mass_parallel",
    "LocalProjection",
    "Shard",
    "gold_loss_parallel",
    "hkl_loss_parallel",
    "kl_loss_parallel",
    "merge_chunks_parallel",
    "pkl_loss_parallel",
    "pkl_loss_parallel_parts",
    "prepare_projection",
    "teacher_confidence_parallel",
    "uld_loss_parallel",
]
