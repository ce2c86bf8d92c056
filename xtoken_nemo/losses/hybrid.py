"""Vocab-parallel GOLD, H-KL and ULD: KL on the common pairs plus ULD (sorted L1) on the uncommon
rest, on vocab-sharded logits (docs/method.md, "GOLD", "H-KL", "ULD and the histogram ULD" and
"Tensor-parallel form").

Shapes on each rank: student ``[N, V_S_pad / tp]``, teacher ``[N, V_T_pad / tp]``, common pairs
``[P, 2]`` (student_id, teacher_id) (shard conventions in :mod:`xtoken_nemo.losses.shard`); the
semantics are the reference's (:func:`xtoken_nemo.losses.reference.gold_loss`).

- Default ``uld_method="hist"``: one explicit autograd Function, ``_VocabParallelHybrid``, in
  reused per-block work buffers (one per side, p = exp(y - m) / S in place). The common-pair KL
  needs each side's mass per common teacher token: gathered from the probabilities into
  ``[2, COMMON_ROWS, |T_C|]`` slot buffers (the first local student partner of each slot by
  index_select, H-KL's other partners by index_add) and summed over ranks, then p_T log(p_T / q)
  in place. ULD by the layer-cake histogram (:mod:`xtoken_nemo.losses.uld_hist`), int32 bin keys
  ``KEY_ROWS`` rows at a time. Backward recomputes p_S bit-identically, writes the ULD sign and
  the common pairs' -w_c p_T / q into one gradient buffer, and applies the softmax backward in
  place.
- The common pairs' layout on this rank's shards depends on the tokenizers and the shard geometry
  only: :func:`prepare_common_set` builds it once (checks, pair sort, uncommon masks: 12 ms of CPU
  at 128k pairs on one thread, far more wall time on a busy host) into a :class:`CommonSet` that
  keeps one copy per device; the losses take one in place of the pairs (the trainer's teacher specs
  do), or build it on every call from raw pairs / W.
- ``uld_method="sort"`` / ``uld_topk=k``: the older path, autograd-aware collectives
  (``comm.sum_autograd`` / ``comm.gather_cols_autograd``) in an activation-checkpointed per-block
  function; the uncommon probabilities are all-gathered per block and sorted; ``uld_topk=k`` is an
  approximation that sorts only each rank's k largest uncommon probabilities per side (the rest is
  treated as zero; exact when k is at least the shard width).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm, uld_hist
from xtoken_nemo.losses.checks import check_pairs, check_projection_shape, reduce_chunks
from xtoken_nemo.losses.common import (
    DEFAULT_BLOCK,
    MASK_VALUE,
    PROB_FLOOR,
    ULD_METHODS,
    compute_dtype,
    hkl_pairs,
    hybrid_weights,
    to_device,
)
from xtoken_nemo.losses.shard import (
    Shard,
    check_block,
    check_finite_global,
    cross_vocab_shards,
    make_shard,
    prep_block,
    token_blocks,
    vp_log_softmax,
)
from xtoken_nemo.vocab.projection import ProjectionMatrix


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


def _hybrid_layout(pairs: torch.Tensor, s_shard: Shard, t_shard: Shard) -> _HybridLayout:
    """[P, 2] checked (student_id, teacher_id) host pairs and this rank's two shards -> its
    :class:`_HybridLayout` (host tensors; :meth:`CommonSet.layout` keeps the device copies)."""
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
        s_local_cols=s_cols,
        s_slot=s_slot,
        t_local_cols=teachers[t_own] - t_shard.start,
        t_slot=t_slot,
        s_uncommon=s_unc,
        t_uncommon=t_unc,
        s_first_cols=s_cols[first],
        s_first_slot=s_slot[first],
        s_extra_cols=s_cols[~first],
        s_extra_slot=s_slot[~first],
        s_first_full=int(first.sum()) == tc,  # slots are unique and sorted: all of them, in order
        t_full=int(t_slot.numel()) == tc,
    )


_LAYOUT_TENSORS = (
    "s_local_cols",
    "s_slot",
    "t_local_cols",
    "t_slot",
    "s_uncommon",
    "t_uncommon",
    "s_first_cols",
    "s_first_slot",
    "s_extra_cols",
    "s_extra_slot",
)


class CommonSet:
    """GOLD/H-KL/ULD's common pairs prepared for this rank's shards: the checked ``[P, 2]``
    (student_id, teacher_id) pairs and their :class:`_HybridLayout`, built once (per teacher and TP
    rank) and copied to each device once.

    The layout depends only on the pairs and the two shards (start, width, real and padded vocab),
    never on a batch: :func:`prepare_common_set` builds it when the teacher's loss spec is made and
    every micro-batch reuses it. Pass it as ``common_pairs`` to :func:`gold_loss_parallel`, as ``W``
    to :func:`hkl_loss_parallel` or as ``common`` to :func:`uld_loss_parallel` (no pairs).
    """

    def __init__(self, pairs: torch.Tensor, s_shard: Shard, t_shard: Shard):
        self.pairs = check_pairs(pairs, s_shard.vocab_size, t_shard.vocab_size)
        self.s_shard, self.t_shard = s_shard, t_shard
        host = _hybrid_layout(self.pairs, s_shard, t_shard)
        self._layouts: dict[str, _HybridLayout] = {"cpu": host}

    @property
    def num_common_teacher(self) -> int:
        return self._layouts["cpu"].num_common_teacher

    def layout(self, device: torch.device | str) -> _HybridLayout:
        """The layout with its index tensors on ``device`` (copied on the first call per device, in
        one non-blocking copy per dtype)."""
        key = str(torch.device(device))
        if key not in self._layouts:
            host = self._layouts["cpu"]
            fields = {name: getattr(host, name) for name in _LAYOUT_TENSORS}
            on_device = {}
            for dtype in {t.dtype for t in fields.values()}:
                names = [n for n, t in fields.items() if t.dtype == dtype]
                on_device.update(zip(names, to_device(device, *(fields[n] for n in names))))
            self._layouts[key] = dataclasses.replace(host, **on_device)
        return self._layouts[key]

    def check_shards(self, s_shard: Shard, t_shard: Shard) -> None:
        if (s_shard, t_shard) != (self.s_shard, self.t_shard):
            raise LossInputError(
                "the CommonSet was prepared for other shards/vocab sizes than these logits; "
                "call prepare_common_set with this rank's logit widths and the real vocab sizes"
            )


def prepare_common_set(
    pairs: torch.Tensor,
    student_local_width: int,
    teacher_local_width: int,
    student_vocab_size: int,
    teacher_vocab_size: int,
    group: object | None = None,
) -> CommonSet:
    """This rank's :class:`CommonSet` of ``pairs`` ([P, 2] host (student_id, teacher_id); [0, 2]
    for ULD) for logits of ``*_local_width`` columns per rank and the real vocab sizes."""
    group = comm.resolve_group(group)
    s_shard = make_shard(student_local_width, student_vocab_size, group, "student")
    t_shard = make_shard(teacher_local_width, teacher_vocab_size, group, "teacher")
    return CommonSet(torch.as_tensor(pairs), s_shard, t_shard)


def _sorted_l1_gathered(us: torch.Tensor, ut: torch.Tensor, group: object | None, topk: int | None) -> torch.Tensor:
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

#: columns per partial sum of the backward's row dot: fp32 partial sums of DOT_CHUNK columns, added
#: in fp64. One fp32 bmm over a 128k-152k-wide row of same-sign terms was off by ~2e-5 relative at
#: real vocabularies, and every gradient entry p * (g - dot) inherits that error (largest where p is
#: largest); chunked, the GOLD fp32 gradient is ~1e-7 from fp64, as the sort path's
DOT_CHUNK = 128


def _row_dot(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[r] row dots sum_v p[i, v] * g[i, v] of two [r, n] tensors, in p's dtype (see DOT_CHUNK)."""
    r, n = p.shape
    m = n - n % DOT_CHUNK
    head = torch.bmm(p[:, :m].reshape(-1, 1, DOT_CHUNK), g[:, :m].reshape(-1, DOT_CHUNK, 1))
    out = head.view(r, m // DOT_CHUNK).sum(-1, dtype=torch.float64)
    if m < n:
        out += torch.bmm(p[:, m:].unsqueeze(1), g[:, m:].unsqueeze(2)).view(r).double()
    return out.to(p.dtype)


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
        H = _VocabParallelHybrid
        n = s_loc.shape[0]
        cdt = compute_dtype(s_loc)
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
        for a, b in token_blocks(n, block):
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
                    q, pc = H._masses(
                        ps[r0:r1],
                        pt[r0:r1],
                        None,
                        None,
                        layout,
                        temperature,
                        group,
                        _slot_view(slots, r1 - r0, layout.num_common_teacher),
                    )
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
        for i, (a, b) in enumerate(token_blocks(n, block)):
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
                        ps[r0:r1],
                        None,
                        t_loc[a + r0 : a + r1],
                        (stats[2, a + r0 : a + r1], stats[3, a + r0 : a + r1]),
                        layout,
                        temperature,
                        group,
                        _slot_view(slots, r1 - r0, layout.num_common_teacher),
                    )
                    small = q.clamp_min_(eps) <= eps  # q <= eps: no gradient (as the reference's clamp)
                    ratio = pc.div_(q).mul_(-w_c).masked_fill_(small, 0.0)  # d/dq of -w_c p_T log q
                    H._scatter_common_grad_(g[r0:r1], ratio, layout)
            elif layout.num_common_teacher:
                g.masked_fill_(mask_s & torch.arange(g.shape[1], device=g.device).lt(s_shard.valid), 0.0)
            dot = _row_dot(ps, g)
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
    log_ps = vp_log_softmax(prep_block(s_blk, s_shard, temperature), group)
    with torch.no_grad():
        log_pt = vp_log_softmax(prep_block(t_blk, t_shard, temperature).to(log_ps.dtype), group)
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


def uld_by_histogram(uld_method: str, uld_topk: int | None) -> bool:
    """Whether the hybrid losses compute their ULD term by the histogram (``uld_hist``), the path
    whose contested-entry buffer can overflow; else by a sort (``"sort"`` or a top-k)."""
    return uld_method == "hist" and uld_topk is None


def gold_loss_parallel(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    common_pairs: torch.Tensor | CommonSet,
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
    rank, an approximation) always takes the sort path. ``common_pairs``: [P, 2] (student_id,
    teacher_id) pairs, or a :class:`CommonSet` prepared for these shards (no per-call pair work).
    """
    group, s_shard, t_shard = cross_vocab_shards(
        student_logits, teacher_logits, student_vocab_size, teacher_vocab_size, temperature, reduction, group
    )
    if isinstance(common_pairs, CommonSet):
        common = common_pairs
        common.check_shards(s_shard, t_shard)
    else:
        common = CommonSet(common_pairs, s_shard, t_shard)
    if uld_topk is not None and (not isinstance(uld_topk, int) or uld_topk <= 0):
        raise LossInputError(f"uld_topk must be a positive int or None, got {uld_topk!r}")
    check_finite_global("student logits", student_logits.detach(), group)
    check_finite_global("teacher logits", teacher_logits.detach(), group)
    layout = common.layout(student_logits.device)
    weights = hybrid_weights(weighting, layout.num_common_teacher, teacher_vocab_size)
    teacher = teacher_logits.detach()
    block = check_block(block_size)
    if uld_method not in ULD_METHODS:
        raise LossInputError(f"uld_method must be one of {ULD_METHODS}, got {uld_method!r}")
    if uld_by_histogram(uld_method, uld_topk):
        per_chunk = _VocabParallelHybrid.apply(
            student_logits,
            teacher,
            layout,
            s_shard,
            t_shard,
            group,
            float(temperature),
            weights,
            float(eps),
            uld_hist.DEFAULT_GRID_BITS,
            block,
        )
        return reduce_chunks(per_chunk, reduction)
    parts = []
    for a, b in token_blocks(student_logits.shape[0], block):
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
    W: ProjectionMatrix | CommonSet,
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
    """H-KL: GOLD with W's argmax pairs as the common set. ``W``: the projection matrix (its pairs
    ``hkl_pairs(W, min_weight)`` are found on every call), or the :class:`CommonSet` of those pairs
    prepared once (``min_weight`` is then the one it was prepared with)."""
    if isinstance(W, CommonSet):
        common = W
    else:
        check_projection_shape(W.shape, student_vocab_size, teacher_vocab_size)
        common = hkl_pairs(W, min_weight)
    return gold_loss_parallel(
        student_logits,
        teacher_logits,
        common,
        student_vocab_size,
        teacher_vocab_size,
        temperature,
        weighting,
        eps,
        uld_topk,
        group,
        block_size,
        reduction,
        uld_method,
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
    common: CommonSet | None = None,
) -> torch.Tensor:
    """ULD on vocab-sharded logits: GOLD with an empty common set and only the ULD term.
    ``common``: that empty set prepared once for these shards (``prepare_common_set`` of [0, 2]
    pairs: the uncommon masks are then not rebuilt on every call)."""
    if common is not None and common.num_common_teacher:
        raise LossInputError("ULD takes an empty common set; use gold_loss_parallel for common pairs")
    return gold_loss_parallel(
        student_logits,
        teacher_logits,
        torch.zeros(0, 2, dtype=torch.int64) if common is None else common,
        student_vocab_size,
        teacher_vocab_size,
        temperature,
        (0.0, 1.0),
        PROB_FLOOR,
        uld_topk,
        group,
        block_size,
        reduction,
        uld_method,
    )
