"""Fully parallel checkpoint save/load over data parallelism, async save, keep_last retention.

One spawn of two gloo processes (TP=1 x DP=2) runs a real distillation (tiny SentencePiece pair
from test_distill) and measures, per rank, the bytes written by one save (the ``__<rank>_*.distcp``
files torch DCP writes) and the bytes read by one resume (counted in torch DCP's FileSystemReader),
with megatron's fully parallel strategies and without them (the code before this change).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from test_distill import _run_until, sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)

KEYS = ("total", "ce", "kd/cross", "kd/same", "grad_norm", "lr")


def distcp_bytes_per_rank(directory: Path) -> dict[int, int]:
    """Bytes of the ``__<rank>_<i>.distcp`` files torch DCP wrote, by writing rank."""
    out: dict[int, int] = {}
    for f in Path(directory).glob("__*_*.distcp"):
        rank = int(re.match(r"__(\d+)_", f.name).group(1))
        out[rank] = out.get(rank, 0) + f.stat().st_size
    return out


class _CountReads:
    """Counts the bytes this process reads from ``.distcp`` files through torch DCP's
    FileSystemReader (megatron's torch_dist load strategy reads with it)."""

    def __enter__(self):
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        self.bytes = 0
        self._orig = FileSystemReader.read_data
        counter = self

        def read_data(reader, plan, planner):
            counter.bytes += sum(reader.storage_data[item.storage_index].length for item in plan.items)
            return counter._orig(reader, plan, planner)

        FileSystemReader.read_data = read_data
        return self

    def __exit__(self, *exc):
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        FileSystemReader.read_data = self._orig


def _params(model) -> dict:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _optim_state(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)
    return [t.detach().clone() for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _dp2_worker(rank, world_size, pair, run_dir):
    from xtoken_nemo.distill import run_checkpoints as ck
    from xtoken_nemo.distill.trainer import Trainer

    run_dir = Path(run_dir)
    out = {}

    def cfg(name: str, steps: int = 4):
        c = sp_config(pair, run_dir / name, mode="pkl", steps=steps, tp=1)
        c.train.micro_batch_size = 1  # global batch 4 = 2 DP ranks x 2 micro-batches
        return c

    # 1. an uninterrupted DP=2 run (its final save and nothing else use the fully parallel strategy)
    t0 = time.perf_counter()
    straight = Trainer(cfg("straight"), progress=False)
    out["straight"] = straight.run()["history"]
    out["straight_s"] = time.perf_counter() - t0

    # 2. one save of the same state with and without the fully parallel strategy
    state = straight.state.__dict__.copy()
    for name, parallel in (("serial", False), ("parallel", True)):
        ck.save_checkpoint(run_dir / f"bytes_{name}", 4, straight.student, straight.optimizer, state, parallel=parallel)

    # 3. the same run interrupted after step 2 and resumed (fully parallel save and load), with
    #    the bytes each rank reads on resume counted
    interrupted = _run_until(cfg("resumed"), stop_after=2)
    assert interrupted["status"] == "preempted" and interrupted["step"] == 2
    resumed = Trainer(cfg("resumed"), progress=False)
    with _CountReads() as reads:
        resumed.resume()
    out["read_parallel"] = reads.bytes
    resumed_params, resumed_optim = _params(resumed.student), _optim_state(resumed.optimizer)
    # the same checkpoint read the old way (every rank reads everything): same tensors
    with _CountReads() as reads:
        ck.load_checkpoint(run_dir / "resumed" / "ckpt", 2, resumed.student, resumed.optimizer, parallel=False)
    out["read_serial"] = reads.bytes
    serial_params, serial_optim = _params(resumed.student), _optim_state(resumed.optimizer)
    out["parallel_load_equal"] = all(torch.equal(resumed_params[k], serial_params[k]) for k in resumed_params) and all(
        torch.equal(a, b) for a, b in zip(resumed_optim, serial_optim)
    )
    resumed.preemption.uninstall()  # resume() only: run() would have uninstalled it
    out["resumed"] = Trainer(cfg("resumed"), progress=False).run()["history"]

    # 4. async save with keep_last=2: three saves, each published by the next save or the final
    #    finalize; the weights are changed while a save is in flight and the checkpoint still
    #    holds the values at the time of the save
    trainer = resumed
    root = run_dir / "async" / "ckpt"
    snapshot = None
    published = []
    for iteration in (1, 2, 3):
        snapshot = _params(trainer.student)
        ck.save_checkpoint(
            root,
            iteration,
            trainer.student,
            trainer.optimizer,
            dict(trainer.state.__dict__, step=iteration),
            async_save=True,
            keep_last=2,
        )
        published.append(
            (ck.pending_saves(), (root / "latest.txt").read_text().strip() if (root / "latest.txt").exists() else None)
        )
        with torch.no_grad():
            for p in trainer.student.parameters():
                p.add_(1.0)  # "training" goes on while the writer runs
    ck.finalize_pending_save(blocking=True)
    out["async_published"] = published
    out["async_pending_after"] = ck.pending_saves()
    out["async_dirs"] = sorted(p.name for p in root.iterdir())
    ck.load_checkpoint(root, 3, trainer.student, trainer.optimizer)
    after = _params(trainer.student)
    out["async_equal"] = all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    return out


@pytest.fixture(scope="module")
def dp2(sp_pair, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("dp2")
    started = time.perf_counter()
    results = run_distributed(_dp2_worker, world_size=2, tp=1, args=(sp_pair, str(run_dir)))
    return {"ranks": results, "dir": run_dir, "seconds": time.perf_counter() - started}


def test_each_dp_rank_writes_its_part(dp2):
    serial = distcp_bytes_per_rank(dp2["dir"] / "bytes_serial" / "iter_0000004")
    parallel = distcp_bytes_per_rank(dp2["dir"] / "bytes_parallel" / "iter_0000004")
    print("bytes written per rank: without the wrapper", serial, "with it", parallel)
    total = sum(serial.values())
    # before: DP rank 0 writes (nearly) everything (rank 1 only its own RNG state)
    assert serial.get(1, 0) < 0.02 * total
    # after: both ranks write a large part, the sum is the same checkpoint
    assert sum(parallel.values()) == pytest.approx(total, rel=0.02)
    assert min(parallel.get(0, 0), parallel.get(1, 0)) > 0.3 * total
    # and the directory published by the trainer at the end of the run is written the same way
    final = distcp_bytes_per_rank(dp2["dir"] / "straight" / "ckpt" / "iter_0000004")
    assert min(final.values()) > 0.3 * sum(final.values())


def test_each_dp_rank_reads_its_part_on_resume(dp2):
    r0, r1 = dp2["ranks"]
    print(
        "bytes read per rank on resume: without the wrapper",
        r0["read_serial"],
        r1["read_serial"],
        "with it",
        r0["read_parallel"],
        r1["read_parallel"],
    )
    total = r0["read_serial"]
    assert r1["read_serial"] == pytest.approx(total, rel=0.02)  # before: each rank reads it all
    assert r0["read_parallel"] + r1["read_parallel"] == pytest.approx(total, rel=0.05)
    assert max(r0["read_parallel"], r1["read_parallel"]) < 0.7 * total
    assert r0["parallel_load_equal"] and r1["parallel_load_equal"]


def test_dp2_resume_is_exact(dp2):
    for res in dp2["ranks"]:
        assert [h["step"] for h in res["resumed"]] == [3, 4]
        for key in KEYS:
            assert [h[key] for h in res["resumed"]] == pytest.approx(
                [h[key] for h in res["straight"][2:]], rel=1e-6, abs=1e-9
            ), key


def test_async_save_publishes_on_finalize_and_keeps_last_two(dp2):
    for res in dp2["ranks"]:
        # each save first publishes the previous one (one save in flight at a time)
        assert res["async_published"] == [(1, None), (1, "1"), (1, "2")]
        assert res["async_pending_after"] == 0
        assert res["async_dirs"] == ["iter_0000002", "iter_0000003", "latest.txt"]
        assert res["async_equal"]  # the values at the time of the save, not the later ones


# ---- keep_last (one process) --------------------------------------------------------------------
def test_keep_last_retention(sp_pair, tmp_path):  # noqa: F811
    from xtoken_nemo.distill import run_checkpoints as ck
    from xtoken_nemo.distill.run_checkpoints import (
        CheckpointError,
        remove_old_checkpoints,
        save_checkpoint,
    )
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(sp_config(sp_pair, tmp_path, steps=1, same_tok_teacher=False), progress=False)
    root = tmp_path / "keep"

    def save(i, keep):
        return save_checkpoint(
            root, i, trainer.student, trainer.optimizer, dict(trainer.state.__dict__, step=i), keep_last=keep
        )

    def listing():
        return sorted(p.name for p in root.iterdir())

    for i in (1, 2, 3):
        save(i, None)  # None keeps all
    assert listing() == ["iter_0000001", "iter_0000002", "iter_0000003", "latest.txt"]
    (root / "iter_0000009.partial").mkdir()  # an interrupted save: removed by the next save as before
    save(4, 2)
    assert listing() == ["iter_0000003", "iter_0000004", "latest.txt"]
    # a run that fell back past a corrupt iter_6 saves iter_5: iter_6 (newer than latest) is neither
    # counted nor deleted, and the latest one is always kept
    (root / "iter_0000006").mkdir()
    save(5, 1)
    assert listing() == ["iter_0000005", "iter_0000006", "latest.txt"]
    assert (root / "latest.txt").read_text().strip() == "5"
    assert remove_old_checkpoints(root, 1) == []
    with pytest.raises(CheckpointError, match="keep_last=0"):
        save(7, 0)
    assert ck.pending_saves() == 0
    trainer.preemption.uninstall()


# ---- TP=2 x DP=2 (four processes) -----------------------------------------------------------------
def _tp2dp2_worker(rank, world_size, pair, run_dir):
    import shutil

    from xtoken_nemo.distill.trainer import Trainer

    run_dir = Path(run_dir)

    def cfg():
        c = sp_config(pair, run_dir, mode="pkl", steps=3, tp=2)
        c.train.micro_batch_size = 1
        return c

    # preempted after step 2: a fully parallel save at TP=2 x DP=2
    _run_until(cfg(), stop_after=2)
    if rank == 0:  # a copy of that checkpoint, continued at TP=1 by the test process
        root = run_dir / "ckpt"
        shutil.copytree(root / "iter_0000002", run_dir / "tp1" / "ckpt" / "iter_0000002")
        (run_dir / "tp1" / "ckpt" / "latest.txt").write_text("2\n")
    torch.distributed.barrier()
    # resumed at TP=2 x DP=2 (fully parallel load within each DP group)
    return Trainer(cfg(), progress=False).run()["history"]


@pytest.mark.slow
def test_tp2_dp2_writes_in_parts_and_reshards_to_tp1(sp_pair, tmp_path):  # noqa: F811
    from xtoken_nemo.distill.trainer import Trainer

    def tp1(run_dir, steps=3):
        c = sp_config(sp_pair, run_dir, mode="pkl", steps=steps, tp=1)
        c.train.micro_batch_size = 1
        return c

    straight = Trainer(tp1(tmp_path / "straight"), progress=False).run()["history"]
    ranks = run_distributed(_tp2dp2_worker, world_size=4, tp=2, args=(sp_pair, str(tmp_path / "run")))
    written = distcp_bytes_per_rank(tmp_path / "run" / "ckpt" / "iter_0000002")
    print("TP=2 x DP=2: bytes written per rank", written)
    # ranks 0,1 are TP ranks 0,1 of DP rank 0; ranks 2,3 of DP rank 1: all four write a share
    assert sorted(written) == [0, 1, 2, 3] and min(written.values()) > 0.15 * sum(written.values())
    continued = Trainer(tp1(tmp_path / "run" / "tp1"), progress=False).run()["history"]
    assert [h["step"] for h in continued] == [3]
    for key in KEYS:
        for res in ranks:
            assert [h["step"] for h in res] == [3]
            assert res[0][key] == pytest.approx(straight[2][key], rel=1e-4), key  # TP=2 x DP=2 resume
        assert continued[0][key] == pytest.approx(straight[2][key], rel=1e-4), key  # TP=2 x DP=2 -> TP=1
