"""Communication overlap, fused kernels and sequence parallelism (``parallel.*``, docs/performance.md).

- resolution: on CPU every fused kernel and sequence parallelism is off, with one log line; with
  CUDA + Transformer-Engine + Apex emulated (the availability probes monkeypatched) they are on as
  Megatron-LM runs them, rope fusion off for LongRoPE (Phi-4-mini), sequence parallelism iff TP > 1;
  on a CUDA machine without TE/Apex (the GPU check machine) only the torch.compile fusions stay;
- DDP options: overlap of the gradient reduce and the parameter all-gather as Megatron-LM sets
  them (megatron's default bucket of max(40M, 1M x DP) parameters), off at DP = 1 and (param
  gather) without the distributed optimizer;
- DP=2 on gloo: overlapped gradient reduction in small buckets gives the same losses and grad
  norms as one synchronous bucket, also around a skipped (NaN) step; the distributed optimizer
  with both overlaps (forced on CPU) equals it without, and a checkpoint's model state is
  all-gathered first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from test_distill import sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)
from test_models import REAL_CONFIGS

from xtoken_nemo.distill.config import ConfigError, ParallelConfig, apply_overrides, config_from_dict
from xtoken_nemo.models.config import KernelOptions, arch_from_hf_config

FUSIONS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
)


def _arch(name: str):
    return arch_from_hf_config(REAL_CONFIGS[name])


# ----------------------------------------------------------------------------------------------
# kernel options
# ----------------------------------------------------------------------------------------------
def test_cpu_turns_every_kernel_option_off_with_one_log_line(caplog):
    from xtoken_nemo.models import build

    assert not torch.cuda.is_available()
    build._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="xtoken_nemo.models.build"):
        for _ in range(3):  # student + teachers: logged once
            resolved = build.resolve_kernel_options(KernelOptions(), _arch("Llama-3.2-1B"), tp=2, use_te=False)
    assert resolved.flags == {name: False for name in FUSIONS + ("sequence_parallel",)}
    assert set(resolved.turned_off) == set(FUSIONS) | {"sequence_parallel"}
    lines = [r.getMessage() for r in caplog.records if "kernel options turned off" in r.getMessage()]
    assert len(lines) == 1 and "no CUDA" in lines[0] and "bias_activation_fusion" in lines[0]
    # the TransformerConfig the run builds on CPU is today's unfused one
    cfg = build.transformer_config(_arch("Llama-3.2-1B"), tp=2, kernels=KernelOptions())
    assert not any(getattr(cfg, name) for name in FUSIONS + ("sequence_parallel", "masked_softmax_fusion"))
    # no options asked (conversion, scoring): unfused, nothing logged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xtoken_nemo.models.build"):
        assert build.resolve_kernel_options(None, _arch("Llama-3.2-1B"), tp=1, use_te=False).turned_off == {}
    assert not caplog.records


@pytest.fixture
def emulated_gpu(monkeypatch):
    """CUDA present; TE and Apex as asked: ``set(te=..., apex=...)``."""
    from megatron.core.models.common.embeddings import rope_utils

    from xtoken_nemo.models import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "torch_compile_available", lambda: True)
    state = {}

    def set_(te: bool, apex: bool) -> None:
        state.update(te=te, apex=apex)
        monkeypatch.setattr(build, "te_available", lambda: te)
        monkeypatch.setattr(build, "te_rope_fusion_available", lambda: te)
        monkeypatch.setattr(build, "grad_accum_fusion_available", lambda: apex)
        # TransformerConfig refuses apply_rope_fusion unless TE's kernel imported
        monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", (lambda *a, **k: None) if te else None)

    build._LOGGED.clear()
    return set_


def test_gpu_with_te_and_apex_turns_the_fusions_on(emulated_gpu):
    from xtoken_nemo.models.build import resolve_kernel_options, transformer_config

    emulated_gpu(te=True, apex=True)
    llama = _arch("Llama-3.2-1B")
    for tp in (1, 2):
        resolved = resolve_kernel_options(KernelOptions(), llama, tp=tp, use_te=True)
        assert resolved.turned_off == {}
        assert resolved.flags == dict({name: True for name in FUSIONS}, sequence_parallel=tp > 1)
    cfg = transformer_config(llama, tp=2, params_dtype=torch.bfloat16, kernels=KernelOptions(), use_te=True)
    assert all(getattr(cfg, name) for name in FUSIONS) and cfg.sequence_parallel
    assert not transformer_config(llama, tp=1, kernels=KernelOptions(), use_te=True).sequence_parallel
    # Phi-4-mini: LongRoPE's attention factor has no fused kernel; the rest stays on
    phi = _arch("Phi-4-mini-instruct")
    resolved = resolve_kernel_options(KernelOptions(), phi, tp=2, use_te=True)
    assert set(resolved.turned_off) == {"apply_rope_fusion"} and "LongRoPE" in resolved.turned_off["apply_rope_fusion"]
    cfg = transformer_config(phi, tp=2, kernels=KernelOptions(), use_te=True)
    assert not cfg.apply_rope_fusion and cfg.bias_activation_fusion and cfg.sequence_parallel
    # a field set false stays off, silently
    resolved = resolve_kernel_options(
        KernelOptions(sequence_parallel=False, apply_rope_fusion=False), llama, tp=2, use_te=True
    )
    assert (
        not resolved.flags["sequence_parallel"]
        and not resolved.flags["apply_rope_fusion"]
        and resolved.turned_off == {}
    )


def test_gpu_without_te_or_apex_keeps_only_the_compiled_fusions(emulated_gpu):
    """The GPU check machine: CUDA and Triton, no Transformer-Engine, no Apex (local layer spec)."""
    from xtoken_nemo.models.build import resolve_kernel_options, transformer_config

    emulated_gpu(te=False, apex=False)
    resolved = resolve_kernel_options(KernelOptions(), _arch("Llama-3.2-1B"), tp=2, use_te=False)
    assert resolved.flags == dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )
    assert "Transformer-Engine" in resolved.turned_off["apply_rope_fusion"]
    assert "fused_weight_gradient_mlp_cuda" in resolved.turned_off["gradient_accumulation_fusion"]
    assert "local layer spec" in resolved.turned_off["sequence_parallel"]
    cfg = transformer_config(_arch("Llama-3.2-1B"), tp=2, kernels=KernelOptions())  # use_te from te_available()
    assert cfg.bias_activation_fusion and not cfg.sequence_parallel and not cfg.apply_rope_fusion
    # TE without Apex: gradient-accumulation fusion stays off (megatron's output layer needs Apex)
    emulated_gpu(te=True, apex=False)
    resolved = resolve_kernel_options(KernelOptions(), _arch("Llama-3.2-1B"), tp=2, use_te=True)
    assert set(resolved.turned_off) == {"gradient_accumulation_fusion"}


# ----------------------------------------------------------------------------------------------
# DDP options
# ----------------------------------------------------------------------------------------------
def test_ddp_options_as_megatron_lm_sets_them():
    from megatron.core.distributed import DistributedDataParallelConfig

    p = ParallelConfig()
    options, off = p.ddp_options(dp_size=128, distributed_optimizer=True)  # 16 x 8 H100, TP=1
    assert off == {}
    assert options == dict(
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        bucket_size=None,
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )
    DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True, **options)  # valid
    # CPU (no Apex/TE: no distributed optimizer), DP=2: only the gradient overlap
    options, off = p.ddp_options(dp_size=2, distributed_optimizer=False)
    assert options["overlap_grad_reduce"] and not options["overlap_param_gather"]
    assert "distributed optimizer" in off["overlap_param_gather"]
    # one data-parallel rank: nothing to overlap
    options, off = p.ddp_options(dp_size=1, distributed_optimizer=True)
    assert (
        not options["overlap_grad_reduce"]
        and not options["overlap_param_gather"]
        and set(off) == {"overlap_grad_reduce", "overlap_param_gather"}
    )
    # fields from overrides and from a config file; bucket_size validated
    cfg = sp_config_dict()
    apply_overrides(cfg, ["parallel.overlap_grad_reduce=false", "parallel.bucket_size=1000000"])
    assert (cfg.parallel.overlap_grad_reduce, cfg.parallel.bucket_size) == (False, 1_000_000)
    assert config_from_dict(cfg.to_dict()).parallel == cfg.parallel
    cfg.parallel.bucket_size = 0
    with pytest.raises(ConfigError, match="parallel.bucket_size"):
        cfg.validate()


def sp_config_dict():
    from xtoken_nemo.distill.config import DataConfig, DistillConfig

    return DistillConfig(data=DataConfig(paths=["x"]), teachers=[])


# ----------------------------------------------------------------------------------------------
# DP=2 on gloo
# ----------------------------------------------------------------------------------------------
def _trainer(cfg):
    from xtoken_nemo.distill.trainer import Trainer

    return Trainer(cfg, progress=False)


def _poison(trainer, steps: set[int]) -> None:
    """NaN teacher logits at the given 0-based steps (on this rank)."""
    teacher = trainer.teachers[0]
    real_forward, step_fn, current = teacher.forward, trainer.train_step, {"step": 0}

    def tracking(step):
        current["step"] = step
        return step_fn(step)

    teacher.forward = lambda *a, **k: real_forward(*a, **k) * (float("nan") if current["step"] in steps else 1.0)
    trainer.train_step = tracking


def _summary(trainer, history) -> dict:
    ddp = trainer.model.ddp_config
    return {
        "history": [{k: h[k] for k in ("total", "ce", "kd/cross", "grad_norm", "skipped")} for h in history],
        "ddp": {
            k: getattr(ddp, k)
            for k in ("overlap_grad_reduce", "overlap_param_gather", "bucket_size", "use_distributed_optimizer")
        },
        "buckets": len(trainer.model.bucket_groups),
    }


def _dp2_worker(rank, world_size, pair, run_dir):
    from xtoken_nemo.distill import trainer as trainer_mod

    run_dir = Path(run_dir)
    out = {}

    def cfg_for(name, steps=3, **parallel):
        cfg = sp_config(pair, run_dir / name, mode="pkl", steps=steps, same_tok_teacher=False)
        cfg.train.micro_batch_size = 1  # 2 micro-batches per rank: no_sync over the first
        for k, v in parallel.items():
            setattr(cfg.parallel, k, v)
        return cfg

    # megatron's default: overlap with one 40M-parameter bucket; then small buckets; then no overlap
    for name, parallel in (("default", {}), ("small", {"bucket_size": 3000}), ("sync", {"overlap_grad_reduce": False})):
        t = _trainer(cfg_for(name, **parallel))
        out[name] = _summary(t, t.run()["history"])
    # a NaN step in the middle (skipped on every rank), with and without overlap: no hang, same run
    for name, parallel in (("nan_small", {"bucket_size": 3000}), ("nan_sync", {"overlap_grad_reduce": False})):
        t = _trainer(cfg_for(name, steps=4, **parallel))
        _poison(t, {1} if rank == 1 else set())  # only rank 1 sees NaN: the flag is global
        out[name] = _summary(t, t.run()["history"])
    # the distributed optimizer (needs Apex/TE Adam for checkpoints: forced here, steps only)
    trainer_mod._distributed_optimizer_works = lambda: True
    params = {}
    for name, parallel in (
        ("distopt_sync", {"overlap_grad_reduce": False, "overlap_param_gather": False}),
        ("distopt_overlap", {"bucket_size": 3000}),
    ):
        t = _trainer(cfg_for(name, **parallel))
        history = [t.train_step(step) for step in range(3)]
        out[name] = _summary(t, history)
        before = {k: v.detach().clone() for k, v in t.student.named_parameters()}
        t.student.sharded_state_dict()  # what a checkpoint save calls first
        after = {k: v.detach().clone() for k, v in t.student.named_parameters()}
        params[name] = (before, after)
    (sync_before, _), (overlap_before, overlap_after) = params["distopt_sync"], params["distopt_overlap"]
    out["stale_before_sync"] = any(not torch.equal(sync_before[k], overlap_before[k]) for k in sync_before)
    out["equal_after_sync"] = all(
        torch.allclose(sync_before[k], overlap_after[k], rtol=1e-5, atol=1e-7) for k in sync_before
    )
    return out


def test_dp2_overlapped_gradient_reduce_equals_synchronous(sp_pair, tmp_path):  # noqa: F811
    res = run_distributed(_dp2_worker, world_size=2, tp=1, args=(sp_pair, str(tmp_path)))
    r0 = res[0]
    assert r0["default"]["ddp"] == dict(
        overlap_grad_reduce=True, overlap_param_gather=False, bucket_size=40_000_000, use_distributed_optimizer=False
    )
    assert r0["default"]["buckets"] == 1
    assert r0["small"]["ddp"]["bucket_size"] == 3000 and r0["small"]["buckets"] > 3
    assert r0["sync"]["ddp"]["overlap_grad_reduce"] is False and r0["sync"]["ddp"]["bucket_size"] is None
    assert r0["sync"]["buckets"] == 1

    def same(a, b, rel=1e-6):
        for ha, hb in zip(a, b, strict=True):
            for key in ha:
                assert ha[key] == pytest.approx(hb[key], rel=rel, nan_ok=True), key

    for r in res:
        same(r["default"]["history"], r["sync"]["history"])
        same(r["small"]["history"], r["sync"]["history"])
        # a skipped step: same skip on both ranks, the run goes on and matches the synchronous one
        assert [h["skipped"] for h in r["nan_small"]["history"]] == [0.0, 1.0, 0.0, 0.0]
        same(r["nan_small"]["history"], r["nan_sync"]["history"])
        # distributed optimizer: reduce-scatter + all-gather, both overlapped, equal the synchronous ones
        assert r["distopt_overlap"]["ddp"] == dict(
            overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=3000, use_distributed_optimizer=True
        )
        same(r["distopt_overlap"]["history"], r["distopt_sync"]["history"], rel=1e-5)
        same(r["distopt_sync"]["history"], r["sync"]["history"], rel=1e-5)
        # after the last step the all-gather waits for the next forward; a checkpoint forces it
        assert r["stale_before_sync"] and r["equal_after_sync"]
    same(res[0]["small"]["history"], res[1]["small"]["history"])  # metrics are global
