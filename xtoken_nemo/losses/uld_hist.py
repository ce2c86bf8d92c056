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
   below 2^-100 (zeros included). Counts of a and b per bin (bincount; all-reduced over the
   tensor-parallel group: [2, B, K] int32, K = 100 * 2^m + 2 = 12,802).
2. From the counts, D at the top of every bin and the range D takes inside it:
   [D_top - n_b, D_top + n_a]. If that range does not contain both signs, s is constant on the bin
   and the bin is *settled*: G is linear there, ``G(y) = G(lo) + s (y - lo)``, exactly.
3. The other bins (*contested*: D crosses 0 inside them, typically a few bins per row where the
   two counting functions cross) are resolved exactly: their elements (few) are all-gathered over
   the group and sorted (row, value), and D, s and G are walked through them element by element.
4. The bin below 2^-100 is taken as settled with the sign of D at its top: the only
   approximation, error <= 2^-100 * (number of non-zero entries below 2^-100) < 1e-24 absolute
   on the value, and it can change the gradient sign only of entries below 2^-100 (whose
   d/dlogit = p * (...) is below 1e-30).

So the value and the gradient equal the exact sort's (up to float rounding: the tables are
float64) and ties: where a student value equals a teacher value exactly, the sort's autograd gives
0 (|x| at 0) and this gives +-1, both subgradients; tied student values get the signs of one
particular order of the tie, as the sort does.

Cost: O(V) per row (bit shift, two bincounts per side, one table lookup per student entry in
backward) plus a sort of the contested elements only; memory: one int32 key buffer per side and
[B, K] tables (K ~ V / 12 at 150k vocabularies), no [B, V] int64 index buffer.
"""

from __future__ import annotations

import sys
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
    """Forward result of one block: this rank's partial of the value and what backward needs."""

    partial: torch.Tensor  # [B] float64, sum over ranks = the sorted L1
    sign: torch.Tensor  # [B, K] int8: s on settled bins (student entries there get it as gradient)
    amb_idx: torch.Tensor  # [m] int64 flat (row * n_a + col) indices of this rank's student entries in contested bins
    amb_sign: torch.Tensor  # [m] int8 their gradient signs
    contested: int  # elements in contested bins over the group (both sides), for reporting


def _exclusive_in_segments(x: torch.Tensor, first: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum of x within contiguous segments (first: index of each segment's start)."""
    cs = torch.cumsum(x, 0)
    return cs - x - (cs[first] - x[first])[seg]


KEY_ROWS = 64
"""Rows per pass over the int32 bin keys: the key scratch is KEY_ROWS x (wider side) int32, a quarter
of a [256, V] fp32 block buffer, reused for every pass (no full-block int32 key buffer)."""


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
    """Per-row bin counts [B, K] int64 and per-bin value sums [B * K] float64 of x [B, n]."""
    B, K = x.shape[0], grid.nbins
    counts = torch.empty(B * K, dtype=torch.int64, device=x.device)
    # per-bin value sums in x's dtype (bincount's weights would make a float64 copy of the whole block)
    sums = x.new_zeros(B * K)
    for r0, r1 in _row_ranges(B, rows):
        k = _sub_keys(x, grid, r0, r1, scratch)
        counts[r0 * K : r1 * K] = torch.bincount(k, minlength=(r1 - r0) * K)
        sums[r0 * K : r1 * K].index_add_(0, k, x[r0:r1].reshape(-1))
    return counts.view(B, K), sums.to(torch.float64)


def _entries_in(x: torch.Tensor, flat_bins: torch.Tensor, grid: Grid, rows: int, scratch: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices (row * n + col) of the entries of x [B, n] whose bin is marked in flat_bins [B * K]."""
    B, n = x.shape
    K = grid.nbins
    found = []
    for r0, r1 in _row_ranges(B, rows):
        k = _sub_keys(x, grid, r0, r1, scratch)
        found.append(torch.nonzero(flat_bins[r0 * K : r1 * K].index_select(0, k)).squeeze(1) + r0 * n)
    return torch.cat(found)


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
    not given or too small; pass one to reuse it across blocks)."""
    grid = Grid.of(a.dtype, bits)
    B, na_cols = a.shape
    K = grid.nbins
    dev = a.device
    scratch = key_scratch(min(rows, B), max(na_cols, b.shape[1]), dev, scratch)
    la, sa = _histogram(a, grid, rows, scratch)
    lb, sb = _histogram(b, grid, rows, scratch)
    if comm.world_size(group) > 1:
        counts = torch.stack([la, lb]).to(torch.int32)
        comm.all_reduce_(counts, "sum", group)
        n_a, n_b = counts[0].long(), counts[1].long()
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

    amb_idx = torch.zeros(0, dtype=torch.int64, device=dev)
    amb_sign = torch.zeros(0, dtype=torch.int8, device=dev)
    own_rows = own_contrib = None
    contested = 0
    if bool(amb.any()):  # same decision on every rank (global counts)
        flat_amb = amb.view(-1)
        ia = _entries_in(a, flat_amb, grid, rows, scratch)
        nb_cols = b.shape[1]
        ib = _entries_in(b, flat_amb, grid, rows, scratch)
        rec = torch.cat(
            [
                torch.stack(
                    [(ia // na_cols).double(), a.reshape(-1)[ia].double(), torch.ones_like(ia, dtype=torch.float64)], 1
                ),
                torch.stack(
                    [(ib // nb_cols).double(), b.reshape(-1)[ib].double(), -torch.ones_like(ib, dtype=torch.float64)], 1
                ),
            ]
        )
        m_own = rec.shape[0]
        ws, rk = comm.world_size(group), comm.rank(group)
        if ws > 1:
            m = torch.tensor([float(m_own)], device=dev)
            comm.all_reduce_(m, "max", group)
            M = int(m.item())
            padded = rec.new_zeros(M, 3)
            padded[:m_own] = rec
            allrec = comm.all_gather_rows(padded, group)
        else:
            M, allrec = m_own, rec
        gpos = torch.nonzero(allrec[:, 2] != 0).squeeze(1)
        row, val, lab = allrec[gpos, 0], allrec[gpos, 1], allrec[gpos, 2]
        contested = int(gpos.numel())
        o1 = torch.argsort(val, descending=True, stable=True)
        order = o1[torch.argsort(row[o1], stable=True)]
        gpos, r, v, lab_sorted = gpos[order], row[order].long(), val[order], lab[order]
        k = grid.keys(v.to(grid.dtype)).long()
        kf = r * K + k
        start = torch.ones_like(kf, dtype=torch.bool)
        start[1:] = kf[1:] != kf[:-1]
        seg = torch.cumsum(start.long(), 0) - 1
        first = torch.nonzero(start).squeeze(1)
        dt = d_top.view(-1)[kf].double()
        d_above = dt + _exclusive_in_segments(lab_sorted, first, seg)  # D just above each element
        d_below = d_above + lab_sorted
        last = torch.ones_like(start)
        last[:-1] = start[1:]
        v_next = torch.where(last, lo[k], torch.roll(v, -1))
        seg_term = torch.where(d_below >= 0, 1.0, -1.0).double() * (v - v_next)
        top_seg = torch.where(dt[first] >= 0, 1.0, -1.0).double() * (hi[k[first]] - v[first])  # [segments]
        H = top_seg[seg] + _exclusive_in_segments(seg_term, first, seg)  # integral of s from v up to hi
        J_seg = top_seg + torch.zeros_like(top_seg).index_add_(0, seg, seg_term)
        J.view(-1)[kf[first]] = J_seg
        G_lo = torch.cumsum(J, -1) - J
        G = G_lo.view(-1)[kf] + J.view(-1)[kf] - H
        own = (gpos // M) == rk if ws > 1 else torch.ones_like(gpos, dtype=torch.bool)
        own_rows, own_contrib = r[own], (lab_sorted * G)[own]
        loc = gpos[own] % M if ws > 1 else gpos[own]
        is_a = lab_sorted[own] > 0
        sign_a = torch.where(d_above[own] >= 0, 1, -1).to(torch.int8)
        amb_idx, amb_sign = ia[loc[is_a]], sign_a[is_a]
    else:
        G_lo = torch.cumsum(J, -1) - J
    # settled bins: sum over this rank's entries of G(y) = (G_lo - s lo) + s y, from the local bin sums
    settled = (~amb).double()
    A = (G_lo - s * lo) * settled
    partial = (A * (la - lb).double() + (s * settled) * (sa.view(B, K) - sb.view(B, K))).sum(-1)
    if own_rows is not None:
        partial = partial.index_add(0, own_rows, own_contrib)
    return UldBlock(partial, s.to(torch.int8), amb_idx, amb_sign, contested)


def uld_grad(
    a: torch.Tensor,
    blk: UldBlock,
    bits: int = DEFAULT_GRID_BITS,
    out: torch.Tensor | None = None,
    rows: int = KEY_ROWS,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, n_a] d(sorted L1)/da (+-1, in a's dtype) from the same a as in :func:`uld_block`;
    written into ``out`` (contiguous, a's shape) if given."""
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
        g.view(-1)[blk.amb_idx] = blk.amb_sign.to(a.dtype)
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
    "DEFAULT_GRID_BITS",
    "FLOOR_LOG2",
    "KEY_ROWS",
    "Grid",
    "key_scratch",
    "UldBlock",
    "sorted_l1_hist",
    "uld_block",
    "uld_grad",
]
