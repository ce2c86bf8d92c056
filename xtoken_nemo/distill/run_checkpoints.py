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

A checkpoint saved with the local layer spec (CPU) resumes with the TE spec (GPU) and the reverse:
the ``_extra_state`` entries (TE's fp8 metadata) one spec has and the other lacks are tolerated
(:func:`xtoken_nemo.models.checkpoint.dist_load`).

Fully parallel save and load over data parallelism (``checkpoint.fully_parallel``, default on)
----------------------------------------------------------------------------------------------
The optimizer is saved in megatron's ``fully_reshardable`` format (model-space tensors, loadable
at any TP layout). Its tensors carry the replica ids of the model parameters: every data-parallel
rank holds the same full tensors (the non-distributed optimizer replicates them; the distributed
optimizer all-gathers them for this format) and without help only DP rank 0 writes them and
every rank reads all of them back. With DP > 1 the save goes through megatron's
``FullyParallelSaveStrategyWrapper`` over the data-parallel group (each DP rank writes a disjoint
~1/DP of the replicated tensors, chosen by size from metadata only: no data moves) and the load
through ``FullyParallelLoadStrategyWrapper`` (each rank reads ~1/DP and the ranks exchange the
rest), as Megatron-LM does with ``--ckpt-fully-parallel-save/-load``. The files are the same
torch_dist format either way: a checkpoint written one way loads the other way and at any layout.

Async save (``checkpoint.async_save``, default off)
---------------------------------------------------
``save_checkpoint(..., async_save=True)`` hands the writing to a forked process
(``dist_checkpointing.save(..., async_sharded_save=True)`` returns megatron's ``AsyncRequest``,
scheduled on an ``AsyncCallsQueue``) and returns (``write_extra`` has run, into ``.partial``); the
publication (the rename of ``.partial``, ``latest.txt``, retention) runs as the request's
finalization, on all ranks, when :func:`finalize_pending_save` finds every rank's writer done. A
save that has not been finalized is a ``.partial`` directory like any interrupted save. One save is
in flight at a time: the next :func:`save_checkpoint` first waits for the previous one. The training
loop must call ``finalize_pending_save(blocking=True)`` before it exits, and should save
synchronously when it was told to stop (the job is about to be killed).

Retention (``checkpoint.keep_last``)
------------------------------------
After a save is published, rank 0 deletes the complete ``iter_N`` directories beyond the newest
``keep_last`` (counting only iterations up to the one ``latest.txt`` names, which is never
deleted; a directory newer than it, left by a run that fell back past a corrupt checkpoint, is not
touched). ``.partial`` directories follow the rules above.

:func:`resume_latest` is what a run calls to resume: a latest checkpoint that cannot be read (a
``.distcp`` cut short, a missing file, ``latest.txt`` naming a missing directory) is either a
one-line :class:`CheckpointError` or, with ``fallback``, a loud fall-back to the newest earlier
complete checkpoint. All ranks take the same decision.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
from xtoken_nemo.errors import XTokenError
from xtoken_nemo.models import checkpoint as mcore_checkpoint  # its dist_load through the module: a test wraps it
from xtoken_nemo.models.checkpoint import load_model_state, parallel_io_group
from xtoken_nemo.models.runtime import true_on_any_rank

log = logging.getLogger(__name__)


class CheckpointError(XTokenError):
    """A training checkpoint cannot be loaded (corrupt, incomplete, or written for another model)."""


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
        raise CheckpointError(
            f"{root} holds no complete checkpoint ({LATEST} missing): train first, or give an iter_N directory"
        )
    return iteration_dir(root, iteration)


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration of the newest complete checkpoint under root, or None."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} is corrupt ({text!r}); delete it to start over or fix the iteration number")
    iteration = int(text)
    if not iteration_dir(Path(root), iteration).is_dir():
        raise CheckpointError(
            f"{path} names iteration {iteration} but {iteration_dir(Path(root), iteration)} is missing: "
            f"restore that directory, or write the number of a complete iter_N directory into {path}"
        )
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


def save_strategy(parallel: bool | None = True):
    """megatron's default save strategy (torch_dist), wrapped in ``FullyParallelSaveStrategyWrapper``
    over the data-parallel group when ``parallel`` and DP > 1 (each DP rank then writes its own
    part of the replicated tensors)."""
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy()
    group = parallel_io_group(parallel)
    return strategy if group is None else FullyParallelSaveStrategyWrapper(strategy, group)


_async_queue = None  # megatron AsyncCallsQueue, created by the first async save


def pending_saves() -> int:
    """How many async saves have been scheduled and not yet finalized (published)."""
    return 0 if _async_queue is None else _async_queue.get_num_unfinalized_calls()


def finalize_pending_save(blocking: bool = True) -> int:
    """Finalize (publish) the async saves whose writers are done on every rank; with ``blocking``,
    wait for all of them. Returns how many were published. Collective: all ranks call it (it does
    nothing, and no collective, when no async save is pending). A failed write raises here, on all
    ranks, and leaves its ``.partial`` directory unpublished."""
    if not pending_saves():
        return 0

    with cuda_to_cpu():  # megatron's completion all-reduces use torch.cuda.current_device()
        return len(_async_queue.maybe_finalize_async_calls(blocking=blocking))


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model,
    optimizer,
    run_state: dict,
    write_extra=None,
    *,
    parallel: bool = True,
    async_save: bool = False,
    keep_last: int | None = None,
) -> Path:
    """Save atomically; returns the final directory. All ranks must call it.

    ``write_extra(dir)`` runs on rank 0 before the directory is published (e.g. the model's
    architecture record, which makes ``iter_N/`` loadable by ``xtoken score``/``export``).
    ``parallel``: each data-parallel rank writes its own part (``FullyParallelSaveStrategyWrapper``,
    a no-op at DP = 1). ``async_save``: return once the state is handed to a writer process; the
    directory is published by :func:`finalize_pending_save` (see the module docstring).
    ``keep_last``: keep only the newest N complete checkpoints (None keeps all).
    """
    global _async_queue
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"checkpoint.keep_last={keep_last}: keep at least 1 checkpoint, or null to keep all")
    finalize_pending_save(blocking=True)  # one save in flight at a time
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

    def publish() -> None:
        _barrier()
        if _rank() == 0:
            os.replace(partial, final)
            tmp = root / (LATEST + ".tmp")
            tmp.write_text(f"{iteration}\n")
            os.replace(tmp, root / LATEST)
            if keep_last is not None:
                remove_old_checkpoints(root, keep_last)
        _barrier()
        log.info("saved checkpoint %s", final)

    with cuda_to_cpu():
        state = _sharded_state(model, optimizer, run_state, is_loading=False)
        request = dist_checkpointing.save(
            state, str(partial), sharded_strategy=save_strategy(parallel), async_sharded_save=async_save
        )
        if _rank() == 0 and write_extra is not None:  # now, with the state of this save (also when async)
            write_extra(partial)
        if request is None:
            publish()
            return final
        request.add_finalize_fn(publish)
        if _async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import (
                AsyncCallsQueue,
            )

            _async_queue = AsyncCallsQueue()
        _async_queue.schedule_async_request(request)
    log.info("scheduled async save of %s", final)
    return final


def remove_old_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete the complete ``iter_N`` directories older than the newest ``keep_last`` ones (rank 0
    only, after ``latest.txt`` names the new save). Iterations above the one ``latest.txt`` names
    are neither counted nor deleted, and that one is always kept. Returns the deleted directories."""
    root = Path(root)
    latest = latest_iteration(root)
    if latest is None or keep_last < 1:
        return []
    timeline = [i for i in complete_iterations(root) if i <= latest]  # newest first; latest is [0]
    removed = []
    for iteration in timeline[keep_last:]:
        path = iteration_dir(root, iteration)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("checkpoint.keep_last=%d: removed %s", keep_last, ", ".join(p.name for p in removed))
    return removed


def _allocate_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state yet, and megatron's sharded_state_dict needs it (the
    loaded values overwrite these placeholders in place)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is not None and not inner.state and hasattr(sub, "_init_optimizer_states_with_dummy_values"):
            sub._init_optimizer_states_with_dummy_values()


def load_checkpoint(root: str | os.PathLike, iteration: int, model, optimizer, parallel: bool = True) -> dict:
    """Load model and optimizer state in place (any TP layout, local or TE layer spec either way);
    returns the run state. ``parallel``: each data-parallel rank reads ~1/DP of the checkpoint and
    the ranks exchange the rest (``FullyParallelLoadStrategyWrapper``; a no-op at DP = 1)."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(Path(root), iteration)
    run_state = dict(dist_checkpointing.load_common_state_dict(str(path))["run_state"])
    saved_layout = run_state.pop("layout", None)
    same_layout = saved_layout == _layout()
    with cuda_to_cpu():
        _allocate_optimizer_state(optimizer)
        template = _sharded_state(model, optimizer, {}, is_loading=True, with_rng=same_layout)
        template.pop("run_state")  # common (non-sharded) state, read above
        loaded = mcore_checkpoint.dist_load(template, path, error_cls=CheckpointError, parallel=parallel)
        load_model_state(model, loaded["model"], path, error_cls=CheckpointError)
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    else:
        log.warning(
            "checkpoint %s was saved with [tp, dp] = %s, loading at %s: weights and optimizer resharded, RNG reseeded",
            path,
            saved_layout,
            _layout(),
        )
    log.info("loaded checkpoint %s", path)
    return run_state


# ----------------------------------------------------------------------------------------------
# resuming past a corrupt latest checkpoint
# ----------------------------------------------------------------------------------------------
_ITER_DIR = re.compile(r"^iter_(\d+)$")


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations of the published ``iter_N`` directories under root, newest first (``.partial``
    directories are saves that never finished and are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _cause(exc: BaseException) -> str:
    """``ExceptionType: first line of its message``; for torch DCP's CheckpointException (which
    gathers the failures of all ranks) the first failing rank's exception is named."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]  # (exception, traceback summary)
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            return f"{type(exc).__name__} on rank(s) {sorted(failures)}: {_cause(inner)}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _agree(path: Path, cause: str | None) -> str | None:
    """Make one attempt's outcome global; None when it succeeded on every rank."""
    if not true_on_any_rank(cause is not None):
        return None
    if cause is not None:
        log.error(
            "checkpoint %s cannot be loaded%s: %s",
            path,
            f" (rank {_rank()})"
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
            else "",
            cause,
        )
        return cause
    cause = "loading failed on another rank (see that rank's log)"
    if _rank() == 0:
        log.error("checkpoint %s cannot be loaded: %s", path, cause)
    return cause


def _try_load(root: Path, iteration: int, model, optimizer, parallel: bool = True) -> tuple[dict | None, str | None]:
    """(run_state, None) when every rank loaded ``iter_N``; (None, cause) on every rank otherwise.

    Any exception while reading counts (EOFError from a cut-short ``.distcp``, megatron's
    CheckpointingException, torch DCP's CheckpointException, RuntimeError, unpickling errors, a
    missing file or directory). Two phases, each ended by an all-reduce of the failure flag so
    that no rank enters a collective the others skip: (1) the rank-local reads megatron does before
    its first collective (the directory, ``common.pt``, the DCP ``.metadata``), (2) the load
    itself, whose collectives all ranks enter (torch DCP gathers read errors from every rank before
    raising them, so a bad shard fails the load on all ranks alike). A failed load may have
    overwritten part of the model or optimizer in place: the next attempt (or a fresh start)
    overwrites all of it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from torch.distributed.checkpoint.api import CheckpointException

    unreadable = (Exception, CheckpointException)  # torch DCP's CheckpointException is a BaseException
    path = iteration_dir(root, iteration)
    cause = None
    try:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        dist_checkpointing.load_common_state_dict(str(path))["run_state"]
        load_sharded_metadata(str(path))
    except unreadable as exc:  # any unreadable checkpoint is handled by the caller
        cause = _cause(exc)
    cause = _agree(path, cause)
    if cause is not None:
        return None, cause
    run_state = None
    try:
        run_state = load_checkpoint(root, iteration, model, optimizer, parallel=parallel)
    except unreadable as exc:
        cause = _cause(exc)
    cause = _agree(path, cause)
    return (None, cause) if cause is not None else (run_state, None)


def resume_latest(
    root: str | os.PathLike, model, optimizer, fallback: bool, parallel: bool = True
) -> tuple[int, dict] | None:
    """Load the newest complete checkpoint under ``root`` into model and optimizer (collective).

    Returns ``(iteration, run_state)`` as :func:`load_checkpoint`, or None when there is no
    checkpoint (no ``latest.txt``). If the iteration in ``latest.txt`` cannot be loaded, one ERROR
    line names the directory and the cause; then with ``fallback`` the earlier ``iter_N``
    directories are tried newest first (a WARNING says which and how many steps are recomputed),
    and if none loads, or without ``fallback``, a one-line :class:`CheckpointError` says what to do.
    Every rank takes the same decisions (each attempt's failure is all-reduced). ``parallel``: see
    :func:`load_checkpoint`.
    """
    root = Path(root)
    latest_file = root / LATEST
    if not latest_file.is_file():
        return None
    text = latest_file.read_text().strip()
    if text.isdigit():
        latest = int(text)
        run_state, cause = _try_load(root, latest, model, optimizer, parallel)
        if run_state is not None:
            return latest, run_state
        bad = iteration_dir(root, latest)
    else:
        latest, bad, cause = None, latest_file, f"{LATEST} is corrupt ({text[:40]!r})"
        log.error("checkpoint %s cannot be read: %s", latest_file, cause)
    what = f"delete or move {bad}" if latest is not None else f"fix or delete {latest_file}"
    if not fallback:
        raise CheckpointError(
            f"latest checkpoint {bad} cannot be loaded ({cause}): {what} to resume from the previous "
            "one, or set checkpoint.fallback_on_corrupt=true to do that automatically"
        )
    earlier = [i for i in complete_iterations(root) if latest is None or i < latest]
    for iteration in earlier:
        run_state, _ = _try_load(root, iteration, model, optimizer, parallel)
        if run_state is not None:
            if _rank() == 0:
                steps = f"{latest - iteration} steps" if latest is not None else "the steps after it"
                log.warning(
                    "resuming from %s instead of corrupt %s: %s will be recomputed; %s",
                    iteration_dir(root, iteration).name,
                    bad.name,
                    steps,
                    what,
                )
            return iteration, run_state
    tried = ", ".join(iteration_dir(root, i).name for i in earlier) or "none"
    raise CheckpointError(
        f"latest checkpoint {bad} cannot be loaded ({cause}) and no earlier checkpoint loads either "
        f"(tried: {tried}): delete {root} to start over, or restore a good checkpoint into it"
    )
