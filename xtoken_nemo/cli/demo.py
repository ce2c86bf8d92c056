"""``xtoken demo [--out demo_out] [--fast] [--all-methods]``: the CPU demo end to end (xtoken_nemo.demo.pipeline)."""

from __future__ import annotations

import argparse


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="CPU demo: teachers that know a number lookup, students that learn it only by distillation; report",
        description=(
            "Build W and the coverage audit for the Llama-3.2 student against Qwen3 and Phi-4-mini, generate a "
            "room-number lookup whose true numbers only the teachers' corpus states, train small CE-only teachers "
            "on it and, per seed, small students on scrambled text (the runs the claims compare: CE only, GOLD and "
            "P-KL from Qwen3, P-KL and H-KL from Phi-4-mini, two teachers; --all-methods adds ULD and the rest) with "
            "the real trainer and compact vocabularies, evaluate every model, and write report.md, results.json and "
            "PNG plots to --out. Rerunning skips finished steps."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--fast", action="store_true", help="tiny sizes and a few steps (tests; the numbers mean nothing)")
    p.add_argument(
        "--all-methods",
        action="store_true",
        help="also ULD from each teacher, H-KL from Qwen3 and GOLD from Phi-4-mini (10 runs per seed, ~2x the time)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="run the frozen teachers on every batch instead of reusing their logits per window within a "
        "training process (the same numbers, slower; for checking that they are the same)",
    )
    p.set_defaults(func=run_demo_command)
    return p


def run_demo_command(args) -> int:
    import logging
    import warnings

    from xtoken_nemo.demo.numerics import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads: the same kernels on every x86-64 machine with AVX2
    from xtoken_nemo.demo.pipeline import run_demo

    # megatron-core warns about missing Apex/Transformer-Engine at every model build on CPU
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not getattr(args, "verbose", False):
        # the demo prints its own summary per phase and model; the library's INFO lines (models
        # loaded, checkpoints saved, one progress line per run) are for `xtoken -v demo`
        logging.getLogger("xtoken_nemo").setLevel(logging.WARNING)
    overrides = {"all_methods": True} if args.all_methods else {}
    run_demo(
        args.out,
        fast=args.fast,
        progress=not args.no_progress,
        teacher_cache=not getattr(args, "no_teacher_cache", False),
        **overrides,
    )
    return 0
