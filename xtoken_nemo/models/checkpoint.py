"""Converted megatron-core checkpoints: a dist_checkpointing directory plus ``xtoken_model.json``.

Layout of a checkpoint directory::

    DIR/xtoken_model.json     architecture record written by us (see write_metadata)
    DIR/metadata.json, *.distcp, common.pt ...   megatron-core dist_checkpointing (torch_dist)

The dist checkpoint holds full-tensor shard descriptions, so it loads at any TP size that divides
the heads, query groups, FFN size and padded vocabulary (megatron reshards on load).

Local layer spec <-> Transformer-Engine layer spec (:func:`dist_load`)
----------------------------------------------------------------------
``xtoken convert`` and every CPU run build with the local spec; a GPU with TE builds with the TE
spec. The parameter names agree (megatron maps the local layer norms onto TE's fused
``linear_qkv.layer_norm_weight``/``linear_fc1.layer_norm_weight``), but TE modules keep fp8
metadata as torch "extra state": ``make_sharded_tensors_for_checkpoint`` (megatron-core
``transformer/utils.py``) turns every ``*._extra_state`` entry of a module's state dict into a
``ShardedObject`` keyed ``<sharded prefix>._extra_state`` (``decoder.layers.<module>._extra_state``
for the stacked layers), global shape ``[num_layers]``, offset the layer index, replica id
``(0, tp_rank, dp_rank)`` (saved once, by TP rank 0 / DP rank 0). The local linears produce the same
keys with a ``None`` payload, but modules that only TE gives extra state (core attention in
megatron-core before 0.16 and with ``softmax_type="learnable"``, TE norms) and checkpoints written
by tools that drop extra state leave the TE model asking for ``_extra_state`` keys the checkpoint
does not have. ``dist_checkpointing.load`` defaults to ``StrictHandling.ASSUME_OK_UNEXPECTED`` (no
mismatch check; in megatron's words a key requested but absent from the checkpoint is
"unexpected", one in the checkpoint but not requested is "missing"), so torch's DCP planner fails
the whole load with ``CheckpointException ... RuntimeError: Missing key in checkpoint state_dict:
decoder.layers.self_attention.core_attention._extra_state/shard_0_2``. Megatron-LM exposes the
choice as ``--dist-ckpt-strictness`` (passed as ``strict=`` to ``dist_checkpointing.load``, then
``model.load_state_dict(..., strict=False)``). We load with ``StrictHandling.RETURN_ALL``: megatron
drops the requested keys the checkpoint lacks from the request and returns them; a dropped key
that is not ``_extra_state`` on any rank is an error (all ranks raise together). Keys only the
checkpoint has (a TE checkpoint's extra state in a local model, the optimizer state of a training
checkpoint read as a model) are ignored, as before. ``model.load_state_dict`` then runs non-strict
and accepts missing or unused ``_extra_state`` only (a TE module without its extra state keeps its
fresh fp8 metadata, as TE does for a ``None`` one).

Fully parallel loading over data parallelism (:func:`parallel_io_group`)
-------------------------------------------------------------------------
Every data-parallel rank asks for the same full tensors (all of a TP=1 model). Without help each
rank reads all of them from the shared filesystem: DP copies of the same bytes. With DP > 1
:func:`dist_load` wraps megatron's default load strategy in ``FullyParallelLoadStrategyWrapper``
over the data-parallel group (what Megatron-LM's ``--ckpt-fully-parallel-load`` does): each rank
reads about 1/DP of the shards and the ranks exchange the rest over the network (broadcast, NCCL
on GPU, gloo on CPU). The result is the same state dict; the ``_extra_state`` tolerance above is
unchanged (megatron drops the absent keys from the request before the strategy runs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
from xtoken_nemo.models import build  # build.build_gpt_model through the module: a test wraps it
from xtoken_nemo.models.config import ModelArch, arch_from_hf_config, check_tp
from xtoken_nemo.models.errors import ModelError
from xtoken_nemo.models.runtime import true_on_any_rank

log = logging.getLogger(__name__)

METADATA_FILE = "xtoken_model.json"
FORMAT = "xtoken-mcore-checkpoint/1"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    name = name.replace("torch.", "")
    if name not in _DTYPES:
        raise ModelError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_metadata(
    out_dir: Path,
    arch: ModelArch,
    padded_vocab_size: int,
    vocab_divisor: int,
    padded_for_tp: int,
    params_dtype: torch.dtype,
    source: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """The architecture record of a checkpoint; written to ``out_dir`` unless ``write`` is False
    (:func:`save_mcore_checkpoint` writes it after the weights: megatron warns about saving into a
    directory that already holds files)."""
    import megatron.core

    meta = {
        "format": FORMAT,
        "family": arch.family,
        "architecture": arch.architecture,
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "vocab_divisor": vocab_divisor,
        "padded_for_tp": padded_for_tp,
        "params_dtype": dtype_name(params_dtype),
        "tie_embeddings": arch.tie_embeddings,
        "megatron_core_version": getattr(megatron.core, "__version__", "unknown"),
        "source": source,
        "arch": arch.to_json(),
        "hf_config": arch.hf_config,
    }
    if write:
        (Path(out_dir) / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def save_mcore_checkpoint(model, out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Save ``model`` (any TP layout, collective) with the architecture record ``meta``.

    ``meta`` is the metadata of the checkpoint the model was loaded from (or built for); the
    parameters' dtype is recorded from the model.
    """
    save_model(model, out_dir)
    if torch.distributed.get_rank() == 0:
        meta = dict(meta, params_dtype=dtype_name(next(model.parameters()).dtype))
        (Path(out_dir) / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    torch.distributed.barrier()


def read_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.exists():
        raise ModelError(
            f"{ckpt_dir} has no {METADATA_FILE}: it is not a checkpoint written by `xtoken convert hf-to-mcore` "
            "(the file records the architecture needed to rebuild the model)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; re-convert the checkpoint")
    return meta


def arch_from_metadata(meta: dict[str, Any]) -> ModelArch:
    return arch_from_hf_config(meta["hf_config"])


def save_model(model, out_dir: str | Path) -> None:
    """dist_checkpointing.save of the model's sharded state dict (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    with cuda_to_cpu():
        dist_checkpointing.save(model.sharded_state_dict(), str(out))


EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state(key: str) -> bool:
    """A module's torch extra state (TE's fp8 metadata): present or not depending on the layer spec."""
    return key.endswith(EXTRA_STATE_SUFFIX)


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")


def parallel_io_group(parallel: bool | None = None):
    """The process group a load (or save) is spread over: megatron's data-parallel group (with
    context parallelism) when ``parallel`` is true or None (auto) and that group has more than one
    rank; None otherwise (no parallel_state, DP = 1, or ``parallel=False``)."""
    if parallel is False or not torch.distributed.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if torch.distributed.get_world_size(group) > 1 else None


def load_strategy(ckpt_dir: str | Path, parallel: bool | None = None):
    """megatron's default load strategy for ``ckpt_dir`` (torch_dist), wrapped in
    ``FullyParallelLoadStrategyWrapper`` over the data-parallel group when :func:`parallel_io_group`
    gives one; None (megatron's default) otherwise."""
    group = parallel_io_group(parallel)
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt_dir)), group)


def dist_load(
    sharded_state_dict: dict,
    ckpt_dir: str | Path,
    error_cls: type[Exception] = ModelError,
    parallel: bool | None = None,
) -> dict:
    """``dist_checkpointing.load`` that tolerates exactly the ``_extra_state`` keys one layer spec
    has and the other lacks (see the module docstring); collective over all ranks.

    ``parallel`` (None: on when the data-parallel size is > 1) spreads the reads over the
    data-parallel ranks (``FullyParallelLoadStrategyWrapper``, see the module docstring): each rank
    reads ~1/DP of the checkpoint instead of all of it; the result is the same.

    Returns the loaded state dict (without the dropped ``_extra_state`` entries). Raises
    ``error_cls`` (one line, on every rank) when a requested key other than ``_extra_state`` is
    not in the checkpoint.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with cuda_to_cpu():
        state, ckpt_only, absent = dist_checkpointing.load(
            sharded_state_dict,
            str(ckpt_dir),
            sharded_strategy=load_strategy(ckpt_dir, parallel),
            strict=StrictHandling.RETURN_ALL,
        )
    # megatron's names: "unexpected" = requested but not in the checkpoint (per rank),
    # "missing" = in the checkpoint but requested by no rank (the same on all ranks)
    bad = sorted(k for k in absent if not is_extra_state(k))
    if true_on_any_rank(bool(bad)):
        what = _few(bad) if bad else "keys requested on another rank"
        raise error_cls(
            f"checkpoint {ckpt_dir} lacks {what}: it was written for a different model (architecture, "
            "vocabulary or tied embeddings); rebuild the model from the checkpoint's own record or re-convert"
        )
    extra_absent = [k for k in absent if is_extra_state(k)]
    if extra_absent:
        log.info(
            "checkpoint %s has no %d _extra_state entries the model asks for (saved with another layer spec): "
            "those modules keep their fresh state",
            ckpt_dir,
            len(extra_absent),
        )
    extra_unused = [k for k in ckpt_only if is_extra_state(k)]
    if extra_unused:
        log.info(
            "checkpoint %s holds %d _extra_state entries this model does not use (saved with another layer spec)",
            ckpt_dir,
            len(extra_unused),
        )
    return state


def load_model_state(model, state: dict, ckpt_dir: str | Path, error_cls: type[Exception] = ModelError) -> None:
    """``model.load_state_dict`` accepting missing or unused ``_extra_state`` entries only."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_extra_state(k)]
    unexpected = [k for k in unexpected if not is_extra_state(k)]
    if missing:
        raise error_cls(f"checkpoint {ckpt_dir} lacks parameters {_few(missing)}: it was written for a different model")
    if unexpected:
        raise error_cls(
            f"checkpoint {ckpt_dir} has parameters the model lacks: {_few(unexpected)}; "
            "it was written for a different model"
        )


def load_into_model(model, ckpt_dir: str | Path, parallel: bool | None = None) -> None:
    """Load a dist checkpoint into ``model`` (any TP layout, local or TE layer spec either way;
    collective over all ranks). ``parallel``: see :func:`dist_load` (None: on when DP > 1)."""
    # Checkpoint tensors are loaded into (and keep) the dtype of the model's parameters.
    sharded = model.sharded_state_dict()
    state = dist_load(sharded, ckpt_dir, parallel=parallel)
    # the result also holds the checkpoint's common (non-sharded) state, e.g. a training
    # checkpoint's run_state and optimizer parameter groups: keep the model's entries
    load_model_state(model, {k: v for k, v in state.items() if k in sharded}, ckpt_dir)


def load_mcore_checkpoint(
    ckpt_dir: str | Path,
    params_dtype: torch.dtype | None = torch.float32,
    use_te: bool | None = None,
    parallel_output: bool = True,
    tp: int | None = None,
    parallel: bool | None = None,
    kernels=None,
):
    """Rebuild the GPTModel of a converted checkpoint on the current TP layout and load it.

    ``params_dtype`` None keeps the checkpoint's dtype. parallel_state must be initialized
    (:func:`xtoken_nemo.models.runtime.ensure_model_parallel` in a single process).
    ``parallel``: spread the reads over the data-parallel ranks (None: when DP > 1; see
    :func:`dist_load`). ``kernels``: :class:`~xtoken_nemo.models.config.KernelOptions` for the
    builder (None: unfused). Returns ``(model, arch, metadata)``.
    """
    from megatron.core import parallel_state

    meta = read_metadata(ckpt_dir)
    arch = arch_from_metadata(meta)
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
    check_tp(arch, tp, meta["padded_vocab_size"])
    dtype = dtype_from_name(meta["params_dtype"]) if params_dtype is None else params_dtype
    model = build.build_gpt_model(
        arch,
        meta["padded_vocab_size"],
        tp=tp,
        params_dtype=dtype,
        use_te=use_te,
        parallel_output=parallel_output,
        perform_initialization=False,
        kernels=kernels,
    )
    load_into_model(model, ckpt_dir, parallel=parallel)
    log.info("loaded %s checkpoint %s (tp=%d, dtype=%s)", arch.family, ckpt_dir, tp, dtype_name(dtype))
    return model, arch, meta
