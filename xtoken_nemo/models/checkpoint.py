"""Converted megatron-core checkpoints: a dist_checkpointing directory plus ``xtoken_model.json``.

Layout of a checkpoint directory::

    DIR/xtoken_model.json     architecture record written by us (see write_metadata)
    DIR/metadata.json, *.distcp, common.pt ...   megatron-core dist_checkpointing (torch_dist)

The dist checkpoint holds full-tensor shard descriptions, so it loads at any TP size that divides
the heads, query groups, FFN size and padded vocabulary (megatron reshards on load).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
from xtoken_nemo.models.config import ModelArch, arch_from_hf_config, check_tp
from xtoken_nemo.models.errors import ModelError

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
    out_dir: Path, arch: ModelArch, padded_vocab_size: int, vocab_divisor: int, padded_for_tp: int,
    params_dtype: torch.dtype, source: str | None = None,
) -> dict[str, Any]:
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


def load_into_model(model, ckpt_dir: str | Path) -> None:
    """Load a dist checkpoint into ``model`` (any TP layout; collective over all ranks)."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    # Checkpoint tensors are loaded into (and keep) the dtype of the model's parameters.
    with cuda_to_cpu():
        state = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ModelError(f"checkpoint {ckpt_dir} lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_mcore_checkpoint(
    ckpt_dir: str | Path,
    params_dtype: torch.dtype | None = torch.float32,
    use_te: bool | None = None,
    parallel_output: bool = True,
    tp: int | None = None,
):
    """Rebuild the GPTModel of a converted checkpoint on the current TP layout and load it.

    ``params_dtype`` None keeps the checkpoint's dtype. parallel_state must be initialized
    (:func:`xtoken_nemo.models.runtime.ensure_model_parallel` in a single process).
    Returns ``(model, arch, metadata)``.
    """
    from megatron.core import parallel_state

    from xtoken_nemo.models.build import build_gpt_model

    meta = read_metadata(ckpt_dir)
    arch = arch_from_metadata(meta)
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
    check_tp(arch, tp, meta["padded_vocab_size"])
    dtype = dtype_from_name(meta["params_dtype"]) if params_dtype is None else params_dtype
    model = build_gpt_model(
        arch, meta["padded_vocab_size"], tp=tp, params_dtype=dtype, use_te=use_te,
        parallel_output=parallel_output, perform_initialization=False,
    )
    load_into_model(model, ckpt_dir)
    log.info("loaded %s checkpoint %s (tp=%d, dtype=%s)", arch.family, ckpt_dir, tp, dtype_name(dtype))
    return model, arch, meta
