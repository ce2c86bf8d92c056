"""``xtoken recipes`` (the table of recipes) and ``xtoken prepare-cpu-tiny``."""

from __future__ import annotations

import argparse
import json


def recipe_rows(root=None) -> list[dict]:
    from xtoken_nemo.recipes import all_recipes

    rows = []
    for r in all_recipes():
        cfg = r.config(root)
        teachers = (
            " + ".join(
                f"{t.name}:{t.mode}"
                + (f"@{t.alpha:g}" if cfg.train.alpha_mode == "static" else f"@{cfg.train.alpha_mode}")
                for t in cfg.teachers
            )
            or "-"
        )
        rows.append(
            {
                "name": r.name,
                "student": cfg.student.tokenizer
                if not cfg.student.checkpoint
                else cfg.student.checkpoint.rsplit("/", 1)[-1],
                "teachers": teachers,
                "steps": cfg.train.train_steps,
                "batch": cfg.train.global_batch_size,
                "context": cfg.data.seq_length,
                "nodes": f"{r.nodes}x{r.gpus_per_node or 'cpu'}",
                "paper": f"{r.paper.setting} / {r.paper.method}" if r.paper else "",
            }
        )
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_recipes(args: argparse.Namespace) -> int:
    rows = recipe_rows(args.root)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(format_table(rows, ["name", "student", "teachers", "steps", "batch", "context", "nodes"]))
    print(
        "\nteachers: name:mode@alpha. Paths come from $XTOKEN_ROOT (or --root); "
        "`xtoken train --recipe NAME --print-config` shows one in full."
    )
    return 0


def cmd_prepare_cpu_tiny(args: argparse.Namespace) -> int:
    from xtoken_nemo.recipes import default_root
    from xtoken_nemo.recipes.prepare import prepare_cpu_tiny

    out = prepare_cpu_tiny(args.root or default_root(), progress=not args.quiet)
    print(f"cpu-tiny inputs in {out['root']} ({len(out['written'])} written, the rest already there)")
    return 0


def add_recipes_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the recipes (the paper's runs, debug-1gpu, cpu-tiny)")
    p.add_argument("--root", help="root of checkpoints/W/data/runs (default $XTOKEN_ROOT or .)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "prepare-cpu-tiny", help="write the cpu-tiny recipe's tiny checkpoints, W files and data under ROOT/cpu-tiny"
    )
    p.add_argument("--root", help="default $XTOKEN_ROOT or .")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare_cpu_tiny)
