"""Declarative HF <-> megatron-core parameter mapping (Megatron-Bridge style).

A family is a table of :class:`ParamMapping` rows: a megatron parameter name (``*`` = layer
index), the HF tensor name(s) it is made of, the name of a :data:`TRANSFORMS` entry that turns
the HF tensors into the megatron tensor and back, and the config fields that fix the shapes
(named in shape-mismatch errors). The tables live in :mod:`xtoken_nemo.models.families`.

Megatron layouts (full tensors, i.e. TP=1; megatron's sharded state dict splits them per rank):

- ``linear_qkv.weight`` ``[groups * (heads/groups + 2) * head_dim, hidden]``: per query group g,
  the group's ``heads/groups`` query heads, then its key head, then its value head. HF keeps
  ``q_proj [heads*head_dim, hidden]``, ``k_proj``/``v_proj [groups*head_dim, hidden]`` (Llama,
  Qwen3) or their row concatenation ``qkv_proj`` (Phi-3).
- ``linear_fc1.weight`` ``[2 * ffn, hidden]`` = ``[gate; up]`` (megatron's SwiGLU takes
  ``silu(first half) * second half``). HF keeps ``gate_proj``/``up_proj`` (Llama, Qwen3) or
  ``gate_up_proj = [gate; up]`` (Phi-3, the same layout).
- ``embedding.word_embeddings.weight`` / ``output_layer.weight`` ``[padded_vocab, hidden]``: HF's
  ``[vocab, hidden]`` plus zero rows (see config.py on vocab padding).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xtoken_nemo.models.config import ModelArch
from xtoken_nemo.models.errors import ModelError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """A named conversion between HF tensors and one megatron tensor.

    to_megatron(hf_tensors, megatron_shape, arch) -> tensor of megatron_shape
    to_hf(megatron_tensor, arch) -> list of HF tensors (same order as the mapping's ``hf``)
    hf_shapes(megatron_shape, arch) -> expected shapes of the HF tensors
    """

    name: str
    to_megatron: Callable[[list[torch.Tensor], Shape, ModelArch], torch.Tensor]
    to_hf: Callable[[torch.Tensor, ModelArch], list[torch.Tensor]]
    hf_shapes: Callable[[Shape, ModelArch], list[Shape]]


@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    hf: tuple[str, ...]
    transform: str = "identity"
    #: config.json fields that determine the shapes (named in errors)
    fields: tuple[str, ...] = ()
    #: "tied" / "untied": the row applies only with tied / untied embeddings
    when: str | None = None

    def applies(self, arch: ModelArch) -> bool:
        return self.when is None or (self.when == "tied") == arch.tie_embeddings


# ---- transforms ---------------------------------------------------------------------------------


def _qkv_sizes(arch: ModelArch) -> tuple[int, int, int]:
    """(query rows, key rows, value rows) in HF layout."""
    return (
        arch.num_attention_heads * arch.head_dim,
        arch.num_query_groups * arch.head_dim,
        arch.num_query_groups * arch.head_dim,
    )


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """q [heads*d, h], k/v [groups*d, h] -> megatron [groups*(heads/groups+2)*d, h]."""
    g, d = arch.num_query_groups, arch.head_dim
    per = arch.num_attention_heads // g
    h = q.shape[-1]
    return torch.cat([q.reshape(g, per * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


def split_qkv(w: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """megatron [groups*(heads/groups+2)*d, h] -> [q [heads*d, h], k [groups*d, h], v [groups*d, h]]."""
    g, d = arch.num_query_groups, arch.head_dim
    per = arch.num_attention_heads // g
    h = w.shape[-1]
    grouped = w.reshape(g, (per + 2) * d, h)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return [q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(
        "identity",
        to_megatron=lambda ts, shape, arch: ts[0],
        to_hf=lambda t, arch: [t],
        hf_shapes=lambda shape, arch: [shape],
    ),
    # embedding / output layer: HF [vocab, h] <-> megatron [padded_vocab, h] (zero rows appended)
    "vocab_rows": Transform(
        "vocab_rows",
        to_megatron=lambda ts, shape, arch: _pad_rows(ts[0], shape[0]),
        to_hf=lambda t, arch: [t[: arch.vocab_size]],
        hf_shapes=lambda shape, arch: [(arch.vocab_size, *shape[1:])],
    ),
    # separate q, k, v projections -> megatron's per-group interleaved linear_qkv
    "qkv": Transform(
        "qkv",
        to_megatron=lambda ts, shape, arch: interleave_qkv(ts[0], ts[1], ts[2], arch),
        to_hf=split_qkv,
        hf_shapes=lambda shape, arch: [(n, arch.hidden_size) for n in _qkv_sizes(arch)],
    ),
    # Phi-3 qkv_proj = [q; k; v] rows -> megatron's per-group interleaved linear_qkv
    "fused_qkv": Transform(
        "fused_qkv",
        to_megatron=lambda ts, shape, arch: interleave_qkv(*torch.split(ts[0], list(_qkv_sizes(arch)), dim=0), arch),
        to_hf=lambda t, arch: [torch.cat(split_qkv(t, arch), dim=0)],
        hf_shapes=lambda shape, arch: [(sum(_qkv_sizes(arch)), arch.hidden_size)],
    ),
    # separate gate and up projections -> megatron linear_fc1 = [gate; up]
    "gate_up": Transform(
        "gate_up",
        to_megatron=lambda ts, shape, arch: torch.cat([ts[0], ts[1]], dim=0),
        to_hf=lambda t, arch: [t[: arch.ffn_hidden_size].contiguous(), t[arch.ffn_hidden_size :].contiguous()],
        hf_shapes=lambda shape, arch: [(arch.ffn_hidden_size, arch.hidden_size)] * 2,
    ),
    # Phi-3 gate_up_proj is already [gate; up]: the same layout as linear_fc1
    "fused_gate_up": Transform(
        "fused_gate_up",
        to_megatron=lambda ts, shape, arch: ts[0],
        to_hf=lambda t, arch: [t],
        hf_shapes=lambda shape, arch: [(2 * arch.ffn_hidden_size, arch.hidden_size)],
    ),
}

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _generic(name: str) -> tuple[str, int | None]:
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".layers.*." + name[m.end() :], int(m.group(1))


@dataclass(frozen=True)
class BoundMapping:
    """A table row resolved for one megatron parameter (layer index substituted)."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    fields: tuple[str, ...]


class MappingTable:
    """A family's rows, looked up by concrete megatron parameter name."""

    def __init__(self, rows: tuple[ParamMapping, ...]) -> None:
        self.rows = rows
        for row in rows:
            if row.transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {row.transform!r} in mapping for {row.megatron}")

    def bind(self, megatron_name: str, arch: ModelArch) -> BoundMapping:
        generic, layer = _generic(megatron_name)
        for row in self.rows:
            if row.megatron == generic and row.applies(arch):
                hf = tuple(n.replace("*", str(layer)) if layer is not None else n for n in row.hf)
                return BoundMapping(megatron_name, hf, TRANSFORMS[row.transform], row.fields)
        raise ModelError(
            f"megatron parameter {megatron_name} has no HF mapping for family {arch.family}; "
            "the model and table disagree"
        )
