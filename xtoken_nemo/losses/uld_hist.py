"""ULD (the sorted L1 distance) without sorting the vocabularies: the layer-cake form on a log grid.

For two non-negative vectors a (student) and b (teacher), sorted decreasingly and zero-padded,

    sum_i |a_(i) - b_(i)| = integral over x > 0 of |D(x)| dx,   D(x) = N_a(x) - N_b(x),
    N_a(x) = #{i : a_i > x}                  (docs/method.md, "ULD and the histogram ULD")

and, with s(x) = sign D(x) (+1 where D = 0) and G(y) = integral_0^y s(x) dx, the integral is
``sum_i G(a_i) - sum_i G(b_i)``; the derivative with respect to a_j is s just above a_j, i.e.
+1 iff #{a > a_j} >= #{b > a_j} (the sorted form's sign(a_(r) - b_(r)) at a_j's rank r).

Algorithm (per row, shard-local except two small collectives):

1. Bins on a log grid read off the float's bits: ``key = bits >> (mantissa - m)``, 2^m bins per
   octave (m = ``DEFAULT_GRID_BITS`` = 7: bins 0.8% wide) for values in [2^-100, 1], one bin
   below 2^-100 (zeros included). Counts of a and b per bin (index_add_ into preallocated tables;
   all-reduced over the tensor-parallel group: [2, B, K] int32, K = 100 * 2^m + 2 = 12,802).
2. From the counts, D at the top of every bin and the range D takes inside it:
   [D_top - n_b, D_top + n_a]. If that range does not contain both signs, s is constant on the bin
   and the bin is *settled*: G is linear there, ``G(y) = G(lo) + s (y - lo)``, exactly.
3. The other bins (*contested*: D crosses 0 inside them, typically a few bins per row where the
   two counting functions cross) are resolved exactly: their elements are copied into a
   fixed-size buffer of (row, value, side) records, all-gathered over the group and sorted (row,
   value), and D, s and G are walked through them element by element (segment starts by cummax,
   unused slots in a dump segment: no data-dependent shapes).
4. The bin below 2^-100 is taken as settled with the sign of D at its top: the only
   approximation, error <= 2^-100 * (number of non-zero entries below 2^-100) < 1e-24 absolute
   on the value, and it can change the gradient sign only of entries below 2^-100 (whose
   d/dlogit = p * (...) is below 1e-30).

So the value and the gradient equal the exact sort's (up to float rounding: the tables are
float64) and ties: where a student value equals a teacher value exactly, the sort's autograd gives
0 (|x| at 0) and this gives +-1, both subgradients; tied student values get the signs of one
particular order of the tie, as the sort does.

Host synchronizations (each one stalls the GPU's stream): none in :func:`uld_block` and
:func:`uld_grad` by default. The buffer of step 3 is the only data-dependent size; it is sized
statically, ``contested_capacity(entries, CONTESTED_SHARE)`` per side (1/64 of a side's entries,
at least 65,536), and a block whose contested entries do not fit returns NaN (value and gradient)
and reports how many did not fit (``UldBlock.overflow``), never a wrong number. Inside
:func:`contested_buffer` the calls take that context's share and add their overflow to it: the
trainer reads it with its one step-end host copy, doubles the share and recomputes the step (the
grown share stays). ``CONTESTED_SHARE = None`` (or ``contested_buffer(None)``) sizes the buffer
exactly instead, from the count read on the host once per :func:`uld_block` call (one
device-to-host synchronization per block on GPU; never overflows). No bincount (it reads its
largest key on the host), no nonzero, no boolean-mask indexing, no ``bool(tensor)``. Checked on
CPU and on the meta device; not yet checked under CUDA's sync debug mode (that CUDA's
``nonzero_static`` and ``index_put_`` make no hidden synchronization is unverified until a GPU
runs ``tests/test_uld_hist_syncs.py``).

Cost: O(V) per row (bit shift, two index_adds per side, one table lookup per student entry in
backward) plus a sort of the contested elements only; memory: one int32 key scratch of KEY_ROWS
rows, a [B, V] bool mask of the contested entries (one side at a time) and [B, K] tables (K ~ V / 12
at 150k vocabularies), no [B, V] int64 index buffer.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from xtoken_nemo.losses import comm

_LITTLE = sys.byteorder == "little"

DEFAULT_GRID_BITS = 7
"""2^7 = 128 bins per octave (bin width 0.8% of its lower edge)."""

FLOOR_LOG2 = -100
"""Values below 2^FLOOR_LOG2 share one bin (the only approximation; see the module docstring)."""


@dataclass(frozen=True)
class Grid:
    """The bins for one float dtype: bin 0 = [0, 2^FLOOR_LOG2), then 2^bits bins per octave."""

    dtype: torch.dtype
    int_dtype: torch.dtype
    shift: int
    floor_key: int  # (bits of 2^FLOOR_LOG2) >> shift
    nbins: int
    bits: int

    @staticmethod
    def of(dtype: torch.dtype, bits: int = DEFAULT_GRID_BITS) -> Grid:
        if dtype == torch.float64:
            mant, bias, idt = 52, 1023, torch.int64
        elif dtype == torch.float32:
            mant, bias, idt = 23, 127, torch.int32
        else:
            raise ValueError(f"ULD histogram grid needs float32 or float64 probabilities, got {dtype}")
        if not isinstance(bits, int) or not 0 <= bits <= 12:
            raise ValueError(f"grid bits must be an int in [0, 12], got {bits!r}")
        floor_key = (bias + FLOOR_LOG2) << bits
        # bin 0 below the floor, bins 1..(-FLOOR_LOG2 << bits) cover [2^-100, 1), the last one [1, ...)
        return Grid(dtype, idt, mant - bits, floor_key, (-FLOOR_LOG2 << bits) + 2, bits)

    def keys(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """int32 bin keys of non-negative x (same shape); written into ``out`` (int32, x's shape) if given."""
        x = x.contiguous()
        if self.dtype == torch.float32 and self.shift == 16 and x.dim() == 2:
            # the key is the float's upper 16 bits: read them as int16 (no shift over the buffer)
            hi = x.view(torch.int16)[:, 1::2] if _LITTLE else x.view(torch.int16)[:, 0::2]
            k = out.copy_(hi) if out is not None else hi.to(torch.int32)
        else:
            k = x.view(self.int_dtype) >> self.shift
            if k.dtype != torch.int32:
                k = out.copy_(k) if out is not None else k.to(torch.int32)
            elif out is not None:
                k = out.copy_(k)
        return k.sub_(self.floor_key - 1).clamp_(0, self.nbins - 1)

    def edges(self, device) -> torch.Tensor:
        """[nbins + 1] float64: lower edge of bin k at k, upper edge of the last bin at nbins."""
        k = torch.arange(self.nbins + 1, device=device, dtype=torch.int64)
        bits = ((k - 1 + self.floor_key) << self.shift).to(self.int_dtype)
        e = bits.view(self.dtype).to(torch.float64)
        e[0] = 0.0
        return e


@dataclass
class UldBlock:
    """Forward result of one block: this rank's partial of the value and what backward needs.

    Every field is a device tensor of a size known before the data is read (no host synchronization)."""

    partial: torch.Tensor  # [B] float64, sum over ranks = the sorted L1 (NaN if overflow > 0)
    sign: torch.Tensor  # [B, K] int8: s on settled bins (student entries there get it as gradient)
    # [cap] int64 flat (row * n_a + col) indices of this rank's student entries in contested bins,
    # ascending; unused slots hold B * n_a
    amb_idx: torch.Tensor
    amb_sign: torch.Tensor  # [cap] int8 their gradient signs (0 in unused slots)
    contested: torch.Tensor  # [] int64: entries in contested bins over the group (both sides; those in the buffer)
    overflow: torch.Tensor  # [] int64: contested entries that did not fit a static buffer (0 when exact)


def _exclusive_in_segments(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum of x [M] within contiguous segments; first [M]: the index of each
    element's segment start (so no per-segment index list, whose length depends on the data)."""
    cs = torch.cumsum(x, 0)
    return cs - x - (cs[first] - x[first])


KEY_ROWS = 64
"""Rows per pass over the int32 bin keys: the key scratch is KEY_ROWS x (wider side) int32, a quarter
of a [256, V] fp32 block buffer, reused for every pass (no full-block int32 key buffer)."""

CONTESTED_SHARE: float | None = 1 / 64
"""How the buffer of contested entries (step 3) is sized; read at each call outside
:func:`contested_buffer` (the trainer reads it once, when it starts).

A float s in (0, 1] (default 1/64): statically, ``contested_capacity(entries, s)`` entries per
side: no host synchronization, but a block whose contested entries do not fit gets NaN as its
value and in its gradient (``UldBlock.overflow`` > 0), never a wrong number. None: exactly, from
their count, which the host reads once per :func:`uld_block` call (one device-to-host
synchronization per block on GPU; exact for every input).

Why 1/64: the buffer's records and the walk over them cost memory and time in proportion to the
share, whether used or not (bench/losses.py, 512 rows of Llama-3.2 x Qwen3 at block 256: 1/16 cost
+6 to +7 fp32 [block, V_T] buffers over KL and 2.3-2.6x its time; 1/64 +1.5 to +2.4 and 1.1-1.8x;
the exact size +0 to +0.7 and 1.2-1.6x). The share the data needs (docs/losses.md): 0.2-0.7% of a
side's entries for a student near a teacher of another vocabulary, 1.4% for the bench's bf16 random
logits of std 3 over 128k/152k columns, 3.3% for std 1-2, 3.7% for Zipf-like rows, up to 99% when the
sorted student is within 1% of the sorted teacher over one vocabulary (no share short of 1 fits
every input). So the default fits the cheap cases and the trainer doubles it when a step overflows
(:func:`contested_buffer`): 1/16 after two recomputed steps for the worst measured ones."""

CONTESTED_MIN = 1 << 16
"""Smallest static buffer per side (entries): small blocks always fit (exact)."""


def contested_capacity(entries: int, share: float) -> int:
    """Static contested-entry capacity for one side of ``entries`` entries (rows x columns)."""
    if share is None or not 0.0 < share <= 1.0:
        raise ValueError(f"contested share must be in (0, 1], got {share!r}")
    return min(entries, max(CONTESTED_MIN, math.ceil(share * entries)))


@dataclass
class ContestedBuffer:
    """The contested-entry share of the :func:`uld_block` calls inside :func:`contested_buffer`,
    and the entries that did not fit, summed over those calls."""

    share: float | None
    overflow: torch.Tensor | None = None  # [] int64 on the blocks' device; None: no call yet


_ACTIVE_BUFFER: contextvars.ContextVar[ContestedBuffer | None] = contextvars.ContextVar(
    "xtoken_uld_contested_buffer", default=None
)


@contextlib.contextmanager
def contested_buffer(share: float | None) -> Iterator[ContestedBuffer]:
    """Inside this block :func:`uld_block` sizes its buffer by ``share`` (None: exactly) in place
    of ``CONTESTED_SHARE`` and adds its overflow to the yielded record's ``overflow`` (a device
    tensor: nothing is read on the host). The trainer wraps each micro-batch's loss in one and
    reads the overflow with its step-end metrics."""
    if share is not None and not 0.0 < share <= 1.0:
        raise ValueError(f"contested share must be in (0, 1] or None (exact), got {share!r}")
    buffer = ContestedBuffer(share)
    token = _ACTIVE_BUFFER.set(buffer)
    try:
        yield buffer
    finally:
        _ACTIVE_BUFFER.reset(token)


def grown_share(share: float) -> float:
    """The share after an overflow: doubled, at most 1 (where every entry fits, so growing ends)."""
    return min(1.0, 2.0 * share)


def key_scratch(rows: int, cols: int, device, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """A flat int32 scratch of at least rows * cols entries (``scratch`` itself when it is large enough)."""
    if scratch is not None and scratch.numel() >= rows * cols:
        return scratch
    return torch.empty(rows * cols, dtype=torch.int32, device=device)


def _sub_keys(x: torch.Tensor, grid: Grid, r0: int, r1: int, scratch: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys of rows r0..r1 of x, each row offset by (row - r0) * nbins, in ``scratch``."""
    n = x.shape[1]
    k = grid.keys(x[r0:r1], out=scratch[: (r1 - r0) * n].view(r1 - r0, n))
    if r1 - r0 > 1:
        k.add_((torch.arange(r1 - r0, device=x.device, dtype=torch.int32) * grid.nbins)[:, None])
    return k.view(-1)


def _row_ranges(B: int, rows: int):
    for r0 in range(0, B, rows):
        yield r0, min(B, r0 + rows)


def _histogram(x: torch.Tensor, grid: Grid, rows: int, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row bin counts [B, K] int32 and per-bin value sums [B * K] float64 of x [B, n].

    Counts by index_add_ of ones into a preallocated table: bincount would read the largest key on
    the host (a synchronization on GPU) to size its output."""
    B, K = x.shape[0], grid.nbins
    counts = torch.zeros(B * K, dtype=torch.int32, device=x.device)
    one = torch.ones((), dtype=torch.int32, device=x.device)
    # per-bin value sums in x's dtype (bincount's weights would make a float64 copy of the whole block)
    sums = x.new_zeros(B * K)
    for r0, r1 in _row_ranges(B, rows):
        k = _sub_keys(x, grid, r0, r1, scratch)
        counts[r0 * K : r1 * K].index_add_(0, k, one.expand(k.numel()))
        sums[r0 * K : r1 * K].index_add_(0, k, x[r0:r1].reshape(-1))
    return counts.view(B, K), sums.to(torch.float64)


def _contested_mask(
    x: torch.Tensor, flat_amb: torch.Tensor, grid: Grid, rows: int, scratch: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """[B * n] bool (the front of ``mask``): which entries of x [B, n] lie in a bin marked in flat_amb [B * K]."""
    B, n = x.shape
    K = grid.nbins
    m = mask[: B * n]
    for r0, r1 in _row_ranges(B, rows):
        k = _sub_keys(x, grid, r0, r1, scratch)
        torch.index_select(flat_amb[r0 * K : r1 * K], 0, k, out=m[r0 * n : r1 * n])
    return m


def _records(x: torch.Tensor, mask: torch.Tensor, cap: int, label: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``cap`` entries of x [B, n] marked in mask [B * n], in flat order, as records
    [cap, 3] float64 (row, value, label), and their flat indices [cap] int64. Unused slots: row B,
    value 0, label 0, index B * n (static sizes: no host synchronization)."""
    B, n = x.shape
    idx = torch.nonzero_static(mask, size=cap, fill_value=B * n).squeeze(1)
    ok = idx < B * n
    val = x.reshape(-1)[idx.clamp(max=max(B * n - 1, 0))] if B * n else x.new_zeros(cap)
    rec = torch.stack([(idx // max(n, 1)).double(), torch.where(ok, val.double(), 0.0), ok.double() * label], 1)
    return rec, idx


def uld_block(
    a: torch.Tensor,
    b: torch.Tensor,
    group: object | None = None,
    bits: int = DEFAULT_GRID_BITS,
    rows: int = KEY_ROWS,
    scratch: torch.Tensor | None = None,
) -> UldBlock:
    """Sorted L1 of the rows of a [B, n_a] and b [B, n_b] (this rank's columns; the vectors are the
    concatenation over the group), without sorting them. No autograd: see :class:`UldBlock`.

    The bin keys are computed ``rows`` rows at a time into ``scratch`` (flat int32, allocated when
    not given or too small; pass one to reuse it across blocks). Host synchronizations: none with
    a static share (the default), one (the contested-entry count) with the exact size (share None).
    Inside :func:`contested_buffer`: that context's share, and the overflow is added to it."""
    grid = Grid.of(a.dtype, bits)
    B, na_cols = a.shape
    nb_cols = b.shape[1]
    K = grid.nbins
    dev = a.device
    ws, rk = comm.world_size(group), comm.rank(group)
    scratch = key_scratch(min(rows, B), max(na_cols, nb_cols), dev, scratch)
    la, sa = _histogram(a, grid, rows, scratch)
    lb, sb = _histogram(b, grid, rows, scratch)
    if ws > 1:
        counts = torch.stack([la, lb])
        comm.all_reduce_(counts, "sum", group)
        n_a, n_b = counts[0], counts[1]
    else:
        n_a, n_b = la, lb
    above_a = n_a.flip(-1).cumsum(-1).flip(-1) - n_a
    above_b = n_b.flip(-1).cumsum(-1).flip(-1) - n_b
    d_top = above_a - above_b  # D just below the top edge of each bin, before its own entries
    pos = d_top - n_b >= 0  # D >= 0 on the whole bin
    neg = d_top + n_a <= 0  # D <= 0 on the whole bin
    amb = ~(pos | neg)
    amb[:, 0] = False
    s = torch.where(pos, 1.0, -1.0).to(torch.float64)
    s[:, 0] = torch.where(d_top[:, 0] >= 0, 1.0, -1.0)
    edges = grid.edges(dev)
    lo, hi = edges[:-1], edges[1:]
    J = s * (hi - lo)  # integral of s over each bin (settled bins)

    # contested entries -> fixed-size records (row, value, side): no data-dependent shapes below
    have = torch.stack([(la * amb).sum(), (lb * amb).sum()])  # this rank's contested entries per side
    active = _ACTIVE_BUFFER.get()
    share = CONTESTED_SHARE if active is None else active.share
    if share is None:
        # exact size: the one host read; the largest rank's count, as the all-gather needs one size
        need = comm.all_reduce_(have.clone(), "max", group)
        cap_a, cap_b = need.tolist()
    else:
        cap_a, cap_b = contested_capacity(B * na_cols, share), contested_capacity(B * nb_cols, share)
    mask = torch.empty(B * max(na_cols, nb_cols), dtype=torch.bool, device=dev)
    rec_a, ia = _records(a, _contested_mask(a, amb.view(-1), grid, rows, scratch, mask), cap_a, 1.0)
    rec_b, _ = _records(b, _contested_mask(b, amb.view(-1), grid, rows, scratch, mask), cap_b, -1.0)
    del mask
    # entries that did not fit (Python ints as scalars: a tensor made from them would be a host-to-device copy)
    over = (have[0] - cap_a).clamp_min(0) + (have[1] - cap_b).clamp_min(0)
    # a header record (row B, value = overflow, label 0) carries the overflow through the gather and
    # is sorted last, like an unused slot
    header = torch.stack([torch.full_like(over, B), over, torch.zeros_like(over)]).double()
    rec = torch.cat([rec_a, rec_b, header[None]])  # [Mr, 3]
    Mr = rec.shape[0]
    allrec = comm.all_gather_rows(rec, group) if ws > 1 else rec
    heads = allrec.view(ws, Mr, 3)[:, Mr - 1, 1]
    overflow = heads.sum().long()
    heads.zero_()
    if active is not None:
        active.overflow = overflow if active.overflow is None else active.overflow + overflow
    row_f, val, lab = allrec.unbind(1)
    contested = (lab != 0).sum()
    # order: row ascending, value descending, ties in record order (this rank's a's, then b's, then
    # the next rank's): fp32 values in one int64 key sort, fp64 in two stable sorts
    if grid.dtype == torch.float32:
        key = (row_f.long() << 32) | (0x7FFFFFFF - val.float().view(torch.int32).long())
        order = torch.sort(key, stable=True).indices
    else:
        o1 = torch.argsort(val, descending=True, stable=True)
        order = o1[torch.argsort(row_f[o1], stable=True)]
    r, v, lab_s = row_f[order].long(), val[order], lab[order]
    valid = lab_s != 0
    k = grid.keys(v.to(grid.dtype)).long()
    kf = torch.where(valid, r * K + k, B * K)  # unused slots: one dump segment past the tables
    M = kf.numel()
    start = torch.ones(M, dtype=torch.bool, device=dev)
    start[1:] = kf[1:] != kf[:-1]
    first = torch.cummax(torch.where(start, torch.arange(M, device=dev), 0), 0).values  # each segment's start
    seg = torch.cumsum(start, 0) - 1
    dt = torch.cat([d_top.reshape(-1), d_top.new_zeros(1)])[kf].double()
    d_above = dt + _exclusive_in_segments(lab_s, first)  # D just above each element
    d_below = d_above + lab_s
    last = torch.ones_like(start)
    last[:-1] = start[1:]
    v_next = torch.where(last, lo[k], torch.roll(v, -1))
    seg_term = torch.where(d_below >= 0, 1.0, -1.0).double() * (v - v_next)
    top = torch.where(dt >= 0, 1.0, -1.0).double() * (hi[k] - v[first])  # integral of s over [segment top, hi)
    H = top + _exclusive_in_segments(seg_term, first)  # integral of s from v up to hi
    J_ext = torch.cat([J.reshape(-1), J.new_zeros(1)])
    J_ext[kf] = top + torch.zeros_like(seg_term).index_add_(0, seg, seg_term)[seg]  # equal within a segment
    J = J_ext[:-1].view(B, K)
    G_lo = torch.cumsum(J, -1) - J
    G = torch.cat([G_lo.reshape(-1), G_lo.new_zeros(1)])[kf] + J_ext[kf] - H
    gpos = order
    own = valid & (gpos // Mr == rk) if ws > 1 else valid
    # settled bins: sum over this rank's entries of G(y) = (G_lo - s lo) + s y, from the local bin sums
    settled = (~amb).double()
    A = (G_lo - s * lo) * settled
    partial = (A * (la - lb).double() + (s * settled) * (sa.view(B, K) - sb.view(B, K))).sum(-1)
    partial = partial.index_add(0, torch.where(own, r, 0), torch.where(own, lab_s * G, 0.0))
    # gradient signs of this rank's contested student entries, by their slot in its records
    is_a = own & (lab_s > 0)
    amb_sign = torch.zeros(cap_a + 1, dtype=torch.int8, device=dev)
    amb_sign[torch.where(is_a, gpos % Mr, cap_a)] = torch.where(d_above >= 0, 1, -1).to(torch.int8)
    partial = partial + torch.where(overflow > 0, math.nan, 0.0)  # only a static buffer can overflow
    return UldBlock(partial, s.to(torch.int8), ia, amb_sign[:cap_a], contested, overflow)


def uld_grad(
    a: torch.Tensor,
    blk: UldBlock,
    bits: int = DEFAULT_GRID_BITS,
    out: torch.Tensor | None = None,
    rows: int = KEY_ROWS,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, n_a] d(sorted L1)/da (+-1, in a's dtype) from the same a as in :func:`uld_block`;
    written into ``out`` (contiguous, a's shape) if given. No host synchronization.
    NaN in column 0 of every row if the forward's contested entries did not fit (``blk.overflow``)."""
    grid = Grid.of(a.dtype, bits)
    B, n = a.shape
    K = grid.nbins
    g = out if out is not None else torch.empty_like(a, memory_format=torch.contiguous_format)
    scratch = key_scratch(min(rows, B), n, a.device, scratch)
    sign = blk.sign.view(-1)
    for r0, r1 in _row_ranges(B, rows):
        k = _sub_keys(a, grid, r0, r1, scratch)
        g[r0:r1].view(-1).copy_(sign[r0 * K : r1 * K].index_select(0, k))
    if blk.amb_idx.numel():
        # contested entries get their signs; unused slots write index 0's final value (its contested
        # sign if it is one, then it is in slot 0, else its table sign): equal duplicate writes, and a
        # plain index_put_ (an accumulating one may check its index range on the host)
        flat = g.view(-1)
        ok = blk.amb_idx < flat.numel()
        pad = torch.where(blk.amb_idx[0] == 0, blk.amb_sign[0].to(g.dtype), flat[0])
        flat.index_put_((torch.where(ok, blk.amb_idx, 0),), torch.where(ok, blk.amb_sign.to(g.dtype), pad))
    g[:, :1].add_(torch.where(blk.overflow > 0, math.nan, 0.0))  # NaN reaches the row through the softmax backward
    return g


class _SortedL1Hist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group, bits):  # type: ignore[override]
        blk = uld_block(a.detach(), b.detach(), group, bits)
        ctx.save_for_backward(a)
        ctx.blk, ctx.bits = blk, bits
        out = blk.partial
        if comm.world_size(group) > 1:
            comm.all_reduce_(out, "sum", group)
        return out.to(a.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        g = uld_grad(a.detach(), ctx.blk, ctx.bits)
        return g * grad[:, None].to(g.dtype), None, None, None


def sorted_l1_hist(
    a: torch.Tensor, b: torch.Tensor, group: object | None = None, bits: int = DEFAULT_GRID_BITS
) -> torch.Tensor:
    """[B, n_a], [B, n_b] non-negative (this rank's columns) -> [B] sorted L1 over the group,
    replicated; differentiable in ``a`` (``b`` is treated as constant, like a teacher)."""
    return _SortedL1Hist.apply(a, b.detach(), group, bits)


__all__ = [
    "CONTESTED_MIN",
    "CONTESTED_SHARE",
    "ContestedBuffer",
    "DEFAULT_GRID_BITS",
    "FLOOR_LOG2",
    "KEY_ROWS",
    "Grid",
    "contested_buffer",
    "contested_capacity",
    "grown_share",
    "key_scratch",
    "UldBlock",
    "sorted_l1_hist",
    "uld_block",
    "uld_grad",
]
