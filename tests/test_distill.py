"""The distillation model and training loop on megatron-core (CPU, gloo).

Fast runs use two real SentencePiece tokenizers trained here (small vocabularies: a cross-
tokenizer pair with a real W); the exact-resume run uses the real Llama-3.2 and Qwen3 tokenizers.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

from xtoken_nemo.distill.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
)

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2)


@pytest.fixture(scope="module")
def sp_pair(tmp_path_factory):
    """Two different SentencePiece tokenizers (student BPE 800, teacher unigram 600), a
    preprocessed corpus for them, and W between them."""
    import sentencepiece as spm

    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    root = tmp_path_factory.mktemp("sp_pair")
    docs = documents(80, seed=3)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    paths = {}
    for name, size, kind in (("student", 800, "bpe"), ("teacher", 600, "unigram")):
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(root / name),
            vocab_size=size,
            model_type=kind,
            byte_fallback=True,
            character_coverage=0.995,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=3,
            minloglevel=2,
        )
        paths[name] = str(root / f"{name}.model")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in docs))
    data = root / "data"
    preprocess(
        PreprocessConfig(
            inputs=[str(jsonl)],
            student=paths["student"],
            teachers=[paths["teacher"], paths["student"]],
            out=str(data),
            seq_length=32,
            progress=False,
        )
    )
    # a handful of windows: a global batch can hold all of them, so every step sees the same text
    small_jsonl = root / "small.jsonl"
    small_jsonl.write_text("\n".join(json.dumps({"text": t}) for t in documents(4, seed=9, max_sentences=3)))
    preprocess(
        PreprocessConfig(
            inputs=[str(small_jsonl)],
            student=paths["student"],
            teachers=[paths["teacher"], paths["student"]],
            out=str(root / "small"),
            seq_length=32,
            progress=False,
        )
    )
    W = build_projection_matrix(load_tokenizer(paths["student"]), load_tokenizer(paths["teacher"]), progress=False)
    W.save(root / "W.safetensors")
    # random models written once as checkpoints: the same weights at TP=1 and TP=2
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel

    ensure_model_parallel(1)
    ckpts = {}
    for role, tok_path, family, seed in (
        ("student", paths["student"], "llama", 10),
        ("cross", paths["teacher"], "qwen3", 11),
        ("same", paths["student"], "llama", 12),
    ):
        mc = ModelConfig(tokenizer=tok_path, family=family, init_seed=seed, **TINY)
        ckpts[role] = save_random_checkpoint(
            mc, load_tokenizer(tok_path).vocab_size, str(root / f"init_{role}"), pad_for_tp=2
        )
    return {
        "ckpt": ckpts,
        "student": paths["student"],
        "teacher": paths["teacher"],
        "data": str(data),
        "small": str(root / "small"),
        "W": str(root / "W.safetensors"),
        "root": root,
    }


def sp_config(
    pair, run_dir: Path, mode: str = "pkl", steps: int = 3, tp: int = 1, same_tok_teacher: bool = True
) -> DistillConfig:
    teachers = [
        TeacherConfig(
            name="cross",
            model=ModelConfig(tokenizer=pair["teacher"], family="qwen3", checkpoint=pair["ckpt"]["cross"], **TINY),
            mode=mode,
            alpha=0.7 if same_tok_teacher else 1.0,
            projection=pair["W"],
        )
    ]
    if same_tok_teacher:
        teachers.append(
            TeacherConfig(
                name="same",
                model=ModelConfig(tokenizer=pair["student"], checkpoint=pair["ckpt"]["same"], **TINY),
                mode="kl",
                alpha=0.3,
            )
        )
    return DistillConfig(
        name=f"sp-{mode}",
        student=ModelConfig(tokenizer=pair["student"], checkpoint=pair["ckpt"]["student"], **TINY),
        teachers=teachers,
        data=DataConfig(paths=[pair["data"]], seq_length=32),
        optim=OptimConfig(lr=3e-3, warmup_fraction=0.0),
        train=TrainConfig(
            train_steps=steps, global_batch_size=4, micro_batch_size=2, tensor_parallel=tp, loss_block_size=16
        ),
        checkpoint=CheckpointConfig(dir=str(run_dir / "ckpt"), save_interval=100),
        log_dir=str(run_dir / "logs"),
    )


def _run(cfg: DistillConfig, **kw):
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.run(**kw)


def _params(model) -> dict:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


@pytest.mark.parametrize("mode", ["pkl", "hkl", "gold", "uld"])
def test_every_mode_trains_and_teachers_stay_frozen(sp_pair, tmp_path, mode):
    from xtoken_nemo.data.dataset import DistillDataset

    cfg = sp_config(sp_pair, tmp_path, mode=mode, steps=6)
    # every step trains on the same few windows, so the losses of successive steps are comparable
    cfg.data.paths = [sp_pair["small"]]
    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = len(DistillDataset(sp_pair["small"], seq_length=32))
    assert 2 <= cfg.train.global_batch_size <= 16
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    before = [_params(t) for t in trainer.teachers]
    out = trainer.run()
    hist = out["history"]
    assert out["status"] == "completed" and len(hist) == 6
    assert all(h["skipped"] == 0 and h["kd/cross"] > 0 for h in hist)
    # the student learns: the total and the cross-tokenizer KD loss go down over the run
    print(mode, [(round(h["total"], 3), round(h["kd/cross"], 3), round(h["ce"], 3)) for h in hist])
    assert hist[-1]["total"] < hist[0]["total"]
    assert hist[-1]["kd/cross"] < hist[0]["kd/cross"]
    for teacher, params in zip(trainer.teachers, before):
        assert all(p.grad is None for p in teacher.parameters())
        after = _params(teacher)
        assert all(torch.equal(params[k], after[k]) for k in params)
    assert Path(cfg.checkpoint.dir, "latest.txt").read_text().strip() == "6"


def _tp2_worker(rank, world_size, pair, run_dir):
    run_dir = Path(run_dir)
    # a 3-step run preempted after step 2 at TP=2 (its checkpoint is loaded at TP=1 below)
    out = _run_until(sp_config(pair, run_dir, mode="pkl", steps=3, tp=2), stop_after=2)
    # resharding: continue the TP=1 run's step-2 checkpoint at TP=2
    cfg = sp_config(pair, run_dir, mode="pkl", steps=3, tp=2)
    cfg.checkpoint.dir = str(run_dir / "tp1_ckpt")
    _, resumed = _run(cfg)
    # data parallelism: the same two processes as TP=1 x DP=2, global batch 4 of micro-batches of 1
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    cfg = sp_config(pair, run_dir / "dp2", mode="pkl", steps=2, tp=1)
    cfg.train.micro_batch_size = 1
    _, dp2 = _run(cfg)
    return {"history": out["history"], "resumed": resumed["history"], "dp2": dp2["history"]}


def test_tp2_and_dp2_equal_tp1_and_checkpoints_reshard(sp_pair, tmp_path):
    _, full = _run(sp_config(sp_pair, tmp_path / "full", mode="pkl", steps=3))
    at_tp1 = sp_config(sp_pair, tmp_path, mode="pkl", steps=3)
    at_tp1.checkpoint.dir = str(tmp_path / "tp2run" / "tp1_ckpt")
    _run_until(at_tp1, stop_after=2)

    res0, res1 = run_distributed(_tp2_worker, world_size=2, tp=2, args=(sp_pair, str(tmp_path / "tp2run")))
    for key in ("total", "ce", "kd/cross", "kd/same", "grad_norm"):
        tp2 = [h[key] for h in res0["history"]]
        assert tp2 == pytest.approx([h[key] for h in res1["history"]], rel=1e-6), key  # replicated metrics
        assert tp2 == pytest.approx([h[key] for h in full["history"][:2]], rel=1e-4), key  # TP=2 == TP=1
        # a TP=1 checkpoint continued at TP=2 gives step 3 of the uninterrupted TP=1 run
        assert res0["resumed"][0][key] == pytest.approx(full["history"][2][key], rel=1e-4), key
    assert [h["step"] for h in res0["resumed"]] == [3]
    # TP=1 x DP=2 (each rank 2 micro-batches of 1) equals one process with 4 micro-batches of 1
    single = sp_config(sp_pair, tmp_path / "single", mode="pkl", steps=2)
    single.train.micro_batch_size = 1
    _, one = _run(single)
    for key in ("total", "ce", "kd/cross", "grad_norm"):
        assert [h[key] for h in res0["dp2"]] == pytest.approx([h[key] for h in one["history"]], rel=1e-5), key
        assert [h[key] for h in res1["dp2"]] == pytest.approx([h[key] for h in one["history"]], rel=1e-5), key
    # and the reverse: the TP=2 checkpoint of step 2 continued at TP=1
    _, cont = _run(sp_config(sp_pair, tmp_path / "tp2run", mode="pkl", steps=3))
    assert [h["step"] for h in cont["history"]] == [3]
    for key in ("total", "ce", "kd/cross", "grad_norm"):
        assert cont["history"][0][key] == pytest.approx(full["history"][2][key], rel=1e-4), key


def _run_until(cfg: DistillConfig, stop_after: int):
    """Run, sending ourselves SIGUSR1 (SLURM's preemption warning) during step ``stop_after``."""
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    read_step = trainer.batches.iterator

    def batches_and_signal(step):  # the signal arrives while step ``stop_after`` runs
        if step + 1 == stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return read_step(step)

    trainer.batches.iterator = batches_and_signal
    return trainer.run()


def test_exact_resume_after_preemption_on_real_tokenizers(tmp_path):
    """llama3 student, qwen3 P-KL teacher: interrupted at step 2 by SIGUSR1 and resumed, steps 3-4
    equal those of an uninterrupted run (fp32, CPU)."""

    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in documents(30, seed=5)))
    preprocess(
        PreprocessConfig(
            inputs=[str(docs)],
            student="llama3",
            teachers=["qwen3"],
            out=str(tmp_path / "data"),
            seq_length=24,
            progress=False,
        )
    )
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    build_projection_matrix(load_tokenizer("llama3"), load_tokenizer("qwen3"), progress=False).save(
        tmp_path / "W.safetensors"
    )

    def cfg(run: str) -> DistillConfig:
        return DistillConfig(
            name=run,
            student=ModelConfig(tokenizer="llama3", **TINY),
            teachers=[
                TeacherConfig(
                    name="qwen",
                    model=ModelConfig(tokenizer="qwen3", family="qwen3", **TINY),
                    mode="pkl",
                    alpha=1.0,
                    projection=str(tmp_path / "W.safetensors"),
                )
            ],
            data=DataConfig(paths=[str(tmp_path / "data")], seq_length=24),
            optim=OptimConfig(lr=1e-3, warmup_fraction=0.25),
            train=TrainConfig(train_steps=4, global_batch_size=2, micro_batch_size=1, loss_block_size=24),
            checkpoint=CheckpointConfig(dir=str(tmp_path / run / "ckpt"), save_interval=100),
            log_dir=str(tmp_path / run / "logs"),
        )

    _, straight = _run(cfg("straight"))
    interrupted = _run_until(cfg("resumed"), stop_after=2)
    assert interrupted["status"] == "preempted" and interrupted["step"] == 2
    assert Path(tmp_path / "resumed" / "ckpt" / "latest.txt").read_text().strip() == "2"
    _, resumed = _run(cfg("resumed"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for key in ("total", "ce", "kd", "grad_norm", "lr"):
        assert [h[key] for h in resumed["history"]] == pytest.approx(
            [h[key] for h in straight["history"][2:]], rel=1e-6, abs=1e-9
        ), key
    # TensorBoard event files were written
    assert list(Path(tmp_path / "straight" / "logs").glob("events.out.tfevents.*"))


def test_crash_during_save_keeps_the_previous_checkpoint(sp_pair, tmp_path, monkeypatch):
    cfg = sp_config(sp_pair, tmp_path, steps=2, same_tok_teacher=False)
    cfg.checkpoint.save_interval = 1
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    import megatron.core.dist_checkpointing as dc

    calls = {"n": 0}
    original = dc.save

    def failing_save(state, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            original(state, path, *a, **k)
            raise OSError("disk full (simulated crash while saving step 2)")
        return original(state, path, *a, **k)

    monkeypatch.setattr(dc, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.run()
    root = Path(cfg.checkpoint.dir)
    assert (root / "latest.txt").read_text().strip() == "1"
    assert (root / "iter_0000002.partial").exists() and not (root / "iter_0000002").exists()
    monkeypatch.setattr(dc, "save", original)
    _, out = _run(sp_config(sp_pair, tmp_path, steps=2, same_tok_teacher=False))
    assert [h["step"] for h in out["history"]] == [2]
    assert not (root / "iter_0000002.partial").exists() and (root / "latest.txt").read_text().strip() == "2"


def test_nonfinite_steps_are_skipped_then_stop(sp_pair, tmp_path):
    from xtoken_nemo.distill.trainer import Trainer, TrainingError

    cfg = sp_config(sp_pair, tmp_path, steps=4, same_tok_teacher=False)
    cfg.train.max_consecutive_nonfinite = 2
    trainer = Trainer(cfg, progress=False)
    teacher = trainer.teachers[0]
    real_forward = teacher.forward
    poisoned = {"steps": {1}}  # 0-based global step whose teacher logits are NaN
    current = {"step": 0}
    step_fn = trainer.train_step

    def tracking_step(step):
        current["step"] = step
        return step_fn(step)

    def nan_forward(*a, **k):
        out = real_forward(*a, **k)
        return out * float("nan") if current["step"] in poisoned["steps"] else out

    teacher.forward = nan_forward
    trainer.train_step = tracking_step
    out = trainer.run()
    assert [h["skipped"] for h in out["history"]] == [0.0, 1.0, 0.0, 0.0]
    assert out["skipped_steps"] == 1

    cfg2 = sp_config(sp_pair, tmp_path / "always", steps=4, same_tok_teacher=False)
    cfg2.train.max_consecutive_nonfinite = 2
    trainer2 = Trainer(cfg2, progress=False)
    real2 = trainer2.teachers[0].forward
    trainer2.teachers[0].forward = lambda *a, **k: real2(*a, **k) * float("nan")
    with pytest.raises(TrainingError, match="2 steps in a row had NaN/inf"):
        trainer2.run()


def test_config_validation_and_overrides(sp_pair, tmp_path):
    cfg = sp_config(sp_pair, tmp_path)
    apply_overrides(
        cfg,
        [
            "train.train_steps=7",
            "teachers.0.alpha=0.6",
            "teachers.1.alpha=0.4",
            "optim.lr=1e-4",
            "data.weights=[1.0]",
            "checkpoint.resume=false",
        ],
    )
    assert cfg.train.train_steps == 7 and cfg.teachers[0].alpha == 0.6 and cfg.optim.lr == 1e-4
    assert cfg.data.weights == [1.0] and cfg.checkpoint.resume is False
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="no field 'stepz'"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["train.train_steps=many"])
    bad = sp_config(sp_pair, tmp_path)
    bad.train.global_batch_size = 5
    with pytest.raises(ConfigError, match="global_batch_size=5 must be divisible"):
        bad.validate(world_size=1)
    bad = sp_config(sp_pair, tmp_path)
    bad.teachers[0].projection = None
    with pytest.raises(ConfigError, match="needs teachers.0.projection"):
        bad.validate()
    bad = sp_config(sp_pair, tmp_path)
    bad.teachers[0].alpha = 0.9
    with pytest.raises(ConfigError, match="must sum to 1"):
        bad.validate()


def test_bf16_mixed_precision_trains_and_checkpoints(sp_pair, tmp_path):
    """The GPU setting (bf16 weights, fp32 master weights in megatron's optimizer), run on CPU."""
    cfg = sp_config(sp_pair, tmp_path, mode="pkl", steps=2)
    cfg.train.precision = "bf16"
    trainer, out = _run(cfg)
    assert all(p.dtype == torch.bfloat16 for p in trainer.student.parameters())
    _, ref = _run(sp_config(sp_pair, tmp_path / "fp32", mode="pkl", steps=2))
    for got, want in zip(out["history"], ref["history"]):
        assert got["total"] == pytest.approx(want["total"], rel=1e-2)
    assert Path(cfg.checkpoint.dir, "latest.txt").read_text().strip() == "2"


def test_every_kd_mode_has_its_loss_in_the_registry_and_kl_needs_the_students_tokenizer():
    from types import SimpleNamespace

    from xtoken_nemo.distill.config import KD_MODES, ConfigError, KDMode, TeacherConfig
    from xtoken_nemo.distill.teacher_loss import MODE_LOSSES, build_teacher_spec

    assert set(MODE_LOSSES) == set(KDMode) and KD_MODES == tuple(m.value for m in KDMode)
    assert [m.value for m in KDMode if m.needs_projection] == ["pkl", "hkl", "jkl"]
    assert [m.value for m in KDMode if m.needs_support] == ["jkl"]
    with pytest.raises(ConfigError, match=r"teachers.0 \(t\).mode=jkl needs teachers.0.support"):
        tc = TeacherConfig(name="t", mode="jkl", projection="W.safetensors")
        cfg = DistillConfig(teachers=[tc], data=DataConfig(paths=["data"]))
        cfg.validate(world_size=1)
    student = SimpleNamespace(name="a", fingerprint="fa", vocab_size=10)
    other = SimpleNamespace(name="b", fingerprint="fb", vocab_size=12)
    with pytest.raises(ConfigError, match="has mode kl but tokenizer b differs"):
        build_teacher_spec(TeacherConfig(name="t", mode="kl"), student, other, 10, 12)
    spec = build_teacher_spec(TeacherConfig(name="t", mode="uld"), student, other, 10, 12)
    assert spec.vocab_size == 12 and spec.W is None and spec.projection is None and spec.common_pairs is None
