"""``xtoken eval`` and ``xtoken report``."""

from __future__ import annotations

import argparse
import json


def cmd_eval(args: argparse.Namespace) -> int:
    from xtoken_nemo.evaluation.lm_eval_run import EvalConfig, evaluate

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    cfg = EvalConfig(
        checkpoint=args.checkpoint,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        out=args.out,
        like=args.like,
        include_path=args.include_path,
        limit=limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    summary = evaluate(cfg)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "lm_eval"}, indent=2))
        return 0
    print(
        f"{summary['name']} ({summary['checkpoint']}), {summary['num_fewshot']}-shot"
        + (f", limit {limit}" if limit else "")
    )
    for task, v in summary["tasks"].items():
        print(f"  {task:<16} {v['metric']:<28} {100 * v['value']:6.2f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from xtoken_nemo.evaluation.report import format_report, report_rows

    rows = report_rows(args.runs)
    print(json.dumps(rows, indent=1) if args.json else format_report(rows))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="export a run's student to HF and evaluate it with lm-eval (3-shot paper tasks by default)"
    )
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint dir (latest iteration) or an iter_N dir")
    p.add_argument(
        "--tasks", default="mmlu,gsm8k,hendrycks_math,winogrande,hellaswag", help="comma-separated lm-eval task names"
    )
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--out", help="output dir (default: <run dir>/eval); results.json and the exported hf/ go there")
    p.add_argument("--like", help="the student's original HF directory (tokenizer and config files)")
    p.add_argument("--include-path", help="a directory of custom lm-eval task YAMLs (local data files)")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1): quick checks only")
    p.add_argument("--batch-size", default=1)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report", help="a table of evaluated runs in the paper's layout, the paper's figures beside ours"
    )
    p.add_argument("runs", nargs="+", help="run directories (with eval/results.json) or results.json files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
