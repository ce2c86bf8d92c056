"""ModelArch -> megatron-core ``TransformerConfig`` + ``GPTModel``; forward helpers.

Layer spec: the Transformer-Engine spec when CUDA is available and ``transformer_engine`` imports,
the local (pure megatron-core) spec otherwise; TE is only imported inside :func:`layer_spec`.
Both specs produce the same dist-checkpoint keys (the local spec maps its layernorm names onto
TE's fused ones), so a checkpoint written on CPU loads on GPU and back.

Fused kernels and sequence parallelism are requested with a
:class:`~xtoken_nemo.models.config.KernelOptions` and resolved here against what this process can
run (:func:`resolve_kernel_options`, docs/performance.md); without one, everything is unfused.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
from xtoken_nemo.models.config import KernelOptions, ModelArch, check_tp
from xtoken_nemo.models.errors import ModelError
from xtoken_nemo.models.rope import hf_rotary_embedding_class, rope_attention_factor, set_rope_mscale
from xtoken_nemo.models.runtime import ensure_rng_tracker, seed_model_init

log = logging.getLogger(__name__)


def _cuda_and_importable(module: str) -> bool:
    """CUDA present and ``module`` (a GPU-only extension) imports."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def te_available() -> bool:
    """True when the TE layer spec can be used (CUDA present and transformer_engine imports)."""
    return _cuda_and_importable("transformer_engine")


# ----------------------------------------------------------------------------------------------
# fused kernels: what megatron-core 0.16.1 needs for each flag, probed here (tests monkeypatch these)
# ----------------------------------------------------------------------------------------------
def torch_compile_available() -> bool:
    """megatron.core.fusions' bias-SwiGLU and bias-dropout-add kernels are ``torch.compile``d
    (megatron.core.jit.jit_fuser): on CUDA they need Triton and the C compiler Triton builds its
    launcher with, nothing from TE or Apex."""
    import os
    import shutil

    if not torch.cuda.is_available():
        return False
    if not (os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
        return False
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:
        return False


def te_rope_fusion_available() -> bool:
    """``apply_rope_fusion`` calls Transformer-Engine's fused rotary kernel (megatron's
    rope_utils.fused_apply_rotary_pos_emb, None without TE >= 1.4); TransformerConfig refuses the
    flag without it."""
    if not te_available():
        return False
    try:
        from megatron.core.models.common.embeddings import rope_utils

        return rope_utils.fused_apply_rotary_pos_emb is not None
    except Exception:
        return False


def grad_accum_fusion_available() -> bool:
    """``gradient_accumulation_fusion``: TE linears accumulate weight gradients into ``main_grad``
    themselves, but the GPT output layer is megatron's ColumnParallelLinear in both layer specs and
    raises without Apex's ``fused_weight_gradient_mlp_cuda`` extension."""
    return _cuda_and_importable("fused_weight_gradient_mlp_cuda")


@dataclass(frozen=True)
class ResolvedKernels:
    """The TransformerConfig flags to use, and each requested flag that was turned off with why."""

    flags: dict[str, bool]
    turned_off: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``name (why), ...`` grouped by reason."""
        by_reason: dict[str, list[str]] = {}
        for name, why in self.turned_off.items():
            by_reason.setdefault(why, []).append(name)
        return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())


_LOGGED: set[str] = set()


def resolve_kernel_options(requested: KernelOptions | None, arch: ModelArch, tp: int, use_te: bool) -> ResolvedKernels:
    """The kernel flags of a model built with layer spec ``use_te`` at TP ``tp``.

    Rules (megatron-core 0.16.1): nothing without CUDA; bias-activation and bias-dropout-add
    fusions need ``torch.compile`` (Triton); rope fusion needs TE's kernel and an attention factor
    of 1 (not LongRoPE); gradient-accumulation fusion needs Apex's ``fused_weight_gradient_mlp_cuda``;
    persistent layer norm and sequence parallelism need the TE layer spec (the local spec's torch
    RMSNorm asserts both off); sequence parallelism only means something at TP > 1.
    ``requested`` None: all off (the unfused model), nothing logged.
    """
    if requested is None:
        requested = KernelOptions.off()
    wanted = {name: bool(getattr(requested, name)) for name in KernelOptions.__dataclass_fields__}
    if tp == 1:
        wanted["sequence_parallel"] = False  # not applicable: no tensor parallelism
    cuda = torch.cuda.is_available()
    why: dict[str, str] = {}
    for name, on in wanted.items():
        if not on:
            continue
        if not cuda:
            why[name] = "no CUDA"
        elif name in ("bias_activation_fusion", "bias_dropout_fusion") and not torch_compile_available():
            why[name] = "torch.compile unavailable (needs Triton and a C compiler)"
        elif name == "apply_rope_fusion" and rope_attention_factor(arch) != 1.0:
            why[name] = "LongRoPE attention factor (the fused rope kernel has no mscale)"
        elif name == "apply_rope_fusion" and not (use_te and te_rope_fusion_available()):
            why[name] = "needs Transformer-Engine's fused rope kernel"
        elif name == "gradient_accumulation_fusion" and not grad_accum_fusion_available():
            why[name] = "needs Apex's fused_weight_gradient_mlp_cuda"
        elif name in ("persist_layer_norm", "sequence_parallel") and not use_te:
            why[name] = "local layer spec (torch RMSNorm supports neither): needs Transformer-Engine"
    flags = {name: on and name not in why for name, on in wanted.items()}
    resolved = ResolvedKernels(flags=flags, turned_off=why)
    if why:
        line = f"kernel options turned off: {resolved.summary()}"
        if line not in _LOGGED:  # once per process, not once per model (student + teachers)
            _LOGGED.add(line)
            log.info(line)
    return resolved


def transformer_config(
    arch: ModelArch,
    tp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    kernels: KernelOptions | None = None,
    use_te: bool | None = None,
    **overrides: Any,
):
    """The megatron-core ``TransformerConfig`` of ``arch`` (dropout 0; overrides win).

    ``kernels``: the fused kernels and sequence parallelism asked for, resolved by
    :func:`resolve_kernel_options` for layer spec ``use_te`` (None: TE when it imports on CUDA);
    None: all unfused, as the conversion and parity tools build their models.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_tp(arch, tp)
    on_cpu = not torch.cuda.is_available()
    if use_te is None:
        use_te = te_available()
    resolved = resolve_kernel_options(kernels, arch, tp, use_te)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # Megatron-LM's compiled softmax kernels (scaled_masked_softmax_cuda) ship with neither the
        # megatron-core wheel nor TE; the TE spec uses TE's fused attention instead
        masked_softmax_fusion=False,
        **resolved.flags,
    )
    kwargs.update(overrides)
    mscale = rope_attention_factor(arch)
    if mscale != 1.0 and kwargs.get("apply_rope_fusion"):
        log.warning("LongRoPE attention factor %.4f needs unfused rope: apply_rope_fusion turned off", mscale)
        kwargs["apply_rope_fusion"] = False
    config = TransformerConfig(**kwargs)
    set_rope_mscale(config, mscale)
    return config


def layer_spec(arch: ModelArch, use_te: bool | None = None):
    """TE spec on CUDA when TE imports (or ``use_te=True``), local spec otherwise."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")


@dataclass(frozen=True)
class GPTModelArgs:
    """The GPTModel constructor arguments besides config and spec."""

    vocab_size: int  # padded
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    rotary_percent: float
    rotary_base: float
    position_embedding_type: str = "rope"

    def as_kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gpt_model_args(arch: ModelArch, padded_vocab_size: int) -> GPTModelArgs:
    if padded_vocab_size < arch.vocab_size:
        raise ModelError(f"padded_vocab_size {padded_vocab_size} is smaller than vocab_size {arch.vocab_size}")
    return GPTModelArgs(
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        rotary_percent=arch.rope.partial_rotary_factor,
        rotary_base=arch.rope.theta,
    )


def build_gpt_model(
    arch: ModelArch,
    padded_vocab_size: int | None = None,
    tp: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    parallel_output: bool = True,
    perform_initialization: bool = True,
    kernels: KernelOptions | None = None,
    init_seed: int | None = None,
    **config_overrides: Any,
):
    """A megatron-core GPTModel for ``arch`` on this rank's TP shard (parallel_state must be up).

    ``padded_vocab_size`` defaults to Megatron padding for the current TP size. The rotary module
    is :class:`~xtoken_nemo.models.rope.HFRotaryEmbedding` (HF-exact frequencies, LongRoPE).
    ``kernels``: fused kernels / sequence parallelism asked for (resolved against this machine;
    None: unfused). ``init_seed``: the seed of a random model's weights
    (:func:`~xtoken_nemo.models.runtime.seed_model_init`: torch and megatron's CUDA RNG tracker, which
    ``torch.manual_seed`` does not reach); None: draw from the RNGs as they are. Returns the model
    on CUDA when available, else on CPU, in eval mode.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    ensure_rng_tracker()
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
    if padded_vocab_size is None:
        padded_vocab_size = arch.padded_vocab_size(tp)
    check_tp(arch, tp, padded_vocab_size)
    if use_te is None:
        use_te = te_available()
    config = transformer_config(
        arch,
        tp,
        params_dtype,
        kernels=kernels,
        use_te=use_te,
        perform_initialization=perform_initialization,
        **config_overrides,
    )
    args = gpt_model_args(arch, padded_vocab_size)
    if perform_initialization and init_seed is not None:
        seed_model_init(init_seed)  # right before the draws: same seed, same weights, on CUDA too
    model = GPTModel(config, layer_spec(arch, use_te), parallel_output=parallel_output, **args.as_kwargs())
    model.rotary_pos_emb = hf_rotary_embedding_class()(arch, cp_group=model.rotary_pos_emb.cp_group)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return model


def causal_mask(batch: int, seq: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked (megatron's convention); explicit masks are needed on CPU."""
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)
    return mask[None, None].expand(batch, 1, seq, seq)


def forward_logits(model, input_ids: torch.Tensor, arch: ModelArch | None = None) -> torch.Tensor:
    """[b, s] ids -> [b, s, V_padded/tp] logits (this rank's vocab shard with parallel_output).

    Refuses sequences longer than a Phi-3 sliding window (megatron's local attention has no
    window, so they would silently differ from HF).
    """
    b, s = input_ids.shape
    if arch is not None and arch.sliding_window is not None and s > arch.sliding_window:
        raise ModelError(
            f"sequence length {s} exceeds config.json sliding_window={arch.sliding_window}; sliding-window "
            "attention is not reproduced: use sequences up to the window"
        )
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    with cuda_to_cpu():  # megatron's attention buffers are allocated with device=cuda
        return model(ids, pos, causal_mask(b, s, device))


def mask_padded_vocab(
    logits: torch.Tensor, vocab_size: int, tp_rank: int = 0, fill: float = float("-inf")
) -> torch.Tensor:
    """Logits [..., V_shard] with columns of ids >= ``vocab_size`` set to ``fill``.

    Returns a new tensor, or ``logits`` itself when this rank holds no padded column.

    ``V_shard`` is this rank's slice of the padded vocabulary: rank r holds ids
    ``[r * V_shard, (r + 1) * V_shard)``.
    """
    shard = logits.shape[-1]
    start = tp_rank * shard
    if start + shard <= vocab_size:
        return logits
    ids = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, fill)
