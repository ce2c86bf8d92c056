"""Random model builds are reproducible from their init seed, also with megatron's GPU-style init.

On CUDA, megatron-core initializes weights with ``use_cpu_initialization`` off: the draws come from
the model-parallel CUDA RNG tracker's stored generator states (``get_cuda_rng_tracker().fork()``),
which ``torch.manual_seed`` does not reset. The CPU shims keep those semantics (the tracker holds
its own states; fork swaps them into the generator and back), so building with
``use_cpu_initialization=False`` inside the CUDA->CPU redirect reproduces the CUDA behaviour here:
between two builds, the tracker is advanced by the first build and by a dropout drawn under it, as
in one process that trains and then resumes, or builds one student per seed.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu
from xtoken_nemo.distill.config import ModelConfig
from xtoken_nemo.distill.model_setup import build_model, hf_config_for
from xtoken_nemo.models.build import build_gpt_model
from xtoken_nemo.models.config import arch_from_hf_config
from xtoken_nemo.models.runtime import ensure_model_parallel

VOCAB = 256
SHAPE = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64)


def _mc(seed: int = 7) -> ModelConfig:
    return ModelConfig(family="llama", init_seed=seed, **SHAPE)


def _arch():
    return arch_from_hf_config(hf_config_for(_mc(), VOCAB))


def _params(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _gpu_style_build(init_seed: int | None, tp: int = 1) -> dict[str, torch.Tensor]:
    """Weights of a build that draws like CUDA does (from the tracker), run on CPU."""
    arch = _arch()
    with cuda_to_cpu():  # megatron allocates these weights with device=torch.cuda.current_device()
        model = build_gpt_model(
            arch, arch.padded_vocab_size(tp), tp=tp, use_te=False, init_seed=init_seed, use_cpu_initialization=False
        )
    return _params(model)


def _advance_tracker() -> None:
    """What a training step with dropout does to the tracker between two builds."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name

    tracker = get_cuda_rng_tracker()
    for name in ("model-parallel-rng", get_data_parallel_rng_tracker_name()):
        with tracker.fork(name):
            torch.nn.functional.dropout(torch.ones(4096), p=0.5, training=True)


def _tracker_states() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    ensure_model_parallel(1)


def test_gpu_style_draws_come_from_the_tracker():
    """The emulation is faithful: torch.manual_seed alone does not repeat a GPU-style build (the
    failure on CUDA); the CPU-initialized build it does repeat."""
    torch.manual_seed(7)
    first = _gpu_style_build(None)
    _advance_tracker()
    torch.manual_seed(7)
    second = _gpu_style_build(None)
    assert "embedding.word_embeddings.weight" in _equal(first, second)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in _equal(first, second)


def test_same_init_seed_same_weights_after_the_tracker_moved():
    first = _gpu_style_build(7)
    _advance_tracker()
    second = _gpu_style_build(7)
    assert _equal(first, second) == []


def test_different_init_seeds_differ():
    a, b = _gpu_style_build(7), _gpu_style_build(8)
    differ = _equal(a, b)
    # every randomly initialized matrix differs (the norms are ones in both)
    assert {k for k in a if k.endswith(("word_embeddings.weight", "linear_qkv.weight", "linear_fc2.weight"))} <= set(
        differ
    )


def test_cpu_initialization_unchanged():
    """With use_cpu_initialization (every CPU run) the weights and the CPU generator afterwards are
    those of the plain ``torch.manual_seed(seed)`` protocol used before: the CPU numbers stand."""
    arch = _arch()
    torch.manual_seed(11)
    before = _params(build_gpt_model(arch, VOCAB, tp=1, use_te=False))
    cpu_rng_before = torch.get_rng_state()
    _advance_tracker()
    after = _params(build_gpt_model(arch, VOCAB, tp=1, use_te=False, init_seed=11))
    assert _equal(before, after) == []
    assert torch.equal(torch.get_rng_state(), cpu_rng_before)


def test_run_models_seed_the_tracker_from_init_seed(tmp_path):
    """model_setup's random builds (the run's student and teachers, save_random_checkpoint) leave
    the tracker seeded from init_seed whatever it held before: on CUDA the weights are drawn from it
    (on CPU the build draws from the CPU generator and leaves it as seeded)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from xtoken_nemo.distill.model_setup import save_random_checkpoint

    seen = []
    for perturb in (3, 5):
        model_parallel_cuda_manual_seed(perturb)
        _advance_tracker()
        build_model(_mc(7), VOCAB, tp=1, params_dtype=torch.float32, trainable=False)
        seen.append(_tracker_states())
    model_parallel_cuda_manual_seed(9)
    save_random_checkpoint(_mc(7), VOCAB, str(tmp_path / "ckpt"), pad_for_tp=1)
    seen.append(_tracker_states())
    assert _equal(seen[0], seen[1]) == []
    assert _equal(seen[0], seen[2]) == []


def test_init_method_std_sets_the_random_weights_std(tmp_path):
    """ModelConfig.init_method_std reaches megatron's init (the demo's students use 0.08): the run's
    random build and save_random_checkpoint draw the matrices with that std; 0.02 by default."""
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint

    ensure_model_parallel(1)
    stds = {}
    for std in (0.02, 0.08):
        mc = ModelConfig(family="llama", init_seed=7, init_method_std=std, **SHAPE)
        model, _, _ = build_model(mc, VOCAB, tp=1, params_dtype=torch.float32, trainable=False)
        fc1 = dict(model.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
        save_random_checkpoint(mc, VOCAB, str(tmp_path / f"std{std}"), pad_for_tp=1)
        saved, _, _ = load_mcore_checkpoint(str(tmp_path / f"std{std}"), params_dtype=torch.float32, tp=1)
        stds[std] = (
            fc1.std().item(),
            dict(saved.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"].std().item(),
        )
    for std, (built, saved) in stds.items():
        assert abs(built / std - 1) < 0.1 and abs(saved / std - 1) < 0.1, (std, built, saved)
    assert ModelConfig().init_method_std == 0.02


def test_a_random_model_needs_a_positive_init_std():
    from xtoken_nemo.distill.config import CheckpointConfig, ConfigError, DataConfig, DistillConfig

    cfg = DistillConfig(
        student=ModelConfig(init_method_std=0.0), data=DataConfig(paths=["d"]), checkpoint=CheckpointConfig()
    )
    with pytest.raises(ConfigError, match="student: init_method_std=0.0 must be > 0"):
        cfg.validate()
    cfg.student.checkpoint = "some/checkpoint"  # a loaded model's weights are not drawn: not checked
    cfg.validate()


# ----------------------------------------------------------------------------------------------
# TP=2: each rank's shard repeats, and the ranks draw from different streams (seed + tp_rank)
# ----------------------------------------------------------------------------------------------
def _tp2_worker(rank: int, world_size: int) -> dict:
    first = _gpu_style_build(7, tp=2)
    _advance_tracker()
    second = _gpu_style_build(7, tp=2)
    other = _gpu_style_build(8, tp=2)
    return {"repeat_differs": _equal(first, second), "seed_differs": _equal(first, other), "first": first}


def test_tp2_same_seed_same_shards():
    r0, r1 = run_distributed(_tp2_worker, world_size=2, tp=2)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    for r in (r0, r1):
        assert r["repeat_differs"] == []
        assert fc1 in r["seed_differs"]
    # column-parallel shards come from each rank's own stream, not one stream repeated
    assert not torch.equal(r0["first"][fc1], r1["first"][fc1])
    assert torch.equal(r0["first"]["decoder.final_layernorm.weight"], r1["first"]["decoder.final_layernorm.weight"])
