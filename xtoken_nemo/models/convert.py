"""Streamed HF <-> megatron-core checkpoint conversion.

``hf_to_mcore``: config.json -> ModelArch -> GPTModel (TP=1, local spec, no random init, in the
checkpoint's dtype); then, parameter by parameter, the HF tensors it is made of are read with
``safetensors.safe_open`` (memory-mapped; one tensor copied out at a time), shape-checked against
the config, transformed (mapping.py) and copied into the parameter; the model's sharded state dict
is written with ``dist_checkpointing.save`` beside ``xtoken_model.json``.

``mcore_to_hf``: rebuild the TP=1 model from ``xtoken_model.json``, load the dist checkpoint,
then walk the parameters, turn each into its HF tensor(s) (views where the layout allows) and
write them into safetensors shards of at most ``max_shard_bytes``; config.json (and tokenizer /
generation files) come from ``--like``.

Memory (measured by ``bench/convert_memory.py`` on a 187M-parameter bf16 Llama, CPU): private
memory (RssAnon) grows by 1.37 x the model's bytes in both directions. That is the parameters once
plus dist_checkpointing's copies of the SwiGLU ``linear_fc1`` halves (megatron saves/loads fc1 as
two chunk views, and the torch_dist writer clones views): fc1 is ~45% of a 4B model's parameters.
Everything else is one tensor at a time (hf_to_mcore: the HF tensors of one parameter, the largest
being the embedding; mcore_to_hf: at most one output shard, ``max_shard_bytes``, of newly made
tensors; views of parameters cost nothing). Reading safetensors through mmap also fills page cache
(counted in RSS, reclaimable, not private). Expected for a 4B model in bf16 (8 GB): ~11.5 GB
private, so it converts on a 24 GiB machine; in fp32 (``--dtype float32``, 16 GB) ~23 GB, too tight:
convert in the HF checkpoint's own dtype (the default) and upcast when loading for training/scoring
(``load_mcore_checkpoint(params_dtype=torch.float32)`` casts on load). Not measured at 4B here.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from xtoken_nemo.models.build import build_gpt_model
from xtoken_nemo.models.checkpoint import (
    arch_from_metadata,
    dtype_from_name,
    dtype_name,
    load_mcore_checkpoint,
    read_metadata,
    save_model,
    write_metadata,
)
from xtoken_nemo.models.config import DEFAULT_VOCAB_DIVISOR, ModelArch, arch_from_hf_config, check_tp, load_hf_config
from xtoken_nemo.models.errors import ModelError
from xtoken_nemo.models.families import IGNORED_HF, TABLES
from xtoken_nemo.models.mapping import BoundMapping
from xtoken_nemo.models.runtime import ensure_model_parallel

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
INDEX_FILE = "model.safetensors.index.json"


# ---- reading HF safetensors one tensor at a time ------------------------------------------------


class SafetensorsReader:
    """Name -> tensor access over an HF directory's safetensors files (sharded or not)."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            other = (
                [p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")] if self.dir.is_dir() else []
            )
            raise ModelError(
                f"no *.safetensors in {self.dir}"
                + (
                    f" (found {other}: re-save the model with save_pretrained(safe_serialization=True))"
                    if other
                    else ""
                )
            )
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self.file_of: dict[str, Path] = {}
        for f, handle in self._handles.items():
            for key in handle.keys():
                self.file_of[key] = f

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        dt = self._handles[self.file_of[name]].get_slice(name).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dt, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.file_of[name]].get_tensor(name)


# ---- writing HF safetensors in bounded shards ---------------------------------------------------


class ShardedSafetensorsWriter:
    """Accumulates tensors and writes a shard whenever ``max_shard_bytes`` would be exceeded."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.out = out_dir
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            final = self.out / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (tmp, names) in enumerate(self.shards):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return finals


# ---- the parameter walk -------------------------------------------------------------------------


def _bound_params(model, arch: ModelArch) -> Iterator[tuple[str, torch.nn.Parameter, BoundMapping]]:
    table = TABLES[arch.family]
    for name, param in model.named_parameters():
        yield name, param, table.bind(name, arch)


def _describe_fields(arch: ModelArch, fields: tuple[str, ...]) -> str:
    cfg = arch.hf_config
    derived = {"head_dim": arch.head_dim, "num_key_value_heads": arch.num_query_groups}
    parts = []
    for f in fields:
        if f in cfg and cfg[f] is not None:
            parts.append(f"{f}={cfg[f]}")
        elif f in derived:
            parts.append(f"{f}={derived[f]} (derived)")
    return ", ".join(parts)


def load_hf_weights(model, arch: ModelArch, reader: SafetensorsReader, progress: bool = False) -> None:
    """Fill a TP=1 GPTModel from HF tensors, one parameter at a time; check names and shapes."""
    from tqdm import tqdm

    used: set[str] = set()
    params = list(_bound_params(model, arch))
    for name, param, m in tqdm(params, desc="hf -> mcore", unit="param", disable=not progress):
        expected = m.transform.hf_shapes(tuple(param.shape), arch)
        for hf_name, shape in zip(m.hf, expected):
            if hf_name not in reader:
                hint = ""
                if hf_name == "lm_head.weight":
                    hint = (
                        " (config.json tie_word_embeddings is false: "
                        "set it to true if the output layer shares the embedding)"
                    )
                raise ModelError(f"HF checkpoint {reader.dir} lacks tensor '{hf_name}' needed for {name}{hint}")
            got = reader.shape(hf_name)
            if got != tuple(shape):
                raise ModelError(
                    f"HF tensor '{hf_name}' has shape {list(got)} but config.json ({_describe_fields(arch, m.fields)}) "
                    f"implies {list(shape)}: the weights and config.json disagree; "
                    "use the config.json saved with these weights"
                )
        hf_tensors = [reader.get(n) for n in m.hf]
        value = m.transform.to_megatron(hf_tensors, tuple(param.shape), arch)
        with torch.no_grad():
            param.copy_(value)
        used.update(m.hf)
        del hf_tensors, value
    leftover = [k for k in reader.keys() if k not in used and not any(k.endswith(s) for s in IGNORED_HF)]
    if arch.tie_embeddings and "lm_head.weight" in leftover:
        leftover.remove("lm_head.weight")
        log.info(
            "tie_word_embeddings is true: lm_head.weight in the checkpoint is ignored "
            "(the embedding is used, as in transformers)"
        )
    if leftover:
        raise ModelError(
            f"HF checkpoint has {len(leftover)} tensors the config does not account for, e.g. {leftover[:4]} "
            f"(config.json num_hidden_layers={arch.num_layers}, tie_word_embeddings={arch.tie_embeddings}); "
            "the weights and config.json disagree"
        )


def iter_hf_weights(model, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a TP=1 GPTModel, in parameter order."""
    for _name, param, m in _bound_params(model, arch):
        tensors = m.transform.to_hf(param.detach(), arch)
        yield from zip(m.hf, tensors)


# ---- entry points -------------------------------------------------------------------------------


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"output directory {out_dir} is not empty; give a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert an HF directory into a megatron-core dist checkpoint; return its metadata.

    ``tp`` sets the vocabulary padding (a multiple of ``vocab_divisor * tp``) and is checked
    against the head counts; the checkpoint itself loads at any TP size dividing the padded vocab.
    ``dtype`` defaults to the dtype of the HF tensors (exact round trips).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    reader = SafetensorsReader(hf_dir)
    padded = arch.padded_vocab_size(tp, vocab_divisor)
    check_tp(arch, tp, padded)
    if dtype is None:
        first = "model.embed_tokens.weight" if "model.embed_tokens.weight" in reader else reader.keys()[0]
        params_dtype = reader.dtype(first)
    else:
        params_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    _prepare_out(out_dir)
    ensure_model_parallel(1)
    log.info(
        "building %s model (%d layers, hidden %d, vocab %d padded to %d, %s)",
        arch.family,
        arch.num_layers,
        arch.hidden_size,
        arch.vocab_size,
        padded,
        dtype_name(params_dtype),
    )
    model = build_gpt_model(arch, padded, tp=1, params_dtype=params_dtype, use_te=False, perform_initialization=False)
    model.to(
        params_dtype
    )  # megatron keeps norm weights in fp32 (Float16Module casts them in training): store one dtype
    load_hf_weights(model, arch, reader, progress=progress)
    save_model(model, out_dir)
    meta = write_metadata(out_dir, arch, padded, vocab_divisor, tp, params_dtype, source=str(hf_dir))
    del model
    log.info("wrote megatron-core checkpoint %s%s", out_dir, _rss())
    return meta


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    like: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
) -> list[Path]:
    """Write an HF directory (safetensors + config.json) from a converted megatron-core checkpoint.

    ``like``: the original HF directory; its config.json (checked against the checkpoint's
    architecture) and non-weight files (tokenizer, generation config) are copied. Without it the
    config.json recorded at conversion is written.
    """
    from tqdm import tqdm

    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    meta = read_metadata(mcore_dir)
    arch = arch_from_metadata(meta)
    config = meta["hf_config"]
    if like is not None:
        like = Path(like)
        config = load_hf_config(like)
        like_arch = arch_from_hf_config(config)
        diffs = [
            f
            for f in arch.__dataclass_fields__
            if f not in ("hf_config", "torch_dtype") and getattr(arch, f) != getattr(like_arch, f)
        ]
        if diffs:
            raise ModelError(
                f"--like {like} describes a different model than checkpoint {mcore_dir}: fields {diffs} differ; "
                "give the HF directory the checkpoint was converted from"
            )
    _prepare_out(out_dir)
    ensure_model_parallel(1)
    if dtype is None:  # the checkpoint's dtype (norm weights of a bf16 megatron model are fp32: cast them too)
        dtype = meta["params_dtype"]
    out_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    model, arch, meta = load_mcore_checkpoint(mcore_dir, params_dtype=None, use_te=False, tp=1)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    n_params = sum(1 for _ in model.parameters())
    pairs = tqdm(iter_hf_weights(model, arch), desc="mcore -> hf", unit="tensor", disable=not progress, total=None)
    for name, tensor in pairs:
        writer.add(name, tensor.to(out_dtype))
    files = writer.close()
    del model
    if like is not None:
        for p in like.iterdir():
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_FILE:
                shutil.copy2(p, out_dir / p.name)
    else:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    log.info("wrote %d safetensors file(s) (%d parameters) to %s%s", len(files), n_params, out_dir, _rss())
    return files


def _rss() -> str:
    try:
        import psutil

        return f" (process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB)"
    except Exception:  # psutil missing: the number is only informative
        return ""
