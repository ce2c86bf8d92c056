"""Benchmark: time per training step of each demo student configuration, for other student shapes,
side by side, from a finished `xtoken demo` directory.

What the demo's time waits for (docs/demo.md, "Cost of the demo"): 45 runs of 300 steps, each
step the student forward and backward, the KD loss and the optimizer. This script answers "how much
would a smaller student save per step?" without training a whole demo: for each configuration of
the demo (its `runs/<name>-s<seed>/config.json`: data, teachers, losses, optimizer) and each
student shape (layers x FFN width), it builds a random student of that shape, trains `--warmup`
steps (the teacher cache fills, as in a demo worker), then times `--steps` steps. The
configurations and shapes take turns inside each of `--reps` rounds, so a change of the machine's
speed (a shared VM's host load moved a CE step by 30% within half an hour here) lands on all of
them alike; the spread over rounds is printed beside the median.

One process, one thread, the demo's pinned kernels (`xtoken_nemo.demo.numerics`): one worker of
the demo. The last line is one JSON object with every figure.

    .venv/bin/python bench/demo_steps.py --demo demo_out [--shapes 2x0,1x0,2x128,1x128]
        [--runs ce-only,qwen3-pkl,...] [--seed 1] [--steps 40] [--warmup 25] [--reps 2]

A shape "LxF" is L layers with FFN width F (0: megatron's default, 4 x hidden); hidden size and heads
are the demo's (`demo_config.json`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_shape(text: str) -> tuple[int, int | None]:
    """'2x128' -> (2, 128); '1x0' -> (1, None): megatron's default FFN width."""
    layers, _, ffn = text.partition("x")
    if not layers.isdigit() or not ffn.isdigit() or int(layers) < 1:
        raise SystemExit(f"--shapes: {text!r} is not LAYERSxFFN (e.g. 2x0, 1x128)")
    return int(layers), int(ffn) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="a finished `xtoken demo --out` directory")
    parser.add_argument("--shapes", default="2x0,1x0,2x128,1x128")
    parser.add_argument("--runs", default=None, help="configurations (default: every run of the demo's seed)")
    parser.add_argument("--seed", type=int, default=1, help="whose run configs to time")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    from xtoken_nemo.demo.numerics import cpu_description, pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads, as `xtoken demo` does
    import torch

    torch.set_num_threads(1)
    from xtoken_nemo.distill.config import ModelConfig, config_from_dict
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.distill.teacher_cache import TeacherLogitsCache
    from xtoken_nemo.distill.trainer import Trainer
    from xtoken_nemo.models.runtime import ensure_model_parallel
    from xtoken_nemo.tokenizers import load_tokenizer

    demo = Path(args.demo)
    config_path = demo / "demo_config.json"
    if not config_path.exists():
        raise SystemExit(f"{demo} holds no finished demo ({config_path} missing); run `xtoken demo --out {demo}` first")
    demo_cfg = json.loads(config_path.read_text())
    suffix = f"-s{args.seed}"
    names = (
        args.runs.split(",")
        if args.runs
        else sorted(
            p.name[: -len(suffix)]
            for p in (demo / "runs").glob(f"*{suffix}")
            if not p.name.startswith(("student-init", "teacher-"))
        )
    )
    configs = {}
    for name in names:
        path = demo / "runs" / f"{name}{suffix}" / "config.json"
        if not path.exists():
            raise SystemExit(f"no run {name}{suffix} in {demo} ({path} missing)")
        configs[name] = json.loads(path.read_text())
    shapes = {s: parse_shape(s) for s in args.shapes.split(",")}

    work = Path(tempfile.mkdtemp(prefix="demo_steps_"))
    try:
        ensure_model_parallel(1)
        student_tok = next(iter(configs.values()))["student"]["tokenizer"]
        vocab = load_tokenizer(student_tok).vocab_size
        size = demo_cfg["student"]
        inits = {}
        for label, (layers, ffn) in shapes.items():
            mc = ModelConfig(
                tokenizer=student_tok,
                family="llama",
                hidden_size=size["hidden_size"],
                num_layers=layers,
                num_attention_heads=size["num_attention_heads"],
                ffn_hidden_size=ffn,
                max_position_embeddings=4 * demo_cfg["seq_length"],
                init_seed=args.seed,
            )
            inits[label] = save_random_checkpoint(mc, vocab, str(work / f"init-{label}"), pad_for_tp=1)

        cache = TeacherLogitsCache()  # one per process, as in a demo worker
        times: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in names}
        for rep in range(args.reps):
            for name in names:
                for label in shapes:
                    cfg = config_from_dict(configs[name])
                    cfg.student.checkpoint = inits[label]
                    run_dir = work / "run"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    cfg.checkpoint.dir, cfg.log_dir = str(run_dir / "ckpt"), str(run_dir / "tb")
                    cfg.train.train_steps = args.warmup + args.steps
                    trainer = Trainer(cfg, progress=False, teacher_cache=cache if cfg.teachers else None)
                    try:
                        for step in range(args.warmup):
                            trainer.train_step(step)
                        t0 = time.perf_counter()
                        for step in range(args.warmup, args.warmup + args.steps):
                            trainer.train_step(step)
                        ms = (time.perf_counter() - t0) / args.steps * 1e3
                    finally:
                        trainer.close()
                    times[name][label].append(ms)
                    print(f"round {rep + 1}/{args.reps}  {name:<20} {label:<7} {ms:6.1f} ms/step", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {n: {s: statistics.median(v) for s, v in per.items()} for n, per in times.items()}
    first = next(iter(shapes))
    print(f"\n{cpu_description()}; ms per step, median of {args.reps} rounds [min, max]; ratio to {first}")
    print(f"| run | {' | '.join(shapes)} |")
    print(f"|---|{'---|' * len(shapes)}")
    for name in names:
        cells = [
            f"{median[name][s]:.1f} [{min(times[name][s]):.1f}, {max(times[name][s]):.1f}]"
            + ("" if s == first else f" {median[name][s] / median[name][first]:.2f}x")
            for s in shapes
        ]
        print(f"| {name} | {' | '.join(cells)} |")
    total = {s: sum(median[n][s] for n in names) for s in shapes}
    sums = [f"{total[s]:.1f} ({total[s] / total[first]:.2f}x)" for s in shapes]
    print(f"| one step of every run | {' | '.join(sums)} |")
    print(
        json.dumps(
            {
                "cpu": cpu_description(),
                "steps": args.steps,
                "reps": args.reps,
                "ms_per_step": times,
                "median_ms_per_step": median,
                "all_runs_ms": total,
                "ratio_to_first_shape": {s: total[s] / total[first] for s in shapes},
            }
        )
    )


if __name__ == "__main__":
    main()
