"""Rotary-embedding frequencies computed exactly as transformers does, for megatron-core.

megatron-core 0.16.1's ``RotaryEmbedding`` supports plain rope, partial rotary (``rotary_percent``)
and Llama-3 scaling with *hard-coded* ``low_freq_factor=1, high_freq_factor=4,
original_max_position_embeddings=8192`` (correct for Llama-3.1/3.2, but not read from the
config). It has no LongRoPE. So the model builder replaces the GPTModel's rotary module with
:class:`HFRotaryEmbedding`, which takes its inverse frequencies from :func:`rope_inv_freq`, a
line-by-line port of ``transformers.modeling_rope_utils`` (same float32 ops, so the same bits).

LongRoPE (Phi-3/Phi-4-mini, ``rope_scaling.type == "longrope"``):

- inverse frequencies are ``1 / (ext * theta ** (arange(0, d, 2) / d))`` where ``ext`` is
  ``short_factor`` while the sequence is at most ``original_max_position_embeddings`` long and
  ``long_factor`` beyond (transformers decides per forward from ``max(position_ids) + 1``; here
  from the rotary sequence length megatron asks for, which is the same for unpacked batches);
- cos and sin are multiplied by the attention factor
  ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` with
  ``factor = max_position_embeddings / original_max_position_embeddings`` unless given
  (1.19 for Phi-4-mini). megatron applies such a factor ("mscale", YaRN's concentration factor)
  in its unfused rope path, reading it from the config; :func:`set_rope_mscale` sets it there.
  The fused (TE) rope kernel refuses mscale != 1, so the builder turns rope fusion off for it.
"""

from __future__ import annotations

import math

import torch

from xtoken_nemo.models.config import ModelArch, RopeSpec
from xtoken_nemo.models.errors import ModelError


def _base_inv_freq(rope: RopeSpec, dim: int) -> torch.Tensor:
    """[dim/2] plain inverse frequencies, float32 (transformers' formula)."""
    return 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def rope_inv_freq(arch: ModelArch, seq_len: int | None = None) -> torch.Tensor:
    """[rotary_dim/2] float32 inverse frequencies for sequences of length ``seq_len``.

    Only LongRoPE depends on ``seq_len`` (short factors up to the original context, long beyond).
    """
    rope, dim = arch.rope, arch.rotary_dim
    if rope.rope_type == "default":
        return _base_inv_freq(rope, dim)
    if rope.rope_type == "linear":
        return _base_inv_freq(rope, dim) / rope.factor
    if rope.rope_type == "llama3":
        inv_freq = _base_inv_freq(rope, dim)
        factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old_context_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_context_len / low
        high_freq_wavelen = old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    if rope.rope_type == "longrope":
        long = seq_len is not None and seq_len > rope.original_max_position_embeddings
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * rope.theta**shape)
    raise ModelError(f"rope_type {rope.rope_type!r} is not supported")


def rope_attention_factor(arch: ModelArch) -> float:
    """The factor cos and sin are multiplied by (1.0 except for LongRoPE)."""
    rope = arch.rope
    if rope.rope_type != "longrope":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    factor = (
        rope.factor if rope.factor is not None else arch.max_position_embeddings / rope.original_max_position_embeddings
    )
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings))


def set_rope_mscale(config: object, mscale: float) -> None:
    """Make megatron's attention multiply rope cos/sin by ``mscale`` (LongRoPE's attention factor).

    megatron-core's ``Attention`` passes ``_yarn_get_concentration_factor_from_config(config)`` as
    ``mscale`` to ``apply_rotary_pos_emb`` for every rope type. That function returns
    ``(0.1 * yarn_mscale * ln(s) + 1) / (0.1 * yarn_mscale_all_dim * ln(s) + 1)`` for
    ``s = yarn_rotary_scaling_factor`` when the config has these attributes. With ``s = e``,
    ``yarn_mscale_all_dim = 0`` and ``yarn_mscale = 10 * (mscale - 1)`` it returns ``mscale``.
    The result is checked, so a megatron release that changes this fails loudly, not silently.
    """
    if mscale == 1.0:
        return
    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = 10.0 * (mscale - 1.0)
    config.yarn_mscale_all_dim = 0.0
    try:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )
    except ImportError as exc:  # pragma: no cover - depends on the megatron release
        raise ModelError(
            "this megatron-core release has no rope concentration factor hook; LongRoPE "
            "(rope_scaling.type 'longrope') cannot be reproduced with it"
        ) from exc
    got = _yarn_get_concentration_factor_from_config(config)
    if abs(got - mscale) > 1e-12:
        raise ModelError(f"could not set the LongRoPE attention factor {mscale} in megatron-core (got {got})")


_ROTARY_CLASS = None


def hf_rotary_embedding_class():
    """The megatron ``RotaryEmbedding`` subclass (created lazily: megatron is imported here)."""
    global _ROTARY_CLASS
    if _ROTARY_CLASS is not None:
        return _ROTARY_CLASS
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class HFRotaryEmbedding(RotaryEmbedding):
        """Rotary embedding whose frequencies come from :func:`rope_inv_freq` (HF-exact).

        Also keeps ``inv_freq`` on CPU when CUDA is absent (the parent moves it to
        ``torch.cuda.current_device()`` on first use).
        """

        def __init__(self, arch: ModelArch, cp_group=None) -> None:
            super().__init__(
                kv_channels=arch.head_dim,
                rotary_percent=arch.rope.partial_rotary_factor,
                rotary_base=arch.rope.theta,
                use_cpu_initialization=True,
                cp_group=cp_group,
            )
            self.arch = arch
            self.inv_freq = rope_inv_freq(arch)
            self._long_inv_freq = (
                rope_inv_freq(arch, seq_len=arch.rope.original_max_position_embeddings + 1)
                if arch.rope.rope_type == "longrope"
                else None
            )

        def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
            """[rotary_dim/2] float32, on the compute device."""
            inv = self.inv_freq
            if self._long_inv_freq is not None and seq_len > self.arch.rope.original_max_position_embeddings:
                inv = self._long_inv_freq
            if torch.cuda.is_available() and inv.device.type == "cpu":
                inv = inv.to(device=torch.cuda.current_device())
            return inv

        def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
            """[max_seq_len, rotary_dim/2] angles for positions offset .. offset+max_seq_len-1."""
            inv = self._inv_freq_for(max_seq_len + offset)
            seq = torch.arange(max_seq_len, device=inv.device, dtype=inv.dtype) + offset
            if self.seq_len_interpolation_factor is not None:
                seq *= 1 / self.seq_len_interpolation_factor
            return torch.outer(seq, inv)

        def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
            """[max_seq_len, 1, 1, rotary_dim] (non-interleaved: [freqs, freqs])."""
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            if not self.rotary_interleaved:
                emb = torch.cat((freqs, freqs), dim=-1)
            else:
                emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
            return emb[:, None, None, :]

    _ROTARY_CLASS = HFRotaryEmbedding
    return HFRotaryEmbedding
