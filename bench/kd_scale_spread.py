"""Measure: how far does the per-micro-batch dynamic ratio sg(L_CE / |L_KD|) stray from the ratio
of the whole global batch, and how much does the global ratio move from one step to the next?
(docs/method.md, "Dynamic KD/CE scaling"; the answer decides ``train.kd_scale_source``, docs/losses.md.)

Set-up (CPU, real tokenizers): a tiny Llama student (llama3 tokenizer, 128k vocab), a tiny Qwen3
teacher (qwen3 tokenizer, P-KL through the real W, alpha 0.7) and a tiny Llama teacher (llama3
tokenizer, KL, alpha 0.3), synthetic text. Random models are near-uniform over 150k tokens and
make every ratio look stable, so the teachers are first trained CE-only for ``--teacher-steps``
steps and the student for ``--student-steps`` (a pre-trained student and better pre-trained
teachers, as in the paper), then the distillation runs ``--steps`` steps of ``--micro``
micro-batches of one ``--seq``-token sequence, with ``kd_scale_source=micro_batch`` (the values
are recorded by wrapping ``xtoken_nemo.distill.kd.distillation_loss``).

Reported, over the steps after the first (``--skip``):
- ``cv_micro``: RMS over steps of the coefficient of variation of the per-micro-batch ratio
  r_i = ce_i / |kd_i| around the step's global ratio R = sum ce_i / sum |kd_i|
  (sqrt(mean_i (r_i - R)^2) / R), i.e. the relative error of using one micro-batch's ratio;
- ``weight_spread``: the same for the effective per-micro-batch weight of the KD gradient
  relative to the global scale, r_i / R (= cv_micro; also its min and max);
- ``step_change``: RMS of |R_t - R_{t-1}| / R_t (the error of using the previous step's ratio),
  split into the sampling noise of two global batches of M micro-batches (sqrt(2 / M) * cv_micro)
  and the rest, the drift of the model between steps;
- the same two for adaptive alphas (``--alpha-mode entropy`` by default; one extra short run):
  per-micro-batch alpha of each teacher against the softmax of the step's mean confidences;
- the ``--seq`` sweep: cv_micro at several sequence lengths, to extrapolate to 4,096 tokens.

Prints a table and one JSON line at the end.

    .venv/bin/python bench/kd_scale_spread.py [--steps 8] [--micro 8] [--seqs 32,64,128]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path


def _setup(work: Path, seq: int, docs: int) -> None:
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    if not (work / "W.safetensors").is_file():
        build_projection_matrix(load_tokenizer("llama3"), load_tokenizer("qwen3"), progress=False).save(
            work / "W.safetensors"
        )
    corpus = work / "docs.jsonl"
    if not corpus.is_file():
        corpus.write_text("\n".join(json.dumps({"text": t}) for t in documents(docs, seed=7, max_sentences=20)))
    out = work / f"data{seq}"
    if not (out / "manifest.json").is_file():
        preprocess(
            PreprocessConfig(
                inputs=[str(corpus)],
                student="llama3",
                teachers=["qwen3", "llama3"],
                out=str(out),
                seq_length=seq,
                progress=False,
            )
        )


def _config(
    work: Path,
    name: str,
    seq: int,
    steps: int,
    micro: int,
    teachers: list,
    lr: float,
    shape: dict,
    student_seed: int = 1,
):
    from xtoken_nemo.distill.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    return DistillConfig(
        name=name,
        student=ModelConfig(tokenizer="llama3", init_seed=student_seed, **shape),
        teachers=teachers,
        data=DataConfig(paths=[str(work / f"data{seq}")], seq_length=seq),
        optim=OptimConfig(lr=lr, warmup_fraction=0.0),
        train=TrainConfig(
            train_steps=steps,
            global_batch_size=micro,
            micro_batch_size=1,
            loss_block_size=seq,
            kd_scaling="ce_only" if not teachers else "dynamic",
            kd_scale_source="micro_batch",
        ),
        checkpoint=CheckpointConfig(dir=str(work / name / "ckpt"), save_interval=10**9, resume=False),
        log_dir=str(work / name / "logs"),
    )


def _pretrain(
    work: Path, seq: int, tokenizer: str, family: str, seed: int, steps: int, micro: int, shape: dict, lr: float
) -> dict:
    """CE-only training of one tiny model; returns its state dict."""
    import torch

    from xtoken_nemo.distill.config import ModelConfig
    from xtoken_nemo.distill.trainer import Trainer

    cfg = _config(work, f"pre_{tokenizer}_{seed}", seq, steps, micro, [], lr, shape)
    cfg.student = ModelConfig(tokenizer=tokenizer, family=family, init_seed=seed, **shape)
    cfg.data.paths = [str(work / f"data{seq}_{tokenizer}")] if tokenizer != "llama3" else cfg.data.paths
    if tokenizer != "llama3":  # a corpus tokenized for this model as the student
        from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess

        out = Path(cfg.data.paths[0])
        if not (out / "manifest.json").is_file():
            preprocess(
                PreprocessConfig(
                    inputs=[str(work / "docs.jsonl")],
                    student=tokenizer,
                    teachers=[tokenizer],
                    out=str(out),
                    seq_length=seq,
                    progress=False,
                )
            )
    trainer = Trainer(cfg, progress=False)
    hist = [trainer.train_step(step) for step in range(steps)]  # no checkpoints
    print(
        f"  pre-trained {tokenizer}/{family} seed {seed}: "
        f"ce {hist[0]['ce']:.2f} -> {hist[-1]['ce']:.2f} in {steps} steps",
        flush=True,
    )
    return {
        k: v.detach().clone()
        for k, v in trainer.student.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _record_run(cfg, teacher_states: list[dict], student_state: dict | None) -> list[list[dict]]:
    """Run the distillation; per step, per micro-batch: ce, |kd|, applied scale, alphas, confidences."""
    import xtoken_nemo.distill.kd as kd
    from xtoken_nemo.distill.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    for model, state in zip(trainer.teachers, teacher_states):
        model.load_state_dict(state, strict=False)
    if student_state is not None:
        trainer.student.load_state_dict(student_state, strict=False)
    steps: list[list[dict]] = []
    real = kd.distillation_loss

    def recording(*a, **k):
        out = real(*a, **k)
        steps[-1].append(
            {
                "ce": float(out.ce.detach()),
                "kd_abs": float(out.kd.detach().abs()),
                "scale": float(out.kd_scale),
                "alphas": {n: float(v) for n, v in out.alphas.items()},
                "conf": {n: float(v) for n, v in out.confidences.items()},
            }
        )
        return out

    kd.distillation_loss = recording
    try:
        for step in range(cfg.train.train_steps):
            steps.append([])
            trainer.train_step(step)
    finally:
        kd.distillation_loss = real
    return steps


def _ratio_stats(steps: list[list[dict]], skip: int) -> dict:
    cvs, rel_min, rel_max, globals_ = [], [], [], []
    for mbs in steps:
        R = sum(m["ce"] for m in mbs) / sum(m["kd_abs"] for m in mbs)
        globals_.append(R)
        r = [m["ce"] / m["kd_abs"] for m in mbs]
        cvs.append(math.sqrt(statistics.fmean([(x - R) ** 2 for x in r])) / R)
        rel_min.append(min(r) / R)
        rel_max.append(max(r) / R)
    changes = [abs(globals_[t] - globals_[t - 1]) / globals_[t] for t in range(max(1, skip), len(globals_))]
    kept = slice(skip, None)
    cv = math.sqrt(statistics.fmean([c * c for c in cvs[kept]]))
    change = math.sqrt(statistics.fmean([c * c for c in changes])) if changes else float("nan")
    # R_t - R_{t-1} = sampling noise of two independent global batches of M micro-batches
    # (sqrt(2 / M) * cv) + the drift of the model between steps: split the change into the two
    sampling = math.sqrt(2.0 / len(steps[0])) * cv
    return {
        "step_change_sampling": sampling,
        "step_change_drift": math.sqrt(max(0.0, change * change - sampling * sampling)) if changes else float("nan"),
        "cv_micro": math.sqrt(statistics.fmean([c * c for c in cvs[kept]])),
        "weight_min": min(rel_min[kept]),
        "weight_max": max(rel_max[kept]),
        "step_change": math.sqrt(statistics.fmean([c * c for c in changes])) if changes else float("nan"),
        "step_change_max": max(changes) if changes else float("nan"),
        "global_ratio": [round(g, 4) for g in globals_],
    }


def _alpha_stats(steps: list[list[dict]], skip: int, temperature: float = 1.0) -> dict:
    names = sorted(steps[0][0]["conf"])
    per_step, glob = [], []
    for mbs in steps:
        means = [statistics.fmean(m["conf"][n] for m in mbs) / temperature for n in names]
        top = max(means)
        w = [math.exp(x - top) for x in means]
        g = {n: wi / sum(w) for n, wi in zip(names, w)}
        glob.append(g)
        per_step.append(max(math.sqrt(statistics.fmean([(m["alphas"][n] - g[n]) ** 2 for m in mbs])) for n in names))
    changes = [max(abs(glob[t][n] - glob[t - 1][n]) for n in names) for t in range(max(1, skip), len(glob))]
    return {
        "alpha_sd_micro": math.sqrt(statistics.fmean([x * x for x in per_step[skip:]])),  # absolute (alphas sum to 1)
        "alpha_step_change": math.sqrt(statistics.fmean([c * c for c in changes])) if changes else float("nan"),
        "global_alphas": [{n: round(v, 4) for n, v in g.items()} for g in glob],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8, help="micro-batches (of one sequence) per step")
    parser.add_argument("--seqs", default="32,64,128", help="sequence lengths; the first of them is the main run")
    parser.add_argument("--skip", type=int, default=1, help="steps left out of the statistics (the first)")
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--student-steps", type=int, default=10)
    parser.add_argument("--pre-lr", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument(
        "--alpha-mode", default="entropy", help="adaptive alphas measured in one extra run; 'none' to skip"
    )
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from xtoken_nemo.distill.config import ModelConfig, TeacherConfig

    shape = dict(num_layers=1, hidden_size=args.hidden, num_attention_heads=2)
    work = Path(args.work or tempfile.mkdtemp(prefix="xtoken-kd-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    seqs = [int(s) for s in args.seqs.split(",")]
    results = {
        "steps": args.steps,
        "micro": args.micro,
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "by_seq": {},
    }
    pre_seq = seqs[0]
    for seq in seqs:
        _setup(work, seq, docs=400)
    print(f"pre-training on {pre_seq}-token windows (CE only)", flush=True)
    qwen_state = _pretrain(work, pre_seq, "qwen3", "qwen3", 21, args.teacher_steps, 8, shape, args.pre_lr)
    llama_state = _pretrain(work, pre_seq, "llama3", "llama", 22, args.teacher_steps, 8, shape, args.pre_lr)
    student_state = (
        _pretrain(work, pre_seq, "llama3", "llama", 1, args.student_steps, 8, shape, args.pre_lr)
        if args.student_steps
        else None
    )

    def teachers():
        return [
            TeacherConfig(
                name="qwen3",
                model=ModelConfig(tokenizer="qwen3", family="qwen3", init_seed=21, **shape),
                mode="pkl",
                alpha=0.7,
                projection=str(work / "W.safetensors"),
            ),
            TeacherConfig(
                name="llama", model=ModelConfig(tokenizer="llama3", init_seed=22, **shape), mode="kl", alpha=0.3
            ),
        ]

    for seq in seqs:
        cfg = _config(work, f"kd{seq}", seq, args.steps, args.micro, teachers(), args.lr, shape)
        stats = _ratio_stats(_record_run(cfg, [qwen_state, llama_state], student_state), args.skip)
        results["by_seq"][seq] = stats
        print(
            f"seq {seq:4d}: cv of the micro-batch ratio around the step's {stats['cv_micro']:.4f} "
            f"(r_i/R in [{stats['weight_min']:.3f}, {stats['weight_max']:.3f}]); step-to-step change of R "
            f"{stats['step_change']:.4f} (max {stats['step_change_max']:.4f}; "
            f"sampling part {stats['step_change_sampling']:.4f}, "
            f"drift part {stats['step_change_drift']:.4f}); R = {stats['global_ratio']}",
            flush=True,
        )
    if args.alpha_mode != "none":
        cfg = _config(work, "alphas", seqs[0], args.steps, args.micro, teachers(), args.lr, shape)
        cfg.train.alpha_mode = args.alpha_mode
        steps = _record_run(cfg, [qwen_state, llama_state], student_state)
        a = _alpha_stats(steps, args.skip)
        a.update({f"ratio_{k}": v for k, v in _ratio_stats(steps, args.skip).items() if k != "global_ratio"})
        results["alphas"] = {"mode": args.alpha_mode, "seq": seqs[0], **a}
        print(
            f"alphas ({args.alpha_mode}, seq {seqs[0]}): "
            f"sd of the micro-batch alphas around the step's {a['alpha_sd_micro']:.4f}, "
            f"step-to-step change {a['alpha_step_change']:.4f}; global alphas {a['global_alphas'][-3:]}",
            flush=True,
        )
    # extrapolation: cv ~ tokens^-p fitted on the sweep
    pts = [
        (math.log(s), math.log(results["by_seq"][s]["cv_micro"])) for s in seqs if results["by_seq"][s]["cv_micro"] > 0
    ]
    if len(pts) >= 2:
        mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        results["cv_fit_exponent"] = slope
        results["cv_at_4096_extrapolated"] = math.exp(my + slope * (math.log(4096) - mx))
        print(
            f"cv ~ seq^{slope:.2f}: extrapolated to one 4,096-token micro-batch: "
            f"{results['cv_at_4096_extrapolated']:.4f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
