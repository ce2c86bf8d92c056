"""What the losses of a training step cost the host, per micro-batch: the parts a GPU run pays for.

- Host synchronizations: a step with H-KL, GOLD and ULD teachers makes one device-to-host copy per
  global step, as test_cluster_job checks for P-KL + KL teachers, counted the same way (a
  TorchFunctionMode recording the tensor -> host conversions our code makes), plus every blocking
  copy of an index or mask to a device made by the loss path (from pageable memory, such a copy
  waits until the GPU has run everything queued before it).
- On a device, the loss path reads no device value, puts no host tensor into a device op (an index
  copied to the device and waited for) and makes no blocking copy. Checked on the "meta" device,
  the stand-in for CUDA of test_losses_device.py (a value read raises there; the other two are
  recorded), and on a machine with CUDA under torch's sync debug mode as well; J-KL's joint term
  (its host index, its row-sparse gradient) the same way.
- The common pairs and their layout (``hkl_pairs``, ``check_pairs``, ``_hybrid_layout``) are built
  once per teacher when the trainer starts, never in a step.
- The vectorised chunk indexing (``chunk_index``, ``kd._flat_chunks``) gives the loops it replaced
  bit for bit, errors included.
"""

from __future__ import annotations

import collections
import logging
import os
import sys

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed
from sync_counting import SYNC_METHODS, calling_file, is_host_read
from test_distill import sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)
from torch.overrides import TorchFunctionMode

import xtoken_nemo.distill.kd as kd
import xtoken_nemo.losses.hybrid as hybrid
from xtoken_nemo.distill.config import TeacherConfig
from xtoken_nemo.distill.teacher_loss import build_teacher_spec
from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses.checks import nonfinite_checks_deferred
from xtoken_nemo.losses.common import ChunkSpans, chunk_index, chunk_positions
from xtoken_nemo.tokenizers import load_tokenizer

LOSS_PATH = (f"xtoken_nemo{os.sep}losses{os.sep}", f"xtoken_nemo{os.sep}distill{os.sep}kd.py")


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a ``Tensor.to`` call moves to (None: a dtype change only)."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _blocking_copy(func, args: tuple, kwargs: dict) -> bool:
    """``Tensor.to`` of a host tensor to a device without ``non_blocking=True``."""
    if getattr(func, "__name__", "") != "to" or not args or not isinstance(args[0], torch.Tensor):
        return False
    non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
    return args[0].device.type == "cpu" and _target_device(args, kwargs) is not None and not non_blocking


class StepSyncCounter(TorchFunctionMode):
    """test_cluster_job's SyncCounter (float/bool tensor -> host conversions by our code; integer
    tensors there are host batch data), every tensor -> host conversion made by the losses (which
    get no host batch data in a step: an integer read there is a computed count, e.g. the exact-size
    histogram ULD's contested-entry count), plus the blocking copies of index and mask tensors
    (integer, bool: what the loss path builds on the host) to a device, made by the loss path. (On
    this CPU the device is the host: float tensors there are computed values, already on the device.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.active = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and args and isinstance(args[0], torch.Tensor):
            where = calling_file(__file__)
            read = getattr(func, "__name__", "") in SYNC_METHODS
            if (is_host_read(func, args) and "xtoken_nemo" in where) or (read and LOSS_PATH[0] in where):
                self.calls.append(f"{func.__name__} {where}")
            elif (
                any(p in where for p in LOSS_PATH)
                and not args[0].is_floating_point()
                and _blocking_copy(func, args, kwargs)
            ):
                self.calls.append(f"blocking copy {where}")
        return func(*args, **kwargs)


def _flat_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat_tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _flat_tensors(item)]
    return []


class DeviceHostMix(TorchFunctionMode):
    """Records, for calls made by the loss path, what makes the host wait for a device: a host
    tensor (not a 0-dim scalar) among a device op's inputs (torch copies it over and waits, e.g. a
    host index into device logits) and a blocking ``.to(device)`` of a host tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = calling_file(__file__)
        if any(p in where for p in LOSS_PATH):
            tensors = _flat_tensors(args) + _flat_tensors(kwargs)
            on_device = any(t.device.type != "cpu" for t in tensors)
            from_host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if on_device and from_host:
                self.calls.append(f"host tensor into {getattr(func, '__name__', func)} at {where}")
            elif _blocking_copy(func, args, kwargs):
                self.calls.append(f"blocking copy at {where}")
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# chunk tables and specs
# ----------------------------------------------------------------------------------------------
def _random_table(rng: np.random.Generator, batch: int, s_len: int, t_len: int, pad_rows: int) -> torch.Tensor:
    """[B, K, 4] chunk table as the data pipeline makes it: consecutive spans of 1-3 positions on
    each side, then -1 rows; sequence b stops early for b > 0 (different chunk counts)."""
    rows = []
    for b in range(batch):
        s = t = 0
        seq = []
        limit = s_len - 3 * b
        while True:
            ls, lt = (int(x) for x in rng.integers(1, 4, size=2))
            if s + ls > limit or t + lt > t_len:
                break
            seq.append((s, s + ls, t, t + lt))
            s, t = s + ls, t + lt
        rows.append(seq)
    k = max(len(r) for r in rows) + pad_rows
    table = torch.full((batch, k, 4), -1, dtype=torch.int64)
    for b, seq in enumerate(rows):
        if seq:
            table[b, : len(seq)] = torch.tensor(seq)
    return table


def _spec(pair: dict, mode: str, merge: str, tc_extra: dict | None = None):
    student = load_tokenizer(pair["student"])
    teacher = student if mode == "kl" else load_tokenizer(pair["teacher"])
    tc = TeacherConfig(
        name=mode,
        mode=mode,
        merge=merge,
        projection=pair["W"] if mode in ("pkl", "hkl") else None,
        **{"uld_method": "sort", **(tc_extra or {})},
    )
    spec = build_teacher_spec(tc, student, teacher, _padded(student.vocab_size), _padded(teacher.vocab_size))
    return spec, student.vocab_size


def _padded(vocab: int) -> int:
    return -(-vocab // 128) * 128


DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mode,merge",
    [
        ("hkl", "chain"),
        ("hkl", "first"),
        ("hkl", "logmean"),
        ("gold", "chain"),
        ("uld", "chain"),
        ("kl", "chain"),
        ("pkl", "chain"),
        ("hkl-hist", "chain"),
        ("gold-hist", "chain"),
        ("uld-hist", "chain"),
    ],
)
def test_loss_path_leaves_the_host_free_on_a_device(sp_pair, device, mode, merge):  # noqa: F811
    """teacher_kd_loss (forward and backward) and the "ce" confidence of distillation_loss on
    device logits with the host chunk table of a micro-batch: after a first call (the per-device
    copies of the spec), nothing waits for the device. H-KL/GOLD/ULD by the sort, and ("-hist") by
    the histogram with its default static contested-entry buffer (the exact size read a count on
    the host, which fails on meta)."""
    if device == "meta" and mode == "pkl":
        pytest.skip("P-KL's sparse CSR products have no meta kernels (checked on CUDA)")
    mode, _, method = mode.partition("-")
    spec, student_vocab = _spec(sp_pair, mode, merge, {"uld_method": method} if method else None)
    B, S, T = 2, 24, 20
    chunks = _random_table(np.random.default_rng(3), B, S, T, pad_rows=2)
    s_width, t_width = _padded(student_vocab), _padded(spec.vocab_size)

    def call() -> None:
        s = torch.randn(B, S, s_width, device=device, requires_grad=True)
        t = torch.randn(B, T, t_width, device=device)
        s_labels = torch.randint(0, student_vocab, (B, S), device=device)
        t_labels = torch.randint(0, spec.vocab_size, (B, T), device=device)
        out = kd.teacher_kd_loss(spec, s, s_labels, student_vocab, t, t_labels, chunks, 16)
        out.trainable.backward()
        targets = t_labels.reshape(-1)[out.teacher_first]  # as distillation_loss for alpha_mode "ce"
        kd.teacher_confidence_parallel(out.teacher_chunks, "ce", spec.vocab_size, targets=targets)

    with nonfinite_checks_deferred():  # the trainer's switch: the NaN/inf checks read values
        call()
        mix = DeviceHostMix()
        debug = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
        try:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
            with mix:
                call()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(debug)
    assert mix.calls == []


@pytest.mark.parametrize("device", DEVICES)
def test_jkl_joint_term_leaves_the_host_free_on_a_device(device):
    """J-KL's joint term (forward and its row-sparse backward) on device logits with the host
    index of a micro-batch (built from the host chunk table and host labels): no device value read,
    no host tensor in a device op, no blocking copy. The jkl mode's P-KL term is the pkl case above
    (no meta kernels for its sparse CSR products: checked on CUDA only)."""
    from test_jkl import V_S, V_T, synthetic_case

    from xtoken_nemo.losses.jkl import jkl_term_parallel, joint_entries

    case = synthetic_case(0, torch.float32)
    entries = joint_entries(case["support"], case["s_spans"], case["t_spans"], case["targets"])
    assert entries is not None and entries.num_entries > 0
    n, t_len = len(case["s_spans"].starts), case["teacher"].shape[0]

    def call() -> torch.Tensor:
        s = torch.randn(n, V_S, device=device, requires_grad=True)
        t = torch.randn(t_len, V_T, device=device)
        jkl_term_parallel(s, t, entries, V_S, V_T, block_size=16).sum().backward()
        return s.grad

    with nonfinite_checks_deferred():
        call()
        mix = DeviceHostMix()
        debug = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
        try:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            with mix:
                grad = call()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(debug)
    assert mix.calls == []
    assert grad.layout == torch.sparse_coo and grad.device.type == device  # the rows it reached, not [N, V]


# ----------------------------------------------------------------------------------------------
# the trainer: host syncs per step, pair/layout building
# ----------------------------------------------------------------------------------------------
def _hybrid_config(pair: dict, run_dir, uld_method: str, steps: int):
    """sp_config's run with three cross-tokenizer teachers, H-KL, GOLD and ULD, and adaptive
    ("ce") alphas; two micro-batches per step."""
    cfg = sp_config(pair, run_dir, mode="hkl", steps=steps)
    cross = cfg.teachers[0]
    cfg.teachers = [
        TeacherConfig(
            name=mode, model=cross.model, mode=mode, alpha=alpha, projection=cross.projection, uld_method=uld_method
        )
        for mode, alpha in (("hkl", 0.4), ("gold", 0.3), ("uld", 0.3))
    ]
    cfg.train.alpha_mode = "ce"
    return cfg


def _count_syncs_per_step(trainer, steps: int) -> tuple[list[int], list[list[str]]]:
    """Host syncs of each train_step outside megatron's optimizer step (as test_cluster_job)."""
    counter = StepSyncCounter()
    inner = trainer.optimizer.step

    def paused(*a, **k):
        counter.active = False
        try:
            return inner(*a, **k)
        finally:
            counter.active = True

    trainer.optimizer.step = paused
    counts, calls = [], []
    with counter:
        for step in range(steps):
            before = len(counter.calls)
            trainer.train_step(step)
            counts.append(len(counter.calls) - before)
            calls.append(counter.calls[before:])
    return counts, calls


@pytest.mark.parametrize("uld_method", ["sort", "hist"])
def test_one_host_sync_per_global_step_with_hkl_gold_uld_teachers(sp_pair, tmp_path, uld_method):  # noqa: F811
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(_hybrid_config(sp_pair, tmp_path, uld_method, steps=2), progress=False)
    assert len(trainer.batches.for_step(0)) == 2
    counts, calls = _count_syncs_per_step(trainer, 2)
    assert counts == [1, 1], collections.Counter(c for step in calls for c in step).most_common(8)


def test_uld_overflow_recomputes_the_step_with_a_doubled_share(sp_pair, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A static contested-entry buffer far too small (1/1024 of a block's entries, at least 4):
    the histogram ULD overflows, the trainer doubles the share and recomputes the step on the same
    micro-batches (kept as they were read, whether in-process or by data workers: no second read),
    no step is skipped, a warning says so, and the run equals one with the exact-size buffer bit for
    bit (the static walk is the exact one's plus unused slots sorted last)."""
    from test_distill import _params

    from xtoken_nemo.distill.trainer import Trainer
    from xtoken_nemo.losses import uld_hist

    monkeypatch.setattr(uld_hist, "CONTESTED_MIN", 4)

    def run(share: float | None, name: str):
        monkeypatch.setattr(uld_hist, "CONTESTED_SHARE", share)  # the trainer reads it when it starts
        trainer = Trainer(_hybrid_config(sp_pair, tmp_path / name, "hist", steps=3), progress=False)
        reads = collections.Counter()
        read_step = trainer.batches.iterator

        def counting(step):
            reads[step] += 1
            return read_step(step)

        trainer.batches.iterator = counting
        out = trainer.run()
        assert reads == {0: 1, 1: 1, 2: 1}
        return trainer, out

    exact_trainer, exact = run(None, "exact")
    with caplog.at_level(logging.WARNING, logger="xtoken_nemo"):
        static_trainer, static = run(1 / 1024, "static")
    warnings = [r.getMessage() for r in caplog.records if "contested-entry buffer overflowed" in r.getMessage()]
    assert warnings and all("step recomputed" in w for w in warnings), warnings
    assert warnings[0].startswith("step 1: ") and f"share raised to {1 / 512:g}" in warnings[0]
    assert static_trainer.uld_share == 2 ** len(warnings) / 1024 and exact_trainer.uld_share is None
    assert static["skipped_steps"] == exact["skipped_steps"] == 0
    assert static["status"] == "completed" and len(static["history"]) == 3
    timing = {"tokens_per_s", "memory_gb"}
    for got, want in zip(static["history"], exact["history"]):
        assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    got, want = _params(static_trainer.student), _params(exact_trainer.student)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _overflow_runs(pair: dict, run_dir: str, tp: int) -> dict:
    """The exact-size run and the too-small static buffer's run (as above) in this process group:
    histories (timings left out), the grown share, and whether this rank's weights are equal."""
    from test_distill import _params

    from xtoken_nemo.distill.trainer import Trainer
    from xtoken_nemo.losses import uld_hist

    uld_hist.CONTESTED_MIN = 4
    out, params = {}, {}
    for name, share in (("exact", None), ("static", 1 / 1024)):
        uld_hist.CONTESTED_SHARE = share
        cfg = _hybrid_config(pair, run_dir / name, "hist", steps=2)
        cfg.train.tensor_parallel = tp
        trainer = Trainer(cfg, progress=False)
        run = trainer.run()
        history = [{k: v for k, v in h.items() if k not in ("tokens_per_s", "memory_gb")} for h in run["history"]]
        out[name] = (history, run["skipped_steps"], trainer.uld_share)
        params[name] = _params(trainer.student)
    out["same_weights"] = all(torch.equal(params["static"][k], params["exact"][k]) for k in params["exact"])
    return out


def _tp2_dp2_overflow_worker(rank: int, world_size: int, pair: dict, run_dir: str) -> dict:
    from pathlib import Path

    from megatron.core import parallel_state

    tp2 = _overflow_runs(pair, Path(run_dir) / "tp2", tp=2)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    # DP=2: each rank its own micro-batches, so its own overflow; the step-end all-reduce decides
    return {"tp2": tp2, "dp2": _overflow_runs(pair, Path(run_dir) / "dp2", tp=1)}


@pytest.mark.distributed
def test_uld_overflow_recompute_at_tp2_and_dp2(sp_pair, tmp_path):  # noqa: F811
    """TP=2 and DP=2: both ranks overflow-recompute the same steps (same grown share), skip none,
    and equal the exact-size run of the same layout bit for bit."""
    ranks = run_distributed(_tp2_dp2_overflow_worker, world_size=2, tp=2, args=(sp_pair, str(tmp_path)))
    for layout in ("tp2", "dp2"):
        (h0, skipped0, share0), (h1, skipped1, share1) = (r[layout]["static"] for r in ranks)
        assert share0 == share1 > 1 / 1024 and skipped0 == skipped1 == 0, layout
        assert h0 == h1, layout  # reduced metrics: the same on every rank
        for r in ranks:
            assert r[layout]["static"][0] == r[layout]["exact"][0] and r[layout]["same_weights"], layout


def test_pairs_and_layout_are_built_once_per_teacher_not_per_micro_batch(sp_pair, tmp_path, monkeypatch):  # noqa: F811
    """hkl_pairs, check_pairs and _hybrid_layout, wherever our modules call them from, over the
    trainer's start and three steps of two micro-batches: once per teacher, at the start."""
    from xtoken_nemo.distill.trainer import Trainer

    calls = collections.Counter()
    for name in ("hkl_pairs", "check_pairs", "_hybrid_layout"):
        original = getattr(hybrid, name)

        def counting(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("xtoken_nemo") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counting)
    trainer = Trainer(_hybrid_config(sp_pair, tmp_path, "sort", steps=3), progress=False)
    at_start = dict(calls)
    calls.clear()
    for step in range(3):
        trainer.train_step(step)
    # one H-KL teacher (W's argmax pairs); three teachers with a common set (H-KL, GOLD, ULD's empty one)
    assert (at_start, dict(calls)) == ({"hkl_pairs": 1, "check_pairs": 3, "_hybrid_layout": 3}, {})


def _spec_losses(pair: dict, tp: int, rank: int) -> dict:
    """teacher_kd_loss of H-KL/GOLD/ULD specs built by build_teacher_spec at this TP (spec per
    rank: its common set is laid out on the rank's shards), on this rank's columns of fixed logits:
    values and this rank's columns of the student gradient."""
    out = {}
    with nonfinite_checks_deferred():
        for mode in ("hkl", "gold", "uld"):
            for method in ("sort", "hist"):
                st, tt = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
                s_pad, t_pad = -(-st.vocab_size // 256) * 256, -(-tt.vocab_size // 256) * 256
                tc = TeacherConfig(name=mode, mode=mode, projection=pair["W"], uld_method=method)
                spec = build_teacher_spec(tc, st, tt, s_pad // tp, t_pad // tp)
                assert spec.common.s_shard.start == rank * s_pad // tp
                g = torch.Generator().manual_seed(7)
                B, S, T = 2, 12, 10
                chunks = _random_table(np.random.default_rng(5), B, S, T, pad_rows=1)
                s_full = torch.randn(B, S, s_pad, generator=g) * 3
                t_full = torch.randn(B, T, t_pad, generator=g) * 3
                s_labels = torch.randint(0, st.vocab_size, (B, S), generator=g)
                t_labels = torch.randint(0, tt.vocab_size, (B, T), generator=g)
                s_cols, t_cols = s_pad // tp, t_pad // tp
                s = s_full[..., rank * s_cols : (rank + 1) * s_cols].clone().requires_grad_(True)
                t = t_full[..., rank * t_cols : (rank + 1) * t_cols]
                r = kd.teacher_kd_loss(spec, s, s_labels, st.vocab_size, t, t_labels, chunks, 8)
                r.trainable.backward()
                out[f"{mode}-{method}"] = (r.trainable.detach(), s.grad)
    return out


def _tp2_specs_worker(rank: int, world_size: int, pair: dict) -> dict:
    return _spec_losses(pair, 2, rank)


@pytest.mark.distributed
def test_teacher_specs_common_sets_at_tp2_equal_tp1(sp_pair):  # noqa: F811
    """The common set built once per TP rank (build_teacher_spec at TP=2) gives the TP=1 loss and
    gradient."""
    full = _spec_losses(sp_pair, 1, 0)
    ranks = run_distributed(_tp2_specs_worker, world_size=2, tp=2, args=(sp_pair,))
    for key, (value, grad) in full.items():
        for r in ranks:
            assert r[key][0].item() == pytest.approx(value.item(), rel=1e-5), key
        assert torch.allclose(torch.cat([r[key][1] for r in ranks], dim=-1), grad, rtol=1e-4, atol=1e-7), key


# ----------------------------------------------------------------------------------------------
# chunk indexing: the vectorised code equals the loops it replaced
# ----------------------------------------------------------------------------------------------
def _loop_chunk_index(chunks, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_index as it was (a Python loop over chunks and positions): the oracle."""
    if len(chunks) == 0:
        raise LossInputError("empty chunk list: the alignment produced no chunk; skip this sequence")
    pos, cid = [], []
    for k, chunk in enumerate(chunks):
        chunk = [int(i) for i in chunk]
        if not chunk:
            raise LossInputError(f"chunk {k} is empty; every aligned chunk needs at least one position")
        if min(chunk) < 0 or max(chunk) >= num_positions:
            raise LossInputError(f"chunk {k} names positions outside [0, {num_positions})")
        pos.extend(chunk)
        cid.extend([k] * len(chunk))
    return torch.tensor(pos, dtype=torch.int64), torch.tensor(cid, dtype=torch.int64)


def _loop_flat_chunks(chunks: torch.Tensor, s_len: int, t_len: int) -> tuple[list[range], list[range]]:
    """kd._flat_chunks as it was (a loop over the table's rows): the oracle."""
    s_pos, t_pos = [], []
    for b in range(chunks.shape[0]):
        for s0, s1, t0, t1 in chunks[b].tolist():
            if s0 < 0:
                continue
            s_pos.append(range(b * s_len + s0, b * s_len + s1))
            t_pos.append(range(b * t_len + t0, b * t_len + t1))
    return s_pos, t_pos


def _outcome(fn, *args):
    """(pos, cid) or the LossInputError's message."""
    try:
        return fn(*args)
    except LossInputError as exc:
        return str(exc)


def _same(got, want) -> bool:
    if isinstance(want, str) or isinstance(got, str):
        return got == want
    return all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


def _random_chunks(rng: np.random.Generator, num_positions: int) -> list:
    """Chunks of arbitrary positions (any order, repeats) in the containers callers pass."""
    chunks = []
    for _ in range(int(rng.integers(1, 40))):
        c = rng.integers(0, num_positions, size=int(rng.integers(1, 5)))
        kind = int(rng.integers(4))
        if kind == 0:
            chunks.append([int(x) for x in c])
        elif kind == 1:
            chunks.append(tuple(c))  # numpy ints
        elif kind == 2:
            start = int(c[0])
            chunks.append(range(start, min(num_positions, start + int(rng.integers(1, 4)))))
        else:
            chunks.append(torch.tensor(c))
    return chunks


def test_chunk_index_equals_the_loop_on_random_alignments():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_pos = int(rng.integers(1, 60))
        chunks = _random_chunks(rng, n_pos)
        want = _loop_chunk_index(chunks, n_pos)
        assert _same(chunk_index(chunks, n_pos), want)
        index = chunk_positions(chunks, n_pos)
        assert index.first.tolist() == [int(next(iter(c))) for c in chunks]
        assert index.counts.tolist() == [len(c) for c in chunks]
        # broken lists: an empty chunk or a position out of range (or both) at random places
        broken = list(chunks)
        bad = ([], [n_pos], [-1], [0, n_pos + 3], range(2, 2))
        for _ in range(int(rng.integers(1, 3))):
            broken[int(rng.integers(len(broken)))] = bad[int(rng.integers(len(bad)))]
        assert _same(_outcome(chunk_index, broken, n_pos), _outcome(_loop_chunk_index, broken, n_pos))


@pytest.mark.parametrize(
    "chunks,n_pos",
    [
        ([], 5),
        ([[0], []], 5),
        ([[0], [5]], 5),
        ([[-1]], 5),
        ([[0], [9], []], 5),
        ([[0], [], [9]], 5),
        ([range(0, 5)], 5),
        ([range(0, 6)], 5),
        ([[4, 0, 4]], 5),
        ([(np.int64(2),)], 3),
    ],
)
def test_chunk_index_edge_cases_equal_the_loop(chunks, n_pos):
    assert _same(_outcome(chunk_index, chunks, n_pos), _outcome(_loop_chunk_index, chunks, n_pos))


def test_flat_chunks_and_their_index_equal_the_loops():
    rng = np.random.default_rng(1)
    cases = [(torch.full((1, 0, 4), -1, dtype=torch.int64), 7, 5), (torch.full((2, 3, 4), -1, dtype=torch.int64), 7, 5)]
    for _ in range(200):
        B, S, T = int(rng.integers(1, 5)), int(rng.integers(4, 40)), int(rng.integers(4, 40))
        table = _random_table(rng, B, S, T, pad_rows=int(rng.integers(0, 4)))
        if table.shape[1] and rng.random() < 0.3:  # a padding row between chunks
            table[int(rng.integers(B)), int(rng.integers(table.shape[1]))] = -1
        cases.append((table, S, T))
    for table, S, T in cases:
        s_spans, t_spans = kd._flat_chunks(table, S, T)
        s_want, t_want = _loop_flat_chunks(table, S, T)
        for spans, want, n in ((s_spans, s_want, table.shape[0] * S), (t_spans, t_want, table.shape[0] * T)):
            assert [range(int(a), int(b)) for a, b in zip(spans.starts, spans.ends)] == want
            assert _same(_outcome(chunk_index, spans, n), _outcome(_loop_chunk_index, want, n))


@pytest.mark.parametrize(
    "starts,ends,n_pos",
    [([0, 2], [2, 2], 5), ([0, 3], [2, 6], 5), ([-1], [1], 5), ([0, 4, 9], [4, 3, 8], 5), ([0], [5], 5)],
)
def test_chunk_spans_errors_equal_the_loop(starts, ends, n_pos):
    spans = ChunkSpans(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))
    ranges = [range(a, b) for a, b in zip(starts, ends)]
    assert _same(_outcome(chunk_index, spans, n_pos), _outcome(_loop_chunk_index, ranges, n_pos))
