"""Atomic, resumable megatron-core dist checkpoints of a distillation run.

Layout of ``checkpoint.dir``::

    iter_0000020/            one dist_checkpointing directory per save (model, optimizer, state)
    iter_0000040/
    latest.txt               the iteration of the newest *complete* checkpoint

A save writes ``iter_N.partial/`` and renames it to ``iter_N/`` only when every rank has
finished, then rewrites ``latest.txt`` through a temporary file and ``os.replace``. A crash
while saving leaves a ``.partial`` directory that is ignored (and removed by the next save):
the previous checkpoint stays the one that is loaded.

Only the student is saved: teachers are frozen and come from their own checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LATEST = "latest.txt"
SHARDING_TYPE = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def latest_checkpoint(root: str | os.PathLike) -> Path:
    """The newest complete iter_N directory under a run's checkpoint dir (or the dir itself if it
    is one); a clear error otherwise."""
    root = Path(root)
    if root.name.startswith("iter_") and root.is_dir():
        return root
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"{root} holds no complete checkpoint ({LATEST} missing): train first, or give an iter_N directory")
    return iteration_dir(root, iteration)


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration of the newest complete checkpoint under root, or None."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise RuntimeError(f"{path} is corrupt ({text!r}); delete it to start over or fix the iteration number")
    iteration = int(text)
    if not iteration_dir(Path(root), iteration).is_dir():
        raise RuntimeError(f"{path} names iteration {iteration} but {iteration_dir(Path(root), iteration)} is missing")
    return iteration


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> list[int]:
    from megatron.core import parallel_state

    return [parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()]


def _sharded_state(model, optimizer, common: dict, is_loading: bool, with_rng: bool = True) -> dict:
    """model + optimizer sharded state dicts, the run state (replicated) and per-rank RNG.

    RNG states are per (TP rank, DP rank): they are restored only when the layout is unchanged
    (a resharded run starts its RNG from the seed; the data order does not depend on it).
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDING_TYPE)
    state["run_state"] = dict(common, layout=_layout())
    if with_rng:
        tp_size, dp_size = _layout()
        tp, dp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (tp_size, dp_size), (tp, dp), replica_id=0)
    return state


def save_checkpoint(root: str | os.PathLike, iteration: int, model, optimizer, run_state: dict, write_extra=None) -> Path:
    """Save atomically; returns the final directory. All ranks must call it.

    ``write_extra(dir)`` runs on rank 0 before the directory is published (e.g. the model's
    architecture record, which makes ``iter_N/`` loadable by ``xtoken score``/``export``).
    """
    from megatron.core import dist_checkpointing

    from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu

    root = Path(root)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # saving the same iteration again (e.g. preempted right after a save)
            shutil.rmtree(final)
        partial.mkdir()
    _barrier()
    with cuda_to_cpu():
        state = _sharded_state(model, optimizer, run_state, is_loading=False)
        dist_checkpointing.save(state, str(partial))
    if _rank() == 0 and write_extra is not None:
        write_extra(partial)
    _barrier()
    if _rank() == 0:
        os.replace(partial, final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(f"{iteration}\n")
        os.replace(tmp, root / LATEST)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _allocate_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state yet, and megatron's sharded_state_dict needs it (the
    loaded values overwrite these placeholders in place)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is not None and not inner.state and hasattr(sub, "_init_optimizer_states_with_dummy_values"):
            sub._init_optimizer_states_with_dummy_values()


def load_checkpoint(root: str | os.PathLike, iteration: int, model, optimizer) -> dict:
    """Load model and optimizer state in place (any TP layout); returns the run state."""
    from megatron.core import dist_checkpointing

    from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu

    path = iteration_dir(Path(root), iteration)
    run_state = dict(dist_checkpointing.load_common_state_dict(str(path))["run_state"])
    saved_layout = run_state.pop("layout", None)
    same_layout = saved_layout == _layout()
    with cuda_to_cpu():
        _allocate_optimizer_state(optimizer)
        template = _sharded_state(model, optimizer, {}, is_loading=True, with_rng=same_layout)
        template.pop("run_state")  # common (non-sharded) state, read above
        loaded = dist_checkpointing.load(template, str(path))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    else:
        log.warning("checkpoint %s was saved with [tp, dp] = %s, loading at %s: weights and optimizer resharded, RNG reseeded", path, saved_layout, _layout())
    log.info("loaded checkpoint %s", path)
    return run_state
