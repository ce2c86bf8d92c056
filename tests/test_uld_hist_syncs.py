"""The histogram ULD (xtoken_nemo/losses/uld_hist.py) without host synchronizations.

On a GPU every read of device data by the host (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``,
``bincount`` sizing its output from the largest key, boolean-mask indexing) stalls the stream.
A TorchFunctionMode counts the calls that do so when they come from our code (the technique of
tests/test_cluster_job.py's ``SyncCounter``); the meta device, which holds no data at all, checks
the same thing another way: any read of a value fails there.

- the default, a static contested-entry buffer (``CONTESTED_SHARE`` = 1/64): forward and backward
  make no host read, on CPU and on the meta device; values and gradients equal the exact sort's; a
  block whose contested entries do not fit returns NaN (value and gradient), never a wrong number;
- ``contested_buffer(share)``: its share replaces ``CONTESTED_SHARE`` inside, and it sums the
  blocks' overflow as a device tensor (what the trainer reads at the end of a step);
- the exact size (``CONTESTED_SHARE = None``): one host read per ``uld_block`` call (the
  contested-entry count), none in ``uld_grad``; same values and gradients as the static buffer,
  bit for bit;
- TP=2: both modes equal TP=1; an overflow on one rank poisons the value on every rank.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from xtoken_nemo.losses import reference as R
from xtoken_nemo.losses import uld_hist
from xtoken_nemo.losses.uld_hist import sorted_l1_hist, uld_block, uld_grad

# Tensor -> host reads; bincount (sizes its output from max(key) on the host even with minlength),
# nonzero / unique / masked_select / argwhere / repeat_interleave (output size from the data)
SYNC_FUNCS = {
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "bincount",
    "unique",
    "unique_consecutive",
    "masked_select",
    "repeat_interleave",
    "tensor",  # a tensor from host data on a GPU: a blocking host-to-device copy
    "as_tensor",
}
MASK_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}  # with a bool index: nonzero inside


def _caller_is_ours() -> bool:
    """Whether the code that called the torch function is ours (past torch's own frames and this test)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            return f"xtoken_nemo{os.sep}" in name
        frame = frame.f_back
    return False


def _has_bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, (tuple, list)) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """Names of the host-synchronizing torch calls made by xtoken_nemo code while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        sync = name in SYNC_FUNCS or (name in MASK_INDEXING and _has_bool_index(args))
        sync = sync or (name == "where" and len(args) == 1)  # torch.where(cond): nonzero
        sync = sync or (name == "to" and any(str(x) == "cpu" for x in (*args[1:], *(kwargs or {}).values())))
        if sync and _caller_is_ours():
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _block(seed: int, rows: int = 6, na: int = 3000, nb: int = 3500, dtype=torch.float32):
    """A [rows, V] block of student / teacher probabilities (random logits, std 3: contested bins in every row)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(rows, na, generator=g, dtype=torch.float64) * 3, -1).to(dtype)
    b = torch.softmax(torch.randn(rows, nb, generator=g, dtype=torch.float64) * 3, -1).to(dtype)
    return a, b


def _value_and_grad(a, b, group=None):
    x = a.clone().requires_grad_(True)
    w = torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype)
    v = sorted_l1_hist(x, b, group)
    (v * w).sum().backward()
    return v.detach(), x.grad


def _reference(a, b):
    x = a.clone().requires_grad_(True)
    w = torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype)
    v = R.sorted_l1(x, b)
    (v * w).sum().backward()
    return v.detach(), x.grad


@pytest.fixture
def static_share(monkeypatch):
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 0.5, raising=False)


@pytest.fixture
def exact_size(monkeypatch):
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", None, raising=False)


def test_default_is_a_static_buffer_and_makes_no_host_sync():
    """The default configuration: uld_block and uld_grad make no host read (the old default, the
    exact size, read the contested-entry count once per block)."""
    assert uld_hist.CONTESTED_SHARE == 1 / 64
    a, b = _block(2)
    with SyncCounter() as counter:
        blk = uld_block(a, b, rows=4)
        uld_grad(a, blk, rows=4)
        v = sorted_l1_hist(a.clone().requires_grad_(True), b)
        v.sum().backward()
    assert counter.calls == []
    assert int(blk.contested) > 0 and int(blk.overflow) == 0


def test_contested_buffer_sets_the_share_and_sums_the_overflow(monkeypatch):
    """Inside contested_buffer(s) uld_block takes s (not CONTESTED_SHARE) and adds its overflow to
    the context's device tensor, with no host read; outside, CONTESTED_SHARE again."""
    a, _ = _block(3, rows=4, na=2000)
    monkeypatch.setattr(uld_hist, "CONTESTED_MIN", 16, raising=False)
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 1.0, raising=False)  # every entry fits
    cap = uld_hist.contested_capacity(a.numel(), 0.01)
    with SyncCounter() as counter, uld_hist.contested_buffer(0.01) as buffer:
        assert buffer.overflow is None
        first = uld_block(a, a.clone())
        second = uld_block(a, a.clone())
    assert counter.calls == []
    assert int(first.overflow) == 2 * (a.numel() - cap) and torch.equal(first.overflow, second.overflow)
    assert buffer.share == 0.01 and int(buffer.overflow) == 2 * int(first.overflow)
    with uld_hist.contested_buffer(1.0) as fits, uld_hist.contested_buffer(None) as exact:
        blk = uld_block(a, a.clone())  # the innermost context
    assert int(blk.overflow) == 0 and int(exact.overflow) == 0 and fits.overflow is None
    assert int(uld_block(a, a.clone()).overflow) == 0  # outside: CONTESTED_SHARE again
    with pytest.raises(ValueError, match="contested share"):
        with uld_hist.contested_buffer(0.0):
            pass


def test_static_buffer_makes_no_host_sync(static_share):
    """Forward + backward on a [rows, V] block: no host read from our code (the old code made 32
    here: bincount per side and key pass, bool(amb.any()), nonzero per side and pass, and
    boolean-mask indexing in the contested walk)."""
    a, b = _block(0)
    assert int(uld_block(a, b).contested) > 0  # the contested walk runs
    x = a.clone().requires_grad_(True)
    with SyncCounter() as counter:
        v = sorted_l1_hist(x, b)
        v.sum().backward()
        blk = uld_block(a, b, rows=4)  # several key passes
        uld_grad(a, blk, rows=4)
    assert counter.calls == []


@pytest.mark.parametrize("share", ["default", 0.5])
def test_static_buffer_runs_on_the_meta_device(monkeypatch, share):
    """The meta device holds no values: forward and backward run there only if nothing reads one
    (the default share, and another; the old default, the exact size, read a count)."""
    if share != "default":
        monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", share, raising=False)
    a = torch.rand(5, 300, device="meta").requires_grad_(True)
    b = torch.rand(5, 350, device="meta")
    v = sorted_l1_hist(a, b)
    v.sum().backward()
    assert v.shape == (5,) and a.grad.shape == (5, 300) and a.grad.device.type == "meta"


def test_exact_size_reads_the_host_once_per_block(exact_size):
    """Exact size: the contested-entry count is the one host read of uld_block; uld_grad reads none."""
    a, b = _block(1)
    with SyncCounter() as counter:
        blk = uld_block(a, b, rows=4)
    assert counter.calls == ["tolist"]
    with SyncCounter() as counter:
        uld_grad(a, blk, rows=4)
    assert counter.calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_static_and_exact_equal_each_other_and_the_sort(monkeypatch, dtype, seed):
    """Same values and gradients with the static buffer as with the exact one (bit for bit: the
    walk is the same, unused slots sit in a segment of their own) and as the sort's (the gradient
    is a +-1 sign per entry; no ties in these inputs)."""
    a, b = _block(seed, dtype=dtype)
    a[:, ::7] = 0.0  # zeros below the floor, as the uncommon parts have
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", None, raising=False)
    exact = _value_and_grad(a, b)
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 0.5, raising=False)
    static = _value_and_grad(a, b)
    assert torch.equal(static[0], exact[0]) and torch.equal(static[1], exact[1])
    ref_v, ref_g = _reference(a, b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(((exact[0] - ref_v).abs() / ref_v).max()) < tol
    assert torch.equal(exact[1][a != 0], ref_g[a != 0])


@pytest.mark.parametrize("zero_first", [False, True])
def test_unused_slots_leave_entry_zero_alone(monkeypatch, zero_first):
    """Unused slots of the static buffer write at index 0 whatever entry 0 ends with: its contested
    sign when it is contested (identical rows: every non-zero entry is), its table sign when not."""
    a, _ = _block(5, rows=3, na=400)
    a[:, 1::3] = 0.0  # never contested: the buffer (all entries) keeps unused slots
    if zero_first:
        a[0, 0] = 0.0
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", None, raising=False)
    exact = _value_and_grad(a, a.clone())
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 1.0, raising=False)
    static = _value_and_grad(a, a.clone())
    assert torch.equal(static[1], exact[1]) and torch.equal(static[0], exact[0])
    assert float(exact[0].abs().max()) < 1e-6  # the sorted L1 of identical rows


def test_static_overflow_is_nan_never_a_wrong_number(monkeypatch):
    """Identical rows contest every non-empty bin: a buffer for 1% of the entries overflows, and the
    value and the gradient are NaN with the overflow reported (the trainer recomputes such a step
    with a larger buffer); a buffer large enough gives the exact 0."""
    a, _ = _block(3, rows=4, na=2000)
    monkeypatch.setattr(uld_hist, "CONTESTED_MIN", 16, raising=False)
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 0.01, raising=False)
    cap = uld_hist.contested_capacity(a.numel(), 0.01)
    assert cap == 80
    blk = uld_block(a, a.clone())
    assert int(blk.overflow) == 2 * (a.numel() - cap) and int(blk.contested) == 2 * cap
    assert bool(torch.isnan(blk.partial).all())
    g = uld_grad(a, blk)
    assert bool(torch.isnan(g[:, 0]).all()) and bool(torch.isfinite(g[:, 1:]).all())
    v, grad = _value_and_grad(a, a.clone())
    assert bool(torch.isnan(v).all()) and not bool(torch.isfinite(grad).all())
    monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", 1.0, raising=False)
    blk = uld_block(a, a.clone())
    assert int(blk.overflow) == 0 and float(blk.partial.abs().max()) < 1e-6


def test_capacity_is_validated():
    assert uld_hist.contested_capacity(10, 1.0) == 10
    assert uld_hist.contested_capacity(10**8, 0.01) == 10**6
    assert uld_hist.contested_capacity(1000, 0.01) == 1000  # at least CONTESTED_MIN, at most all entries
    with pytest.raises(ValueError, match="share"):
        uld_hist.contested_capacity(10, 0.0)


# ---------------------------------------------------------------------------------------------
# TP=2: the records are all-gathered (static size in both modes), the overflow travels with them
# ---------------------------------------------------------------------------------------------
def _tp2_worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    a, b = _block(4, rows=5, na=600, nb=700, dtype=torch.float64)
    cols_a, cols_b = a.shape[1] // world_size, b.shape[1] // world_size
    a_loc = a[:, rank * cols_a : (rank + 1) * cols_a]
    b_loc = b[:, rank * cols_b : (rank + 1) * cols_b]
    out = {}
    for share in (None, 0.5):
        uld_hist.CONTESTED_SHARE = share
        out[share] = _value_and_grad(a_loc, b_loc, group)
    # rank 1 holds every non-zero entry (rank 0 only zeros): only rank 1's buffer overflows
    uld_hist.CONTESTED_SHARE, uld_hist.CONTESTED_MIN = 0.01, 4
    z = torch.zeros_like(a_loc)
    same = z if rank == 0 else a[:, :cols_a]
    out["overflow"] = uld_block(same, same.clone(), group).partial
    return out


@pytest.mark.distributed
def test_tp2_static_and_exact_equal_tp1_and_overflow_reaches_every_rank():
    from distributed_utils import run_distributed

    res = run_distributed(_tp2_worker, world_size=2, tp=2)
    a, b = _block(4, rows=5, na=600, nb=700, dtype=torch.float64)
    ref_v, ref_g = _value_and_grad(a, b)
    for share in (None, 0.5):
        v0, g0 = res[0][share]
        v1, g1 = res[1][share]
        assert torch.equal(v0, v1)
        torch.testing.assert_close(v0, ref_v, rtol=1e-12, atol=0)
        assert torch.equal(torch.cat([g0, g1], 1), ref_g)
    assert all(bool(torch.isnan(r["overflow"]).all()) for r in res)
