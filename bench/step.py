"""Benchmark: time per training step on CPU, CE-only vs distillation with one and two teachers,
side by side on the same tiny models and data, and how the distillation step splits.

Student: tiny Llama (llama3 tokenizer, 128,256 vocab). Teachers: a tiny Qwen3 (qwen3 tokenizer,
P-KL through the real W) and a tiny Llama with the student's tokenizer (token-level KL). Split:
teacher forward (timed around each teacher call), KD loss forward+backward (the step minus the
CE-only step minus the teacher forwards), student forward/backward + CE + optimizer (the CE-only
step). Prints one JSON line at the end.

    .venv/bin/python bench/step.py [--steps 4] [--seq 128] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    args = parser.parse_args()

    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents
    from xtoken_nemo.distill.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        ModelConfig,
        OptimConfig,
        TeacherConfig,
        TrainConfig,
    )
    from xtoken_nemo.distill.trainer import Trainer
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    work = Path(tempfile.mkdtemp(prefix="xtoken-bench-step-"))
    docs = work / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in documents(200, seed=2)))
    preprocess(
        PreprocessConfig(
            inputs=[str(docs)],
            student="llama3",
            teachers=["qwen3", "llama3"],
            out=str(work / "data"),
            seq_length=args.seq,
            progress=False,
        )
    )
    W = work / "W.safetensors"
    build_projection_matrix(load_tokenizer("llama3"), load_tokenizer("qwen3"), progress=False).save(W)

    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4)
    qwen = TeacherConfig(
        name="qwen3",
        model=ModelConfig(tokenizer="qwen3", family="qwen3", init_seed=2, **shape),
        mode="pkl",
        alpha=0.8,
        projection=str(W),
    )
    llama = TeacherConfig(
        name="llama3", model=ModelConfig(tokenizer="llama3", init_seed=3, **shape), mode="kl", alpha=0.2
    )
    runs = {"ce_only": [], "one_teacher": [qwen], "two_teachers": [qwen, llama]}
    results = {}
    for name, teachers in runs.items():
        if name == "one_teacher":
            teachers = [TeacherConfig(**{**qwen.__dict__, "alpha": 1.0})]
        cfg = DistillConfig(
            name=name,
            student=ModelConfig(tokenizer="llama3", **shape),
            teachers=teachers,
            data=DataConfig(paths=[str(work / "data")], seq_length=args.seq),
            optim=OptimConfig(lr=1e-4),
            train=TrainConfig(
                train_steps=args.steps + 1,
                global_batch_size=2 * args.micro,
                micro_batch_size=args.micro,
                kd_scaling="ce_only" if not teachers else "dynamic",
            ),
            checkpoint=CheckpointConfig(dir=str(work / name / "ckpt"), save_interval=10**9, resume=False),
            log_dir=str(work / name / "logs"),
        )
        trainer = Trainer(cfg, progress=False)
        teacher_time = {"s": 0.0}
        for teacher in trainer.teachers:
            forward = teacher.forward

            def timed(*a, _forward=forward, _teacher_time=teacher_time, **k):
                t0 = time.perf_counter()
                out = _forward(*a, **k)
                _teacher_time["s"] += time.perf_counter() - t0
                return out

            teacher.forward = timed
        step_times, teacher_times = [], []
        for step in range(args.steps + 1):
            teacher_time["s"] = 0.0
            t0 = time.perf_counter()
            trainer.train_step(step)
            if step > 0:  # the first step warms up allocators and caches
                step_times.append(time.perf_counter() - t0)
                teacher_times.append(teacher_time["s"])
        results[name] = {"step_s": statistics.median(step_times), "teacher_forward_s": statistics.median(teacher_times)}
        print(
            f"{name:<13} {results[name]['step_s']:.3f} s/step "
            f"(teacher forwards {results[name]['teacher_forward_s']:.3f} s)"
        )

    base = results["ce_only"]["step_s"]
    for name in ("one_teacher", "two_teachers"):
        r = results[name]
        loss_s = max(0.0, r["step_s"] - base - r["teacher_forward_s"])
        r.update(
            overhead_vs_ce=round(r["step_s"] / base, 3),
            split={
                "student_fwd_bwd_ce_optim": round(base / r["step_s"], 3),
                "teacher_forward": round(r["teacher_forward_s"] / r["step_s"], 3),
                "kd_loss": round(loss_s / r["step_s"], 3),
            },
        )
        print(
            f"{name:<13} {r['overhead_vs_ce']:.2f}x the CE-only step; "
            f"share of the step: student {r['split']['student_fwd_bwd_ce_optim']:.0%}, "
            f"teacher forward {r['split']['teacher_forward']:.0%}, KD loss {r['split']['kd_loss']:.0%}"
        )
    print(
        json.dumps(
            {
                "bench": "step",
                "seq": args.seq,
                "hidden": args.hidden,
                "layers": args.layers,
                "micro_batch": args.micro,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
