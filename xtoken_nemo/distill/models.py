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
        "head_dim": mc.hidden_size // heads,
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


def build_model(mc: ModelConfig, vocab_size: int, tp: int, params_dtype: torch.dtype, trainable: bool):
    """(GPTModel on this rank's TP shard, ModelArch). Teachers come back frozen in eval mode."""
    from xtoken_nemo.models.build import build_gpt_model
    from xtoken_nemo.models.config import arch_from_hf_config

    if mc.checkpoint:
        from xtoken_nemo.models.checkpoint import load_mcore_model

        model, arch = load_mcore_model(mc.checkpoint, tp=tp, params_dtype=params_dtype)
        if arch.vocab_size < vocab_size:
            raise ConfigError(
                f"model checkpoint {mc.checkpoint} has vocab_size {arch.vocab_size} but tokenizer "
                f"'{mc.tokenizer}' has {vocab_size} ids: this checkpoint does not go with this tokenizer"
            )
    else:
        arch = arch_from_hf_config(hf_config_for(mc, vocab_size))
        # the same seed gives the same weights at any TP size: megatron initializes the full
        # tensors on CPU and splits them (use_cpu_initialization)
        torch.manual_seed(mc.init_seed)
        model = build_gpt_model(arch, tp=tp, params_dtype=params_dtype)
    if trainable:
        model.train()
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model, arch
