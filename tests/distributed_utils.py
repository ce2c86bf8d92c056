"""Run a function on N gloo processes with megatron-core ``parallel_state`` initialized.

Usage (the function must be importable at module level, e.g. defined in a test module)::

    from distributed_utils import run_distributed

    def _worker(rank, world_size, payload):
        ...                       # parallel_state is initialized with tensor_model_parallel_size=tp
        return {"loss": tensor}   # anything torch.save can write

    results = run_distributed(_worker, world_size=2, tp=2, args=(payload,))
    results[0]["loss"], results[1]["loss"]

Each spawn costs ~8 s (importing megatron), so tests should batch all their cases into one call
(e.g. a module-scoped fixture) rather than spawning per test.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, world_size: int, tp: int, port: int, outdir: str, fn: Callable, args: tuple, threads: int
) -> None:
    out = Path(outdir) / f"rank{rank}.pt"
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # the package may be used from the checkout without being installed
        sys.path.insert(0, repo)
    try:
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        from xtoken_nemo.compat.cpu import install_cpu_shims

        install_cpu_shims()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            result = fn(rank, world_size, *args)
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise


class _PortTaken(RuntimeError):
    """The rendezvous port was taken by another process between choosing and binding it."""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    tp: int = 2,
    args: tuple = (),
    threads_per_process: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return results by rank.

    The port is chosen free but bound seconds later (after the spawn and the imports): if another
    process took it meanwhile, the run is repeated on a new port (up to 3 tries)."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, tp, args, threads_per_process)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], world_size: int, tp: int, args: tuple, threads_per_process: int) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="xtoken-dist-") as outdir:
        port = _free_port()
        ctx = mp.start_processes(
            _entry,
            args=(world_size, tp, port, outdir, fn, args, threads_per_process),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        error = None
        try:
            while not ctx.join():
                pass
        except Exception as exc:  # a child failed: prefer its own traceback below
            error = exc
        results = []
        for rank in range(world_size):
            path = Path(outdir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} produced no result ({error})")
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                if "EADDRINUSE" in rec["error"] and "init_process_group" in rec["error"]:
                    raise _PortTaken(f"rank {rank}: port {port} taken before the rendezvous bound it")
                raise RuntimeError(f"rank {rank} failed:\n{rec['error']}")
            results.append(rec["result"])
        if error is not None:
            raise RuntimeError(f"distributed run failed: {error}")
        return results
