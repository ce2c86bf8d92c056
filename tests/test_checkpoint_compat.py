"""Checkpoints across layer specs (local <-> Transformer-Engine) and corrupt latest checkpoints.

There is no TE here, so a TE-spec model is emulated on a real local-spec GPTModel
(:func:`emulate_te`): what differs for checkpointing is only the fp8 metadata that TE modules keep
as "extra state". megatron-core 0.16.1 with the TE spec:

- every TE linear (``linear_qkv``/``linear_fc1``: TELayerNormColumnParallelLinear, ``linear_proj``/
  ``linear_fc2``: TERowParallelLinear) returns ``get_extra_state()`` = a uint8 tensor (the pickled
  fp8 metadata, empty without fp8), which megatron's ``make_sharded_tensors_for_checkpoint`` wraps
  as a ShardedObject. The local linears do the same with ``None`` (their ``get_extra_state``), so
  these keys exist in both kinds of checkpoint; only their payload differs. TE linears, unlike the
  local ones, register no pre-hook that fills a missing ``_extra_state`` on ``load_state_dict``.
- core attention (TEDotProductAttention) has extra state too; it reaches the sharded state dict
  where megatron's default path wraps the module's state dict (megatron-core before the
  ``softmax_type`` change, and 0.16.1 with ``softmax_type="learnable"``). The local
  DotProductAttention has none: a local checkpoint lacks
  ``decoder.layers.self_attention.core_attention._extra_state``.

The emulation swaps the class of those modules for a subclass with TE's extra-state methods, so
the keys, shapes ([num_layers] with the layer index as offset), replica ids ((0, tp_rank, dp_rank))
and payloads are produced by megatron's own code, exactly as for TE.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch

VOCAB = 256
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
CORE_ATTENTION_KEY = "decoder.layers.self_attention.core_attention._extra_state"


# ---- TE emulation ---------------------------------------------------------------------------------


def _te_get_extra_state(self):
    return self._te_extra_state


def _te_set_extra_state(self, state):
    # TE's set_extra_state returns early on None / an empty tensor; record what arrived
    self._te_received = state


def _te_core_attention_sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets)


_TE_CLASSES: dict = {}


def _te_class(cls, core_attention: bool):
    if cls not in _TE_CLASSES:
        attrs = {"get_extra_state": _te_get_extra_state, "set_extra_state": _te_set_extra_state}
        if core_attention:
            attrs["sharded_state_dict"] = _te_core_attention_sharded_state_dict
        _TE_CLASSES[cls] = type(f"TE{cls.__name__}", (cls,), attrs)
    return _TE_CLASSES[cls]


def emulate_te(model):
    """Give a local-spec GPTModel the checkpoint behaviour of the TE spec (in place); returns it."""
    for name, module in model.decoder.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LINEARS or leaf == "core_attention":
            module.__class__ = _te_class(type(module), core_attention=leaf == "core_attention")
            module._load_state_dict_pre_hooks.clear()  # the local linears' "default _extra_state=None" hook
            module._te_extra_state = torch.frombuffer(
                bytearray(pickle.dumps({"fp8_meta": name})), dtype=torch.uint8
            ).clone()
            module._te_received = "nothing"
    return model


def without_extra_state(model):
    """A model whose sharded state dict has no ``_extra_state`` at all (checkpoints written by
    other tools, e.g. a converter that saves plain tensors)."""
    original = model.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        return {k: v for k, v in original(*args, **kwargs).items() if not k.endswith("_extra_state")}

    model.sharded_state_dict = sharded_state_dict
    return model


def _te_modules(model):
    return {n: m for n, m in model.decoder.named_modules() if hasattr(m, "_te_received")}


# ---- tiny models -----------------------------------------------------------------------------------


def _arch():
    from xtoken_nemo.distill.config import ModelConfig
    from xtoken_nemo.distill.model_setup import hf_config_for
    from xtoken_nemo.models.config import arch_from_hf_config

    mc = ModelConfig(
        family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128
    )
    return arch_from_hf_config(hf_config_for(mc, VOCAB))


def _model(seed: int = 0, te: bool = False):
    from xtoken_nemo.models.build import build_gpt_model
    from xtoken_nemo.models.runtime import ensure_model_parallel

    ensure_model_parallel(1)
    torch.manual_seed(seed)
    model = build_gpt_model(_arch(), VOCAB, tp=1, use_te=False)
    return emulate_te(model) if te else model


def _params(model) -> dict:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _save_converted(model, out: Path) -> Path:
    from xtoken_nemo.models.checkpoint import save_model, write_metadata

    save_model(model, out)
    write_metadata(out, _arch(), VOCAB, 128, 1, torch.float32, source="test")
    return out


class _Trainable:
    """A tiny student with megatron's DDP and (non-distributed) optimizer, as the trainer builds them."""

    def __init__(self, seed: int, te: bool = False):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
        from xtoken_nemo.distill.model_setup import mark_tensor_parallel_params

        self.model = _model(seed, te)
        mark_tensor_parallel_params(self.model)
        self.model.train()
        with cuda_to_cpu():
            self.ddp = DistributedDataParallel(
                self.model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), self.model
            )
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-2, params_dtype=torch.float32), [self.ddp]
            )

    def step(self, seed: int) -> None:
        from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
        from xtoken_nemo.models.build import forward_logits

        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
        with cuda_to_cpu():
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            forward_logits(self.model, ids).float().pow(2).mean().backward()
            self.ddp.finish_grad_sync()
            self.optimizer.step()

    def adam_state(self) -> dict:
        inner = (
            self.optimizer.optimizer
            if hasattr(self.optimizer, "optimizer")
            else self.optimizer.chained_optimizers[0].optimizer
        )
        return {
            (i, k): v.detach().clone()
            for i, s in enumerate(inner.state.values())
            for k, v in s.items()
            if isinstance(v, torch.Tensor)
        }


# ---- Task 1: converted checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("saved", ["local", "no_extra_state"])
def test_converted_local_checkpoint_loads_into_te_model(tmp_path, monkeypatch, saved):
    import xtoken_nemo.models.build as build
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint

    src = _model(seed=1)
    if saved == "no_extra_state":
        without_extra_state(src)
    ckpt = _save_converted(src, tmp_path / "ckpt")
    original_build = build.build_gpt_model
    monkeypatch.setattr(build, "build_gpt_model", lambda *a, **k: emulate_te(original_build(*a, **k)))
    model, _, _ = load_mcore_checkpoint(ckpt)
    assert set(_te_modules(model)) and all(type(m).__name__.startswith("TE") for m in _te_modules(model).values())
    _assert_same(_params(model), _params(src))
    received = {n: m._te_received for n, m in _te_modules(model).items()}
    assert all(v is None or v == "nothing" for v in received.values())  # nothing fp8 came from a local checkpoint


def test_converted_te_checkpoint_loads_into_local_model(tmp_path):
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint

    src = _model(seed=2, te=True)
    ckpt = _save_converted(src, tmp_path / "ckpt")
    model, _, _ = load_mcore_checkpoint(ckpt)
    assert not _te_modules(model)
    _assert_same(_params(model), _params(src))


def test_te_checkpoint_round_trips_extra_state(tmp_path):
    """The emulation is faithful: TE -> TE hands every module its own fp8 metadata back."""
    from xtoken_nemo.models.checkpoint import load_into_model

    src = _model(seed=3, te=True)
    ckpt = _save_converted(src, tmp_path / "ckpt")
    dst = _model(seed=4, te=True)
    load_into_model(dst, ckpt)
    for name, module in _te_modules(dst).items():
        assert torch.equal(module._te_received, _te_modules(src)[name]._te_extra_state), name
    _assert_same(_params(dst), _params(src))


def test_checkpoint_missing_a_weight_is_refused_in_one_line(tmp_path):
    from xtoken_nemo.models import ModelError
    from xtoken_nemo.models.checkpoint import load_into_model

    src = _model(seed=5)
    original = src.sharded_state_dict
    src.sharded_state_dict = lambda *a, **k: {
        n: v for n, v in original(*a, **k).items() if n != "decoder.final_layernorm.weight"
    }
    ckpt = _save_converted(src, tmp_path / "ckpt")
    with pytest.raises(ModelError) as err:
        load_into_model(_model(seed=6, te=True), ckpt)
    message = str(err.value)
    assert "\n" not in message and "decoder.final_layernorm.weight" in message and str(ckpt) in message


# ---- Task 1: training checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("saved_te", [False, True], ids=["local_to_te", "te_to_local"])
def test_training_checkpoint_across_layer_specs(tmp_path, saved_te):
    from xtoken_nemo.distill.run_checkpoints import load_checkpoint, save_checkpoint

    src = _Trainable(seed=7, te=saved_te)
    src.step(0)
    save_checkpoint(tmp_path, 1, src.model, src.optimizer, {"step": 1})
    dst = _Trainable(seed=8, te=not saved_te)
    run_state = load_checkpoint(tmp_path, 1, dst.model, dst.optimizer)
    assert run_state["step"] == 1
    _assert_same(_params(dst.model), _params(src.model))
    _assert_same(dst.adam_state(), src.adam_state())
    src.step(1)  # both continue identically
    dst.step(1)
    _assert_same(_params(dst.model), _params(src.model))


# ---- Task 2: a corrupt or incomplete latest checkpoint ------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """iter_0000001 and iter_0000002 of one tiny run, and the weights/Adam state at iteration 1."""
    from xtoken_nemo.distill.run_checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("two") / "ckpt"
    t = _Trainable(seed=11)
    t.step(0)
    save_checkpoint(root, 1, t.model, t.optimizer, {"step": 1})
    at_1 = (_params(t.model), t.adam_state())
    t.step(1)
    save_checkpoint(root, 2, t.model, t.optimizer, {"step": 2})
    return root, at_1


def _copy(root: Path, dst: Path, only: tuple[int, ...] | None = None) -> Path:
    import shutil

    shutil.copytree(
        root,
        dst,
        ignore=None
        if only is None
        else (lambda d, names: [n for n in names if n.startswith("iter_") and int(n[5:]) not in only]),
    )
    if only is not None:
        (dst / "latest.txt").write_text(f"{max(only)}\n")
    return dst


def _truncate_largest_distcp(ckpt_dir: Path) -> Path:
    target = max(ckpt_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path, caplog):
    from xtoken_nemo.distill.run_checkpoints import resume_latest

    src, (params_1, adam_1) = two_checkpoints
    root = _copy(src, tmp_path / "ckpt")
    _truncate_largest_distcp(root / "iter_0000002")
    t = _Trainable(seed=99)
    with caplog.at_level(logging.WARNING, logger="xtoken_nemo"):
        assert resume_latest(root, t.model, t.optimizer, fallback=True) == (1, {"step": 1})
    _assert_same(_params(t.model), params_1)
    _assert_same(t.adam_state(), adam_1)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "resuming from" in r.getMessage()
    ]
    assert (
        len(errors) == 1
        and str(root / "iter_0000002") in errors[0]
        and "EOFError" in errors[0]
        and "\n" not in errors[0]
    )
    assert warnings == [
        "resuming from iter_0000001 instead of corrupt iter_0000002: 1 steps will be recomputed; "
        f"delete or move {root / 'iter_0000002'}"
    ]


def test_corrupt_latest_without_fallback_is_a_one_line_error(two_checkpoints, tmp_path):
    from xtoken_nemo.distill.run_checkpoints import CheckpointError, resume_latest
    from xtoken_nemo.errors import XTokenError

    root = _copy(two_checkpoints[0], tmp_path / "ckpt")
    _truncate_largest_distcp(root / "iter_0000002")
    t = _Trainable(seed=99)
    with pytest.raises(CheckpointError) as err:
        resume_latest(root, t.model, t.optimizer, fallback=False)
    message = str(err.value)
    assert isinstance(err.value, XTokenError)
    assert "\n" not in message and str(root / "iter_0000002") in message and "fallback_on_corrupt=true" in message


def test_latest_naming_a_missing_directory_falls_back(two_checkpoints, tmp_path, caplog):
    from xtoken_nemo.distill.run_checkpoints import resume_latest

    root = _copy(two_checkpoints[0], tmp_path / "ckpt")
    (root / "latest.txt").write_text("5\n")
    (root / "iter_0000006.partial").mkdir()  # an unfinished save is never a candidate
    t = _Trainable(seed=99)
    with caplog.at_level(logging.WARNING, logger="xtoken_nemo"):
        assert resume_latest(root, t.model, t.optimizer, fallback=True) == (2, {"step": 2})
    assert any(
        "iter_0000005" in r.getMessage() and "FileNotFoundError" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR
    )
    assert any(
        "resuming from iter_0000002 instead of corrupt iter_0000005: 3 steps" in r.getMessage() for r in caplog.records
    )


def test_only_checkpoint_corrupt_and_no_checkpoint(two_checkpoints, tmp_path):
    from xtoken_nemo.distill.run_checkpoints import CheckpointError, resume_latest

    root = _copy(two_checkpoints[0], tmp_path / "ckpt", only=(1,))
    _truncate_largest_distcp(root / "iter_0000001")
    t = _Trainable(seed=99)
    with pytest.raises(CheckpointError) as err:
        resume_latest(root, t.model, t.optimizer, fallback=True)
    assert "\n" not in str(err.value) and str(root / "iter_0000001") in str(err.value)
    assert resume_latest(tmp_path / "empty", t.model, t.optimizer, fallback=True) is None


def test_latest_checkpoint_errors_are_one_line_xtoken_errors(tmp_path):
    """`xtoken export`/`score`/lm-eval find a run's checkpoint with latest_checkpoint: no checkpoint,
    a corrupt latest.txt and one naming a missing directory are CheckpointErrors (an XTokenError,
    printed as one line by the CLI), not FileNotFoundError/RuntimeError tracebacks."""
    from xtoken_nemo.distill.run_checkpoints import CheckpointError, latest_checkpoint
    from xtoken_nemo.errors import XTokenError

    root = tmp_path / "ckpt"
    root.mkdir()
    for latest, expected in ((None, "latest.txt missing"), ("abc", "is corrupt"), ("7", "iter_0000007 is missing")):
        if latest is not None:
            (root / "latest.txt").write_text(latest + "\n")
        with pytest.raises(CheckpointError) as err:
            latest_checkpoint(root)
        assert isinstance(err.value, XTokenError)
        assert expected in str(err.value) and "\n" not in str(err.value)


def _dp2_worker(rank, world_size, root):
    import os
    import threading

    import xtoken_nemo.models.checkpoint as mc
    from xtoken_nemo.distill.run_checkpoints import resume_latest, save_checkpoint

    watchdog = threading.Timer(180, os._exit, args=(17,))  # a hang fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    root = Path(root)
    t = _Trainable(seed=21)
    t.step(0)
    save_checkpoint(root, 1, t.model, t.optimizer, {"step": 1})
    at_1 = _params(t.model)
    t.step(1)
    save_checkpoint(root, 2, t.model, t.optimizer, {"step": 2})

    original = mc.dist_load

    def load_fails_on_rank1(sharded, ckpt_dir, *args, **kwargs):
        state = original(sharded, ckpt_dir, *args, **kwargs)  # every collective of the load runs
        if rank == 1 and Path(ckpt_dir).name == "iter_0000002":
            raise EOFError("simulated: this rank's view of iter_0000002 is cut short")
        return state

    mc.dist_load = load_fails_on_rank1
    fresh = _Trainable(seed=22)
    got = resume_latest(root, fresh.model, fresh.optimizer, fallback=True)
    same = all(torch.equal(a, b) for a, b in zip(_params(fresh.model).values(), at_1.values()))
    torch.distributed.barrier()  # both ranks are still in step
    watchdog.cancel()
    return {"resumed": got, "weights_of_iter_1": same}


def test_ranks_agree_when_the_load_fails_on_one_rank(tmp_path):
    from distributed_utils import run_distributed

    results = run_distributed(_dp2_worker, world_size=2, tp=1, args=(str(tmp_path / "ckpt"),))
    assert [r["resumed"] for r in results] == [(1, {"step": 1})] * 2
    assert all(r["weights_of_iter_1"] for r in results)
