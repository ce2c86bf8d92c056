"""Models on megatron-core: HF architecture configs (Llama, Qwen3, Phi-3/4), conversion, scoring.

    from xtoken_nemo.models import arch_from_hf_config, build_gpt_model, hf_to_mcore, mcore_to_hf

Nothing here imports megatron, transformers or Transformer Engine at import time.
"""

from xtoken_nemo.models.config import (
    DEFAULT_VOCAB_DIVISOR,
    ModelArch,
    RopeSpec,
    arch_from_hf_config,
    load_hf_config,
    pad_vocab_size,
)
from xtoken_nemo.models.errors import ModelError

__all__ = [
    "DEFAULT_VOCAB_DIVISOR",
    "ModelArch",
    "ModelError",
    "RopeSpec",
    "arch_from_hf_config",
    "build_gpt_model",
    "forward_logits",
    "hf_to_mcore",
    "load_hf_config",
    "load_mcore_checkpoint",
    "mask_padded_vocab",
    "mcore_to_hf",
    "pad_vocab_size",
    "score_text",
]

_LAZY = {
    "build_gpt_model": "xtoken_nemo.models.build",
    "forward_logits": "xtoken_nemo.models.build",
    "mask_padded_vocab": "xtoken_nemo.models.build",
    "hf_to_mcore": "xtoken_nemo.models.convert",
    "mcore_to_hf": "xtoken_nemo.models.convert",
    "load_mcore_checkpoint": "xtoken_nemo.models.checkpoint",
    "score_text": "xtoken_nemo.models.score",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtoken_nemo.models' has no attribute {name!r}")
