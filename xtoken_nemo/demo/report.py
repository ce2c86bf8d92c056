"""The demo's outputs: results.json, report.md (table in the layout of the paper's), PNG plots,
and the claim checks (computed from the measurements, whatever they are)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from xtoken_nemo.demo.evaluate import bootstrap_ci, bootstrap_indices, paired_difference

METRICS = ("numeral_exact_match", "answer_nll", "numeral_ce", "heldout_ce", "numeral_nats_per_digit", "heldout_nats_per_char")
LOWER_IS_BETTER = {"answer_nll", "numeral_ce", "heldout_ce", "numeral_nats_per_digit", "heldout_nats_per_char"}

# (name, a, b, metric, expected sign of a - b, what it tests)
CLAIMS = (
    ("teachers-beat-ce-only", "teacher-qwen3", "ce-only", "numeral_nats_per_digit", -1,
     "the Qwen3 teacher knows the numerals better than the CE-only student (nats per digit, comparable across tokenizers)"),
    ("teachers-beat-ce-only", "teacher-phi4mini", "ce-only", "numeral_nats_per_digit", -1,
     "the Phi-4-mini teacher knows the numerals better than the CE-only student"),
    ("gold-hurts-numerals", "qwen3-gold", "ce-only", "numeral_ce", +1,
     "Proposition 1: with the digit-splitting Qwen3 teacher, GOLD raises the student's numeral CE above CE-only"),
    ("pkl-transfers-numerals", "qwen3-pkl", "ce-only", "numeral_ce", -1,
     "with the Qwen3 teacher, P-KL lowers the student's numeral CE below CE-only"),
    ("pkl-beats-gold-qwen3", "qwen3-pkl", "qwen3-gold", "numeral_ce", -1,
     "with the Qwen3 teacher, P-KL's numeral CE is below GOLD's"),
    ("pkl-beats-gold-qwen3-em", "qwen3-pkl", "qwen3-gold", "numeral_exact_match", +1,
     "with the Qwen3 teacher, P-KL answers more arithmetic prompts than GOLD"),
    ("hkl-at-least-pkl-phi4mini", "phi4mini-hkl", "phi4mini-pkl", "numeral_ce", -1,
     "with the Phi-4-mini teacher (sound partition), H-KL's numeral CE is at most P-KL's"),
    ("hkl-at-least-pkl-phi4mini-ce", "phi4mini-hkl", "phi4mini-pkl", "heldout_ce", -1,
     "with the Phi-4-mini teacher, H-KL's held-out CE is at most P-KL's"),
)


def _verdict(diff: float, ci: list[float], sign: int, at_least: bool) -> str:
    lo, hi = ci
    if sign > 0:
        lo, hi, diff = -hi, -lo, -diff
    # now "expected" means diff < 0
    if hi < 0:
        return "yes (95% CI excludes 0)"
    if lo > 0:
        return "no: the opposite, outside noise"
    if at_least:
        return "yes within noise (CI includes 0)" if diff <= 0 else "tie within noise (CI includes 0)"
    return "inconclusive (CI includes 0)" + (", leaning yes" if diff < 0 else ", leaning no")


def write_report(out: Path, cfg, audits, runs, teachers, students, evals, timings, echo=print) -> dict:
    idx = bootstrap_indices(len(next(iter(evals.values())).doc_nll), len(next(iter(evals.values())).correct), cfg.bootstrap, seed=cfg.seed)
    results: dict = {"runs": {}, "teachers": {}}
    for name, e in evals.items():
        entry = dict(e.metrics())
        entry["ci95"] = bootstrap_ci(e, idx)
        rec = (teachers.get(name.removeprefix("teacher-")) if name.startswith("teacher-") else students.get(name)) or {}
        entry["train_seconds"] = rec.get("seconds")
        entry["final_train_ce"] = rec["history"][-1]["ce"] if rec.get("history") else None
        (results["teachers"] if name.startswith("teacher-") else results["runs"])[name] = entry
    claims = []
    for key, a, b, metric, sign, text in CLAIMS:
        if a not in evals or b not in evals:
            continue
        d = paired_difference(evals[a], evals[b], idx)[metric] if not a.startswith("teacher-") else None
        if d is None:  # teacher vs student: different tokenizers, no pairing over tokens; compare values
            va, vb = evals[a].metrics()[metric], evals[b].metrics()[metric]
            ok = (va - vb) * sign > 0
            claims.append({"claim": key, "a": a, "b": b, "metric": metric, "diff": va - vb, "ci95": None,
                           "holds": "yes" if ok else "no", "text": text})
            continue
        claims.append({"claim": key, "a": a, "b": b, "metric": metric, "diff": d["diff"], "ci95": d["ci95"],
                       "holds": _verdict(d["diff"], d["ci95"], sign, at_least=key.startswith("hkl-at-least")), "text": text})
    results["claims"] = claims
    results["audit"] = {a["teacher"]: {"recommended_loss": a["recommended_loss"], "categories": a["categories"], "common_size": a["common_size"]} for a in audits}
    results["config"] = json.loads(json.dumps(asdict(cfg)))
    results["timings_seconds"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = plot_losses(out, runs, teachers, students) + plot_metrics(out, runs, results)
    table = results_table(runs, results)
    (out / "report.md").write_text(report_markdown(cfg, audits, runs, results, table, plots, timings))
    echo("\n" + table)
    echo("\nclaims:")
    for c in claims:
        ci = f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else ""
        echo(f"  {c['claim']:<30} {c['a']} - {c['b']} {c['metric']}: {c['diff']:+.3f}{ci} -> {c['holds']}")
    echo(f"\nwrote {out / 'report.md'}, {out / 'results.json'}, {', '.join(str(out / p) for p in plots)} (total {timings.get('total', 0):.0f} s)")
    return results


def _fmt(entry: dict, metric: str, pct: bool = False) -> str:
    v, (lo, hi) = entry[metric], entry["ci95"][metric]
    if pct:
        return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def results_table(runs, results) -> str:
    head = "| setting | method | run | numeral EM % [95% CI] | answer NLL | numeral CE | held-out CE |"
    lines = [head, "|" + "---|" * 7]
    for name, e in results["teachers"].items():
        lines.append(
            f"| teacher | {name.removeprefix('teacher-')} tokenizer, CE only (reference; CE per its own tokens) | {name} | "
            f"{_fmt(e, 'numeral_exact_match', True)} | {_fmt(e, 'answer_nll')} | {_fmt(e, 'numeral_ce')} | {_fmt(e, 'heldout_ce')} |"
        )
    for run in runs:
        e = results["runs"][run.name]
        lines.append(
            f"| {run.setting} | {run.method} | {run.name} | {_fmt(e, 'numeral_exact_match', True)} | {_fmt(e, 'answer_nll')} | "
            f"{_fmt(e, 'numeral_ce')} | {_fmt(e, 'heldout_ce')} |"
        )
    return "\n".join(lines)


def audit_table(audits) -> str:
    cats = list(audits[0]["categories"])
    lines = ["| category | " + " | ".join(a["teacher"] for a in audits) + " |", "|---|" + "---|" * len(audits)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{a['categories'][c]['covered']}/{a['categories'][c]['total']}" for a in audits) + " |")
    lines.append("| **recommended loss** | " + " | ".join(f"**{a['recommended_loss'].upper()}**" for a in audits) + " |")
    return "\n".join(lines)


def report_markdown(cfg, audits, runs, results, table, plots, timings) -> str:
    c = cfg
    claim_lines = ["| claim | comparison | metric | difference a - b [95% CI] | holds? |", "|---|---|---|---|---|"]
    for cl in results["claims"]:
        ci = f" [{cl['ci95'][0]:+.3f}, {cl['ci95'][1]:+.3f}]" if cl["ci95"] else " (unpaired: different tokenizers)"
        claim_lines.append(f"| {cl['text']} | {cl['a']} - {cl['b']} | {cl['metric']} | {cl['diff']:+.3f}{ci} | {cl['holds']} |")
    timing_lines = [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    return f"""# X-Token CPU demo: a scaled-down reproduction

Student: Llama-3.2 tokenizer (128,256 ids), a random {c.student.num_layers}-layer, hidden-{c.student.hidden_size} megatron-core
model. Teachers: Qwen3 (151,936) and Phi-4-mini (200,064) tokenizers, {c.teacher.num_layers}-layer hidden-{c.teacher.hidden_size}
models trained here with CE only on {c.teacher_docs:,} documents for {c.teacher.steps} steps of {c.teacher.batch} x {c.seq_length} tokens.
Every student starts from the same initial checkpoint and trains {c.student.steps} steps of {c.student.batch} x {c.seq_length}
tokens on the same {c.student_docs} documents in the same order (seed {c.seed}), lr {c.student.lr:g}; KD runs use
the paper's dynamic KD/CE scaling and the chain-rule chunk merge; GOLD/ULD/H-KL use the ULD top-{c.uld_topk}
approximation. Evaluation: {c.heldout_docs} held-out documents and {c.eval_items} held-out arithmetic prompts
(`a + b =`, operands 1-{c.max_operand}); 95% intervals from {c.bootstrap} bootstrap resamples of documents / prompts.

## Coverage audit (student llama3)

{audit_table(audits)}

![audit](audit.png)

## Results

numeral EM: exact match of the greedy answer (%); answer NLL: nats of the answer's tokens given the prompt;
numeral CE / held-out CE: nats per student token (numeral tokens only / all tokens). Lower is better except EM.

{table}

## The paper's claims, measured here (paired bootstrap over the same items)

{chr(10).join(claim_lines)}

## Plots

{chr(10).join(f'![{p}]({p})' for p in plots)}

## Wall time

{chr(10).join(timing_lines)}
"""


def plot_losses(out: Path, runs, teachers, students) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for t, rec in teachers.items():
        axes[0].plot([h["step"] for h in rec["history"]], [h["ce"] for h in rec["history"]], label=f"teacher {t}")
    axes[0].set_title("teachers: training CE (own tokens)")
    for run in runs:
        rec = students[run.name]
        style = "-" if run.name == "ce-only" or "pkl" in run.name or "hkl" in run.name or "multi" in run.name else "--"
        axes[1].plot([h["step"] for h in rec["history"]], [h["ce"] for h in rec["history"]], style, label=run.name)
    axes[1].set_title("students: training CE (llama3 tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("CE (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return ["loss_curves.png"]


def plot_metrics(out: Path, runs, results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, scale in zip(axes, ("numeral_exact_match", "numeral_ce", "heldout_ce"), (100, 1, 1)):
        vals = np.array([results["runs"][n][metric] for n in names]) * scale
        ci = np.array([results["runs"][n]["ci95"][metric] for n in names]) * scale
        err = np.stack([vals - ci[:, 0], ci[:, 1] - vals])
        colors = ["gray" if n == "ce-only" else "tab:blue" if n.startswith("qwen3") else "tab:orange" if n.startswith("phi4mini") else "tab:green" for n in names]
        ax.bar(range(len(names)), vals, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric + (" (%)" if scale == 100 else " (nats/token, lower is better)"))
        if metric == "numeral_exact_match":
            ax.set_ylim(0, max(5.0, 1.2 * float(ci[:, 1].max())))
        else:
            lo = min(ci[:, 0].min(), vals.min())
            ax.set_ylim(max(0.0, lo - 0.2 * (vals.max() - lo + 1e-6)), None)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    return ["metrics.png"]
