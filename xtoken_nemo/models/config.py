"""Architecture descriptions: an HF ``config.json`` -> :class:`ModelArch` -> megatron-core config.

Supported families (the ones the paper uses):

============  =============================  ==================================================
family        HF architectures               what is special
============  =============================  ==================================================
``llama``     LlamaForCausalLM               rope scaling "llama3" (Llama-3.1/3.2), tied (3.2)
                                             or untied embeddings, GQA
``qwen3``     Qwen3ForCausalLM               QK-norm (per-head RMSNorm on q and k), explicit
                                             ``head_dim`` (may differ from hidden/heads),
                                             tied (<= 4B) or untied embeddings
``phi3``      Phi3ForCausalLM                fused ``qkv_proj`` and ``gate_up_proj``, partial
                                             rotary (``partial_rotary_factor``), LongRoPE
                                             (``rope_scaling.type == "longrope"``), tied
                                             embeddings (Phi-4-mini)
============  =============================  ==================================================

Vocabulary padding (the Megatron way): the embedding and output layer get
``padded_vocab_size = ceil(vocab_size / (divisor * tp)) * divisor * tp`` rows (``divisor`` 128
by default, ``--make-vocab-size-divisible-by`` in Megatron-LM). The extra rows are zero in a
converted checkpoint, so the padded logit columns are 0, not -inf: anything that normalises over
the vocabulary (softmax, KL, cross entropy) must mask columns ``>= vocab_size`` first
(:func:`xtoken_nemo.models.mask_padded_vocab`). ``ModelArch.vocab_size`` is the real size (the HF
``vocab_size``: rows of the HF embedding, which may itself exceed the tokenizer's ids), and the
padded size is recorded beside every converted checkpoint. A checkpoint converted with padding
for ``tp`` loads at any TP size that divides ``padded_vocab_size``.

This module imports neither torch nor megatron at import time.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xtoken_nemo.models.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_VOCAB_DIVISOR = 128

#: HF ``architectures[0]`` -> family name
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
#: HF ``model_type`` -> family name (used when ``architectures`` is missing)
MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "phi3": "phi3"}

#: rope types we reproduce exactly (see xtoken_nemo.models.rope)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, normalised from the HF config (either config format)."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # longrope
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelArch:
    """Everything needed to build the megatron-core model of an HF checkpoint.

    ``vocab_size`` is the real (HF) vocabulary size; see :meth:`padded_vocab_size`.
    """

    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    vocab_size: int
    tie_embeddings: bool
    qk_layernorm: bool
    max_position_embeddings: int
    rope: RopeSpec
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def padded_vocab_size(self, tp: int = 1, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
        return pad_vocab_size(self.vocab_size, tp, divisor)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("hf_config")
        return out


def pad_vocab_size(vocab_size: int, tp: int = 1, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """Megatron's padding: the next multiple of ``divisor * tp`` at or above ``vocab_size``."""
    if tp < 1 or divisor < 1:
        raise ModelError(f"vocab padding needs tp >= 1 and divisor >= 1, got tp={tp}, divisor={divisor}")
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"no config.json in {path}: give the HF model directory (with config.json and *.safetensors)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file} is not valid JSON ({exc}); re-download or fix the HF config") from exc


def family_of(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and cfg.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[cfg["model_type"]]
    raise ModelError(
        f"unsupported architecture: config.json has architectures={archs} (model_type={cfg.get('model_type')!r}); "
        f"supported: {', '.join(ARCHITECTURES)}. Convert one of those families, or add a family to "
        "xtoken_nemo/models/families.py"
    )


def _req(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ModelError(f"config.json lacks the field '{key}'; it is required to build the model")
    return cfg[key]


def _refuse_true(cfg: dict[str, Any], key: str, what: str) -> None:
    if cfg.get(key):
        raise ModelError(f"config.json field '{key}' is {cfg[key]!r}: {what} is not supported by the converter")


def parse_rope(cfg: dict[str, Any], family: str, head_dim: int) -> RopeSpec:
    """Normalise rope settings from both HF config formats.

    transformers < 5 writes ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` at the top
    level; transformers >= 5 writes one ``rope_parameters`` dict. Both are read here.
    """
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if scaling:
        params = {**scaling, **params}
    field_name = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if family == "phi3" and rope_type in ("su", "yarn"):  # transformers' Phi3Config maps these to longrope
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"config.json {field_name}.rope_type is {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
            "Other rope scalings (yarn, dynamic, ...) are not reproduced by the megatron-core model"
        )
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    prf = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    if not 0.0 < prf <= 1.0:
        raise ModelError(f"config.json partial_rotary_factor is {prf}; it must be in (0, 1]")
    rot_dim = int(head_dim * prf)
    if rot_dim % 2:
        raise ModelError(f"partial_rotary_factor {prf} x head_dim {head_dim} = {rot_dim} rotary dims: must be even")

    def orig_max() -> int:
        # Phi3 keeps the pretraining length at the top level and transformers prefers it there.
        if family == "phi3" and cfg.get("original_max_position_embeddings"):
            return int(cfg["original_max_position_embeddings"])
        value = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        return int(value if value is not None else _req(cfg, "max_position_embeddings"))

    if rope_type == "default":
        return RopeSpec("default", theta, prf)
    if rope_type == "linear":
        if params.get("factor") is None:
            raise ModelError(f"config.json {field_name}.factor is required for rope_type 'linear'")
        return RopeSpec("linear", theta, prf, factor=float(params["factor"]))
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ModelError(f"config.json {field_name}.{key} is required for rope_type 'llama3'")
        return RopeSpec(
            "llama3",
            theta,
            prf,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=orig_max(),
        )
    # longrope
    short, long = params.get("short_factor"), params.get("long_factor")
    for key, value in (("short_factor", short), ("long_factor", long)):
        if not isinstance(value, list) or len(value) != rot_dim // 2:
            raise ModelError(
                f"config.json {field_name}.{key} must be a list of {rot_dim // 2} numbers (rotary dims / 2 = "
                f"head_dim {head_dim} x partial_rotary_factor {prf} / 2), got "
                f"{'a list of ' + str(len(value)) if isinstance(value, list) else repr(value)}"
            )
    return RopeSpec(
        "longrope",
        theta,
        prf,
        factor=None if params.get("factor") is None else float(params["factor"]),
        original_max_position_embeddings=orig_max(),
        short_factor=tuple(float(x) for x in short),
        long_factor=tuple(float(x) for x in long),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
    )


def arch_from_hf_config(cfg: dict[str, Any] | str | Path) -> ModelArch:
    """Parse an HF config (dict, config.json path or model dir) into a :class:`ModelArch`.

    Raises :class:`ModelError` naming the field for unsupported architectures or options.
    """
    if not isinstance(cfg, dict):
        cfg = load_hf_config(cfg)
    family = family_of(cfg)
    hidden = int(_req(cfg, "hidden_size"))
    heads = int(_req(cfg, "num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    if heads % groups:
        raise ModelError(f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if family == "qwen3":
        head_dim = int(cfg.get("head_dim") or 128)  # Qwen3Config's default
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"config.json hidden_act is {act!r}; only 'silu' (SwiGLU MLP) is supported")
    _refuse_true(cfg, "attention_bias", "a bias on the attention projections")
    _refuse_true(cfg, "mlp_bias", "a bias on the MLP projections")
    _refuse_true(cfg, "lm_head_bias", "a bias on the output layer")
    sliding_window = None
    if family == "qwen3":
        _refuse_true(cfg, "use_sliding_window", "sliding-window attention")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ModelError(
                f"config.json layer_types has non-full attention layers {sorted(set(layer_types))}; "
                "only full attention is supported"
            )
    if family == "phi3" and cfg.get("sliding_window"):
        sliding_window = int(cfg["sliding_window"])
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    arch = ModelArch(
        family=family,
        architecture=(cfg.get("architectures") or [f"{family}"])[0],
        num_layers=int(_req(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_req(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family != "phi3" else 1e-5)),
        vocab_size=int(_req(cfg, "vocab_size")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=family == "qwen3",
        max_position_embeddings=int(_req(cfg, "max_position_embeddings")),
        rope=parse_rope(cfg, family, head_dim),
        sliding_window=sliding_window,
        torch_dtype=dtype,
        hf_config=cfg,
    )
    log.debug("parsed %s", arch)
    return arch


def check_tp(arch: ModelArch, tp: int, padded_vocab_size: int | None = None) -> None:
    """Raise ModelError if the model cannot be split over ``tp`` tensor-parallel ranks."""
    for name, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_query_groups),
        ("intermediate_size", arch.ffn_hidden_size),
    ):
        if value % tp:
            raise ModelError(
                f"config.json {name}={value} is not divisible by tensor-parallel size {tp}; "
                "choose a TP size that divides it"
            )
    if padded_vocab_size is not None and padded_vocab_size % tp:
        raise ModelError(
            f"padded_vocab_size={padded_vocab_size} of this checkpoint is not divisible by tensor-parallel size {tp}; "
            f"re-convert with `xtoken convert hf-to-mcore --tp {tp}` (pads the vocabulary to a multiple of 128 x tp)"
        )


@dataclass(frozen=True)
class KernelOptions:
    """Fused kernels and sequence parallelism asked of a GPTModel (docs/performance.md).

    The defaults are Megatron-LM's for a ~1B model on H100s (``--no-bias-swiglu-fusion``,
    ``--no-bias-dropout-fusion``, ``--no-rope-fusion``, ``--no-gradient-accumulation-fusion``,
    ``--no-persist-layer-norm`` all unset, ``--sequence-parallel`` with TP > 1). They are requests:
    :func:`xtoken_nemo.models.build.resolve_kernel_options` keeps only what the machine and the
    layer spec can run (all off on CPU). :meth:`off` is the unfused model (conversion, scoring,
    parity tests)."""

    bias_activation_fusion: bool = True  # SwiGLU as one torch.compile'd kernel (megatron.core.fusions)
    bias_dropout_fusion: bool = True  # residual bias-dropout-add as one torch.compile'd kernel
    apply_rope_fusion: bool = True  # Transformer-Engine's fused rotary kernel (never for LongRoPE)
    gradient_accumulation_fusion: bool = True  # weight-gradient GEMMs accumulate into the fp32 main_grad
    persist_layer_norm: bool = True  # Megatron-LM's flag; TE's fused norm kernels need nothing else
    sequence_parallel: bool = True  # with TP > 1: norms/dropout/residual on sequence shards

    @classmethod
    def off(cls) -> KernelOptions:
        return cls(**{name: False for name in cls.__dataclass_fields__})
