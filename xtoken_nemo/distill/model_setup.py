"""Student and teacher GPTModels of a run, from converted checkpoints or as fresh random models.

A ``ModelConfig`` with ``checkpoint`` loads a megatron-core checkpoint written by
``xtoken convert hf-to-mcore`` (its architecture is recorded beside it); without one, a random
model of the named family (llama / qwen3 / phi3) and shape is built, with the tokenizer's
vocab size: the tiny CPU runs and the tests.
"""

from __future__ import annotations

import logging

import torch

from xtoken_nemo.distill.config import ConfigError, ModelConfig
from xtoken_nemo.models.build import build_gpt_model
from xtoken_nemo.models.checkpoint import load_mcore_checkpoint, save_mcore_checkpoint, write_metadata
from xtoken_nemo.models.config import DEFAULT_VOCAB_DIVISOR, arch_from_hf_config

log = logging.getLogger(__name__)

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def hf_config_for(mc: ModelConfig, vocab_size: int) -> dict:
    """An HF-style config.json dict for a random model of ModelConfig's family and shape."""
    if mc.family not in _ARCHITECTURES:
        raise ConfigError(f"model.family={mc.family!r}; choose one of {sorted(_ARCHITECTURES)}")
    heads = mc.num_attention_heads
    cfg = {
        "architectures": [_ARCHITECTURES[mc.family]],
        "model_type": mc.family,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size or 4 * mc.hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": mc.num_query_groups or heads,
        "head_dim": mc.head_dim or mc.hidden_size // heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": mc.tie_embeddings,
        "hidden_act": "silu",
    }
    if mc.family == "phi3":
        cfg["partial_rotary_factor"] = 0.75
    return cfg


def build_model(mc: ModelConfig, vocab_size: int, tp: int, params_dtype: torch.dtype, trainable: bool, kernels=None):
    """(GPTModel on this rank's TP shard, ModelArch, padded vocab size).

    From ``mc.checkpoint`` the weights are the same at every TP size. A random model (no
    checkpoint) is seeded by ``mc.init_seed`` but megatron's initialization depends on the TP
    layout: for runs that must agree across layouts, write the random model once with
    :func:`save_random_checkpoint` (``xtoken init-model``) and load it. ``kernels``: the run's
    :class:`~xtoken_nemo.models.config.KernelOptions` (None: unfused).
    """
    if mc.checkpoint:
        model, arch, meta = load_mcore_checkpoint(mc.checkpoint, params_dtype=params_dtype, tp=tp, kernels=kernels)
        padded = int(meta["padded_vocab_size"])
        if arch.vocab_size < vocab_size:
            raise ConfigError(
                f"model checkpoint {mc.checkpoint} has vocab_size {arch.vocab_size} but tokenizer "
                f"'{mc.tokenizer}' has {vocab_size} ids: this checkpoint does not go with this tokenizer"
            )
    else:
        arch = arch_from_hf_config(hf_config_for(mc, vocab_size))
        padded = arch.padded_vocab_size(tp)
        model = build_gpt_model(
            arch,
            padded,
            tp=tp,
            params_dtype=params_dtype,
            kernels=kernels,
            init_seed=mc.init_seed,
            init_method_std=mc.init_method_std,
        )
    mark_tensor_parallel_params(model)
    if params_dtype != torch.float32:
        # megatron keeps the norm weights in fp32; its mixed-precision optimizer expects every
        # parameter in the low precision (what Megatron-LM's Float16Module does)
        model.to(params_dtype)
    if trainable:
        model.train()
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model, arch, padded


def mark_tensor_parallel_params(model) -> int:
    """Set megatron's ``tensor_model_parallel``/``partition_dim`` attributes on every TP-sharded
    weight that lacks them; returns how many were fixed.

    megatron-core (0.16.1) sets them only inside its weight-initialization helpers, so a model
    built with ``perform_initialization=False`` (to load a checkpoint) has none: its sharded
    weights then count as TP duplicates, the gradient norm is taken over rank 0's shards alone,
    and clipping is wrong at TP > 1.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    fixed = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            mode = getattr(module, "parallel_mode", None)  # Transformer-Engine linears
            dim = {"column": 0, "row": 1}.get(mode)
            if dim is None:
                continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)
            fixed += 1
    return fixed


def save_random_checkpoint(mc: ModelConfig, vocab_size: int, out_dir: str, pad_for_tp: int = 8) -> str:
    """Write a random model of ``mc``'s family/shape as a checkpoint that loads at any TP size
    dividing ``pad_for_tp`` (call with megatron initialized at TP=1)."""
    arch = arch_from_hf_config(hf_config_for(mc, vocab_size))
    padded = arch.padded_vocab_size(pad_for_tp)
    model = build_gpt_model(
        arch, padded, tp=1, params_dtype=torch.float32, init_seed=mc.init_seed, init_method_std=mc.init_method_std
    )
    from pathlib import Path

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    meta = write_metadata(
        Path(out_dir),
        arch,
        padded,
        DEFAULT_VOCAB_DIVISOR,
        pad_for_tp,
        torch.float32,
        source=f"random init seed {mc.init_seed}, std {mc.init_method_std:g}",
        write=False,
    )
    save_mcore_checkpoint(model, out_dir, meta)
    return out_dir
