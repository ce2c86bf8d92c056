"""The training job as a cluster sees it: signals during start-up, the process group, one bad rank.

Each test reproduces on CPU/gloo a failure mode of the 128-GPU run:
- SLURM's USR1 arriving while the models load, with USR1 ignored as the node wrapper's
  ``trap '' USR1`` leaves it: it used to be discarded and the job ran into its time limit;
- a hung or dead rank: collectives must fail after ``train.dist_timeout_minutes``, not hang;
- NaN in one data-parallel rank's loss: every rank skips the step (one rank raising used to leave
  the others waiting in a collective until the NCCL timeout);
- host synchronizations: at most one device-to-host copy per global step for metrics and flags.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from distributed_utils import run_distributed
from sync_counting import calling_file, is_host_read
from test_distill import sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)
from torch.overrides import TorchFunctionMode


class SyncCounter(TorchFunctionMode):
    """Counts tensor -> host conversions made by xtoken_nemo code (each one a device-to-host
    synchronization on GPU) while ``active``; the optimizer's step is excluded by the caller.
    (megatron's own CPU-side checks, e.g. the RNG tracker comparing CPU RNG states, are not ours
    and touch no device memory.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.active = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active and is_host_read(func, args) and "xtoken_nemo" in calling_file(__file__):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _count_syncs_per_step(trainer, steps: int) -> list[int]:
    """Host syncs of each train_step outside megatron's optimizer step and grad sync."""
    counter = SyncCounter()
    for name in ("step",):
        inner = getattr(trainer.optimizer, name)

        def paused(*a, _inner=inner, **k):
            counter.active = False
            try:
                return _inner(*a, **k)
            finally:
                counter.active = True

        setattr(trainer.optimizer, name, paused)
    counts = []
    with counter:
        for step in range(steps):
            before = len(counter.calls)
            trainer.train_step(step)
            counts.append(len(counter.calls) - before)
    return counts


# ----------------------------------------------------------------------------------------------
def test_signal_while_models_load_is_honoured_after_the_first_step(sp_pair, tmp_path, monkeypatch):  # noqa: F811
    """USR1 during start-up (here: while the teacher checkpoint loads), with USR1 ignored before
    the process starts as under the node wrapper: the run saves after step 1 and stops."""
    import xtoken_nemo.distill.model_setup as models
    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=3, same_tok_teacher=False)
    real_build = models.build_model

    def build_and_get_signalled(mc, *a, **k):
        if not k.get("trainable", True):  # a teacher: SLURM's warning arrives mid-load
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_build(mc, *a, **k)

    monkeypatch.setattr(models, "build_model", build_and_get_signalled)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # trap '' USR1 in the node wrapper
    try:
        trainer = Trainer(cfg, progress=False)
        out = trainer.run()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # the trainer restored the disposition
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert out["status"] == "preempted" and out["step"] == 1
    assert Path(cfg.checkpoint.dir, "latest.txt").read_text().strip() == "1"


def test_process_group_options_bind_the_gpu_and_set_the_timeout():
    from xtoken_nemo.distill.trainer import process_group_options

    gpu = process_group_options(7.5, cuda=True, local_rank=3)
    assert gpu == {"backend": "nccl", "timeout": datetime.timedelta(minutes=7.5), "device_id": torch.device("cuda", 3)}
    cpu = process_group_options(1.0, cuda=False, local_rank=0)
    assert cpu == {"backend": "gloo", "timeout": datetime.timedelta(minutes=1)}


def _timeout_worker(rank: int, port: int, outdir: str) -> None:
    """torchrun's environment, init_distributed with a 3 s timeout; rank 1 never joins the
    collective (a hung rank). Rank 0 must fail within seconds, and close() must tear down."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from xtoken_nemo.distill.trainer import destroy_distributed, init_distributed

    created = init_distributed(tp=1, seed=1, timeout_minutes=0.05)
    result = {"created": created}
    if rank == 0:
        started = time.perf_counter()
        try:
            torch.distributed.all_reduce(torch.ones(1))
            result["error"] = None
        except Exception as exc:  # gloo: "Timed out waiting ... for recv operation"
            result["error"] = type(exc).__name__ + ": " + str(exc).splitlines()[0]
        result["seconds"] = time.perf_counter() - started
    else:
        time.sleep(20)
    destroy_distributed()
    result["initialized_after_destroy"] = torch.distributed.is_initialized()
    torch.save(result, Path(outdir) / f"rank{rank}.pt")


def test_a_hung_rank_fails_the_collective_after_the_configured_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_timeout_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=120):
        pass
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["created"] is True
    assert r0["error"] is not None, "the all-reduce with a missing rank returned instead of timing out"
    assert r0["seconds"] < 15, f"timed out after {r0['seconds']:.1f} s, not after the configured 3 s"
    assert r0["initialized_after_destroy"] is False


# ----------------------------------------------------------------------------------------------
def _nan_worker(rank: int, world_size: int, pair: dict, run_dir: str) -> dict:
    """DP=2: rank 1's CE is NaN at step index 1 (a bf16 overflow on one GPU); then always."""
    from megatron.core import parallel_state

    import xtoken_nemo.distill.kd as kd
    from xtoken_nemo.distill.trainer import Trainer, TrainingError

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    real_ce = kd.student_ce
    poison = {"steps": {1}, "current": 0}

    def ce_nan_on_rank1(*a, **k):
        ce = real_ce(*a, **k)
        return ce * float("nan") if rank == 1 and poison["current"] in poison["steps"] else ce

    kd.student_ce = ce_nan_on_rank1
    cfg = sp_config(pair, Path(run_dir) / "once", steps=4, same_tok_teacher=False)
    cfg.train.micro_batch_size = 1
    cfg.train.max_consecutive_nonfinite = 2
    trainer = Trainer(cfg, progress=False)
    read_step = trainer.batches.iterator

    def tracking(step):
        poison["current"] = step
        return read_step(step)

    trainer.batches.iterator = tracking
    once = trainer.run()
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.student.parameters())

    poison["steps"] = set(range(100))
    cfg = sp_config(pair, Path(run_dir) / "always", steps=4, same_tok_teacher=False)
    cfg.train.micro_batch_size = 1
    cfg.train.max_consecutive_nonfinite = 2
    trainer = Trainer(cfg, progress=False)
    trainer.batches.iterator = tracking
    try:
        trainer.run()
        stopped = None
    except TrainingError as exc:
        stopped = str(exc)

    # host syncs and all-reduces per step outside the optimizer and the gradient all-reduce
    poison["steps"] = set()
    cfg = sp_config(pair, Path(run_dir) / "count", steps=2, same_tok_teacher=False)
    cfg.train.micro_batch_size = 1
    trainer = Trainer(cfg, progress=False)
    syncs = _count_syncs_per_step(trainer, 2)
    return {
        "once": [h["skipped"] for h in once["history"]],
        "skipped": once["skipped_steps"],
        "finite": weights_finite,
        "stopped": stopped,
        "syncs": syncs,
    }


def test_nan_on_one_data_parallel_rank_skips_the_step_on_every_rank(sp_pair, tmp_path):  # noqa: F811
    res = run_distributed(_nan_worker, world_size=2, tp=1, args=(sp_pair, str(tmp_path)))
    for r in res:
        assert r["once"] == [0.0, 1.0, 0.0, 0.0] and r["skipped"] == 1
        assert r["finite"]
        assert r["stopped"] is not None and "2 steps in a row had NaN/inf" in r["stopped"]
        assert r["syncs"] == [1, 1], r["syncs"]


def test_one_host_sync_per_global_step_with_two_teachers_and_adaptive_alphas(sp_pair, tmp_path):  # noqa: F811
    """Two micro-batches, two teachers (P-KL + KL), adaptive alphas: still one host sync."""
    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=2)
    cfg.train.alpha_mode = "entropy"
    trainer = Trainer(cfg, progress=False)
    assert len(trainer.batches.for_step(0)) == 2
    assert _count_syncs_per_step(trainer, 2) == [1, 1]


def test_progress_lines_in_a_log_that_is_not_a_terminal(sp_pair, tmp_path, caplog):  # noqa: F811
    import logging

    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=4)
    cfg.train.log_interval = 2
    caplog.set_level(logging.INFO, logger="xtoken_nemo")
    Trainer(cfg, progress=True).run()  # pytest's stderr is not a terminal: lines, no bar
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" ")[1] for line in lines] == ["2/4", "4/4"]
    for line in lines:
        for part in (
            "ce ",
            "kd cross ",
            "same ",
            "kd_scale ",
            "total ",
            "lr ",
            "grad_norm ",
            "tok/s",
            "mem ",
            "GiB",
            "ETA ",
        ):
            assert part in line, (part, line)


@pytest.mark.parametrize("kd_scaling", ["dynamic", "balanced"])
def test_logged_kd_scale_is_the_factor_applied(sp_pair, tmp_path, kd_scaling):  # noqa: F811
    """total == ce + kd_scale * kd for every step (kd_scale is relative to the CE weight)."""
    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=2)
    cfg.train.kd_scaling = kd_scaling
    cfg.train.micro_batch_size = cfg.train.global_batch_size  # one micro-batch: the means commute
    out = Trainer(cfg, progress=False).run()
    for h in out["history"]:
        w_ce = 0.5 if kd_scaling == "balanced" else 1.0
        assert h["total"] == pytest.approx(w_ce * (h["ce"] + h["kd_scale"] * h["kd"]), rel=1e-5)
    if kd_scaling == "dynamic":
        assert [h["kd_scale"] for h in out["history"]] == pytest.approx(
            [h["ce"] / abs(h["kd"]) for h in out["history"]], rel=1e-5
        )


def test_run_resumes_past_a_corrupt_latest_checkpoint(sp_pair, tmp_path, caplog):  # noqa: F811
    """The newest checkpoint's .distcp cut short (a node died while the filesystem flushed): the
    run resumes from the one before with a loud warning, or stops in one line when told to."""
    import logging

    from xtoken_nemo.distill.run_checkpoints import CheckpointError
    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=2, same_tok_teacher=False)
    cfg.checkpoint.save_interval = 1
    Trainer(cfg, progress=False).run()
    shard = max((Path(cfg.checkpoint.dir) / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    strict = sp_config(sp_pair, tmp_path, steps=3, same_tok_teacher=False)
    strict.checkpoint.fallback_on_corrupt = False
    with pytest.raises(CheckpointError) as info:
        Trainer(strict, progress=False).run()
    assert "iter_0000002" in str(info.value) and "\n" not in str(info.value)

    caplog.set_level(logging.WARNING, logger="xtoken_nemo")
    out = Trainer(sp_config(sp_pair, tmp_path, steps=3, same_tok_teacher=False), progress=False).run()
    assert [h["step"] for h in out["history"]] == [2, 3]
    assert any("instead of corrupt iter_0000002" in r.getMessage() for r in caplog.records)
    assert (Path(cfg.checkpoint.dir) / "latest.txt").read_text().strip() == "3"


def test_run_with_async_saves_keeps_the_last_two(sp_pair, tmp_path):  # noqa: F811
    """checkpoint.async_save and keep_last through the trainer: every save is published, the last
    one synchronously, and only the newest two remain."""
    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, steps=4, same_tok_teacher=False)
    cfg.checkpoint.save_interval = 1
    cfg.checkpoint.async_save = True
    cfg.checkpoint.keep_last = 2
    out = Trainer(cfg, progress=False).run()
    assert out["status"] == "completed"
    root = Path(cfg.checkpoint.dir)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000004"]
    assert (root / "latest.txt").read_text().strip() == "4"
    resumed = Trainer(sp_config(sp_pair, tmp_path, steps=5, same_tok_teacher=False), progress=False).run()
    assert [h["step"] for h in resumed["history"]] == [5]


def _sleep_forever() -> None:
    time.sleep(60)


def test_forked_children_still_die_of_sigterm_with_the_flag_installed():
    """A Pool/DataLoader worker forked while the preemption handler is installed inherits it; it
    must still stop on SIGTERM (Pool.terminate used to wait forever in the test suite)."""
    import multiprocessing

    from xtoken_nemo.distill.preemption import PreemptionFlag

    flag = PreemptionFlag().install()
    try:
        child = multiprocessing.get_context("fork").Process(target=_sleep_forever)
        child.start()
        time.sleep(0.5)
        child.terminate()  # SIGTERM
        child.join(10)
        assert child.exitcode == -signal.SIGTERM, child.exitcode
        assert not flag.raised
    finally:
        flag.uninstall()
        if child.is_alive():
            child.kill()
