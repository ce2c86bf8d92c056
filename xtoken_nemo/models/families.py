"""Per-family HF <-> megatron-core parameter tables (see mapping.py for the transforms).

Only names differ between Llama and Qwen3 (Qwen3 adds per-head q/k RMSNorm); Phi-3 fuses qkv and
gate/up in HF. Output layer rows apply only to untied models (tied models have no
``output_layer.weight``: megatron reuses the embedding, HF's ``lm_head.weight`` is the same
tensor and is not stored separately).
"""

from __future__ import annotations

from xtoken_nemo.models.mapping import MappingTable
from xtoken_nemo.models.mapping import ParamMapping as P

L = "decoder.layers.*."
H = "model.layers.*."

_COMMON = (
    P("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab_rows", ("vocab_size", "hidden_size")),
    P(L + "input_layernorm.weight", (H + "input_layernorm.weight",), fields=("hidden_size",)),
    P(
        L + "self_attention.linear_proj.weight",
        (H + "self_attn.o_proj.weight",),
        fields=("hidden_size", "num_attention_heads", "head_dim"),
    ),
    P(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), fields=("hidden_size",)),
    P(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), fields=("hidden_size", "intermediate_size")),
    P("decoder.final_layernorm.weight", ("model.norm.weight",), fields=("hidden_size",)),
    P("output_layer.weight", ("lm_head.weight",), "vocab_rows", ("vocab_size", "hidden_size"), when="untied"),
)

_SPLIT_ATTN_MLP = (
    P(
        L + "self_attention.linear_qkv.weight",
        (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
        "qkv",
        ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"),
    ),
    P(
        L + "mlp.linear_fc1.weight",
        (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
        "gate_up",
        ("hidden_size", "intermediate_size"),
    ),
)

LLAMA = MappingTable(_COMMON + _SPLIT_ATTN_MLP)

QWEN3 = MappingTable(
    _COMMON
    + _SPLIT_ATTN_MLP
    + (
        P(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), fields=("head_dim",)),
        P(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), fields=("head_dim",)),
    )
)

PHI3 = MappingTable(
    _COMMON
    + (
        P(
            L + "self_attention.linear_qkv.weight",
            (H + "self_attn.qkv_proj.weight",),
            "fused_qkv",
            ("hidden_size", "num_attention_heads", "num_key_value_heads"),
        ),
        P(
            L + "mlp.linear_fc1.weight",
            (H + "mlp.gate_up_proj.weight",),
            "fused_gate_up",
            ("hidden_size", "intermediate_size"),
        ),
    )
)

TABLES: dict[str, MappingTable] = {"llama": LLAMA, "qwen3": QWEN3, "phi3": PHI3}

#: HF tensors that carry no weights (old checkpoints store rotary buffers)
IGNORED_HF = ("rotary_emb.inv_freq",)
