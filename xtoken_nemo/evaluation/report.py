"""``xtoken report RUN_DIRS...``: one row per run in the paper's layout (docs/method.md, "The paper's runs"),
our scores beside the paper's GSM8k and average."""

from __future__ import annotations

import json
from pathlib import Path

from xtoken_nemo.evaluation.lm_eval_run import PAPER_TASKS, RESULTS_FILE, EvalError
from xtoken_nemo.recipes import all_recipes

HEADERS = {"mmlu": "MMLU", "gsm8k": "GSM8k", "hendrycks_math": "MATH", "winogrande": "Wino", "hellaswag": "HS"}


def load_result(path: str | Path) -> dict:
    """A run dir (its eval/results.json), an eval dir, or a results.json file."""
    path = Path(path)
    for candidate in (path, path / RESULTS_FILE, path / "eval" / RESULTS_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise EvalError(f"no {RESULTS_FILE} under {path}: run `xtoken eval --checkpoint {path}/checkpoints` first")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def report_rows(paths: list[str | Path]) -> list[dict]:
    paper = {r.name: r.paper for r in all_recipes() if r.paper}
    rows = []
    for path in paths:
        result = load_result(path)
        scores = {t: 100.0 * v["value"] for t, v in result["tasks"].items()}
        present = [t for t in PAPER_TASKS if t in scores]
        row = {
            "run": result["name"],
            **{HEADERS[t]: _fmt(scores.get(t)) for t in PAPER_TASKS},
            "avg": _fmt(sum(scores[t] for t in present) / len(present) if present else None),
        }
        extra = [t for t in scores if t not in PAPER_TASKS]
        row["other"] = ", ".join(f"{t} {scores[t]:.2f}" for t in extra)
        ref = paper.get(result["name"])
        row["setting"] = ref.setting if ref else ""
        row["method"] = ref.method if ref else ""
        row["paper GSM8k"] = _fmt(ref.gsm8k) if ref else ""
        row["paper avg"] = _fmt(ref.avg) if ref else ""
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """A markdown table: setting | method | run | our five tasks and average | the paper's figures."""
    columns = ["setting", "method", "run", *HEADERS.values(), "avg", "paper GSM8k", "paper avg"]
    if any(r["other"] for r in rows):
        columns.append("other")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
