"""The demo's outputs: results.json, report.md (table in the layout of the paper's), PNG plots,
and the paper's claims as checks (computed from the measurements, whichever way they come out).

Every student metric is the mean over the seeds. Its 95% interval comes from a hierarchical
bootstrap that includes training noise: each resample draws the seeds with replacement, then the
evaluation items (lookup prompts / held-out documents) with replacement, and averages the metric
over the drawn seeds. Differences between runs are paired: the same seed draws for both runs (seed
i of run a against seed i of run b: same initial weights, same data order) and the same items.
Beside it, the 95% t-interval over the per-seed values (n - 1 degrees of freedom). A claim holds
("yes") only when the hierarchical interval excludes 0 in the claimed direction; the report also
gives how many seeds agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from xtoken_nemo.demo.evaluate import EvalItems, Resamples, bootstrap_indices, paired_difference, summarize
from xtoken_nemo.demo.runs import run_dir_name

METRICS = ("numeral_exact_match", "first_digit_match", "answer_nll", "numeral_ce", "heldout_ce")
PERCENT = {"numeral_exact_match", "first_digit_match"}
TEACHER_BAR = 0.8  # the teachers must know the table (exact match) for the comparison to mean anything
COLLAPSE_FRACTION = 0.5  # a seed below this fraction of its run's median exact match has collapsed
COLLAPSE_MIN_MEDIAN = 0.2  # ... when the run learns at all (a run near chance has nothing to lose)


def collapsed_seeds(seeds, exact_match) -> list[int]:
    """The seeds whose exact match fell below COLLAPSE_FRACTION of their run's median: training
    that did not take off where the run's other seeds did (reported, never dropped)."""
    median = float(np.median(exact_match))
    if median < COLLAPSE_MIN_MEDIAN:
        return []
    return [s for s, v in zip(seeds, exact_match) if v < COLLAPSE_FRACTION * median]


# (claim, a, b, metric, expected sign of a - b, "at least" (ties count), text); b "best-single":
# the better (exact match) of the two single-teacher runs the two-teacher run combines
CLAIMS = (
    (
        "kd-moves-knowledge",
        "phi4mini-hkl",
        "ce-only",
        "numeral_exact_match",
        +1,
        False,
        "the student distilled from Phi-4-mini (audit's H-KL) answers more lookups than the CE-only student",
    ),
    (
        "kd-moves-knowledge",
        "qwen3-pkl",
        "ce-only",
        "first_digit_match",
        +1,
        False,
        "the student distilled from Qwen3 (audit's P-KL) gets more first digits right than the CE-only student",
    ),
    (
        "pkl-beats-gold-qwen3",
        "qwen3-pkl",
        "qwen3-gold",
        "numeral_exact_match",
        +1,
        False,
        "with Qwen3, P-KL answers more lookups than GOLD",
    ),
    (
        "pkl-beats-gold-qwen3",
        "qwen3-pkl",
        "qwen3-gold",
        "answer_nll",
        -1,
        False,
        "with Qwen3, P-KL's answer NLL is below GOLD's",
    ),
    (
        "gold-hurts-numerals",
        "qwen3-gold",
        "ce-only",
        "numeral_ce",
        +1,
        False,
        "Proposition 1: with the digit-splitting Qwen3, GOLD's numeral CE is above CE-only's",
    ),
    (
        "hkl-at-least-pkl-phi4mini",
        "phi4mini-hkl",
        "phi4mini-pkl",
        "numeral_exact_match",
        +1,
        True,
        "with Phi-4-mini, H-KL answers at least as many lookups as P-KL",
    ),
    (
        "hkl-at-least-pkl-phi4mini",
        "phi4mini-hkl",
        "phi4mini-pkl",
        "numeral_ce",
        -1,
        True,
        "with Phi-4-mini, H-KL's numeral CE is at most P-KL's",
    ),
    (
        "two-teachers-at-least-best-single",
        "multi-xtoken",
        "best-single",
        "numeral_exact_match",
        +1,
        True,
        "two teachers answer at least as many lookups as the better single teacher (audit's modes)",
    ),
)
#: the student runs the claims compare ("best-single" is one of the two-teacher run's singles,
#: phi4mini-hkl and qwen3-pkl with the audit's picks): the default demo trains only these
CLAIM_RUNS = frozenset(name for c in CLAIMS for name in (c[1], c[2]) if name != "best-single") | {"multi-xtoken"}

#: the second task (student text with each number's true first digit, a random second digit):
#: checked when the demo ran it (DemoConfig.digit_task)
DIGIT_CLAIMS = (
    (
        "jkl-moves-second-digit",
        "digits-qwen3-jkl",
        "digits-qwen3-pkl",
        "numeral_exact_match",
        +1,
        False,
        "second task: J-KL answers more lookups than P-KL (Qwen3's second digit reaches the one-token numeral)",
    ),
    (
        "jkl-moves-second-digit",
        "digits-qwen3-jkl",
        "digits-ce-only",
        "numeral_exact_match",
        +1,
        False,
        "second task: J-KL answers more lookups than the CE-only student",
    ),
    (
        "pkl-misses-second-digit",
        "digits-qwen3-pkl",
        "digits-ce-only",
        "numeral_exact_match",
        +1,
        False,
        "second task: P-KL answers more lookups than CE only (expected: not established, P-KL carries no second digit)",
    ),
)


def claim_verdict(diff: float, ci: list[float], sign: int, at_least: bool) -> str:
    """The verdict on "a - b has sign ``sign``" (``at_least``: or a tie) from the seed-mean
    difference and its 95% interval over seeds and items (the hierarchical bootstrap's): "yes" only
    when the interval excludes 0 in the claimed direction."""
    lo, hi = ci
    if sign > 0:
        lo, hi, diff = -hi, -lo, -diff
    # now "as claimed" means diff < 0
    if hi < 0:
        return "yes (95% CI over seeds and items excludes 0)"
    if lo > 0:
        return "no: the opposite, outside noise"
    # inside the noise the verdict must not hang on the sign of the point estimate (a kernel path's
    # rounding can move it across 0): only the lean does
    lean = ", leaning yes" if diff < 0 else ", leaning no" if diff > 0 else ", an exact tie"
    return ("tie within noise (CI includes 0)" if at_least else "not established (CI includes 0)") + lean


def check_claim(a: list[EvalItems], b: list[EvalItems], metric: str, sign: int, at_least: bool, idx: Resamples) -> dict:
    """One paired claim on runs a and b (their seeds' evaluations, seed i against seed i): the
    seed-mean difference, its hierarchical 95% interval (``ci95``), the t-interval over the per-seed
    differences (``t95``), the per-seed differences, how many seeds agree, and the verdict."""
    d = paired_difference(a, b, idx)[metric]
    agree = sum(1 for x in d["per_seed"] if x * sign > 0 or (at_least and x == 0))
    return {
        "diff": d["diff"],
        "ci95": d["ci95"],
        "t95": d["t95"],
        "per_seed": d["per_seed"],
        "seeds_agreeing": f"{agree}/{len(d['per_seed'])}",
        "holds": claim_verdict(d["diff"], d["ci95"], sign, at_least),
    }


def write_report(
    out: Path, cfg, audits, vocab, runs, teachers, students, evals, timings, echo=print, numerics=None
) -> dict:
    first = next(iter(evals.values()))
    idx = bootstrap_indices(len(first.doc_nll), len(first.correct), cfg.bootstrap, seed=cfg.seed)
    per_run = {r.name: [evals[run_dir_name(r.name, s)] for s in cfg.seeds] for r in runs}
    results: dict = {"teachers": {}, "runs": {}}
    for t, rec in teachers.items():
        entry = summarize([evals[f"teacher-{t}"]], idx)
        entry.update(train_seconds=rec["seconds"], final_train_ce=rec["history"][-1]["ce"])
        results["teachers"][t] = entry
    for r in runs:
        entry = summarize(per_run[r.name], idx)
        recs = [students[run_dir_name(r.name, s)] for s in cfg.seeds]
        entry.update(
            setting=r.setting,
            method=r.method,
            train_seconds=[x["seconds"] for x in recs],
            final_train_ce=[x["history"][-1]["ce"] for x in recs],
            collapsed_seeds=collapsed_seeds(cfg.seeds, entry["per_seed"]["numeral_exact_match"]),
        )
        results["runs"][r.name] = entry

    singles = [f"{t}-{mode}" for t, mode, _ in next(r for r in runs if r.name == "multi-xtoken").teachers]
    best_single = max(singles, key=lambda n: results["runs"][n]["mean"]["numeral_exact_match"])
    claims = []
    for t, e in results["teachers"].items():
        em = e["mean"]["numeral_exact_match"]
        claims.append(
            {
                "claim": "teacher-knows-table",
                "a": f"teacher-{t}",
                "b": None,
                "metric": "numeral_exact_match",
                "diff": em,
                "ci95": e["ci95"]["numeral_exact_match"],
                "t95": None,
                "per_seed": None,
                "holds": "yes" if em >= TEACHER_BAR else f"no: below {TEACHER_BAR:.0%}",
                "text": f"the {t} teacher knows the table (exact match at least {TEACHER_BAR:.0%})",
            }
        )
    for key, a, b, metric, sign, at_least, text in CLAIMS + DIGIT_CLAIMS:
        if a not in per_run:  # a second-task claim of a demo that did not run that task
            continue
        b = best_single if b == "best-single" else b
        c = check_claim(per_run[a], per_run[b], metric, sign, at_least, idx)
        claims.append({"claim": key, "a": a, "b": b, "metric": metric, **c, "text": text})
    results["claims"] = claims
    results["audit"] = {
        a["teacher"]: {
            "recommended_loss": a["recommended_loss"],
            "categories": a["categories"],
            "common_size": a["common_size"],
        }
        for a in audits
    }
    results["vocabularies"] = vocab
    results["config"] = json.loads(json.dumps(asdict(cfg)))
    results["timings_seconds"] = timings
    results["numerics"] = numerics or {}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    plots = plot_metrics(out, runs, results) + plot_losses(out, cfg, runs, teachers, students)
    table = results_table(runs, results)
    claim_table = claims_table(claims)
    (out / "report.md").write_text(report_markdown(cfg, audits, vocab, results, table, claim_table, plots, timings))
    echo("\n" + table)
    echo("\n" + claim_table)
    echo(
        f"\nwrote {out / 'report.md'}, {out / 'results.json'}, {', '.join(str(out / p) for p in plots)} "
        f"(total {timings.get('total', 0):.0f} s)"
    )
    return results


def _fmt(entry: dict, metric: str) -> str:
    v, (lo, hi) = entry["mean"][metric], entry["ci95"][metric]
    if metric in PERCENT:
        return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt_t(ci: list[float] | None, scale: float = 100, digits: int = 1, signed: bool = False) -> str:
    if ci is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"[{f.format(scale * ci[0])}, {f.format(scale * ci[1])}]"


def results_table(runs, results) -> str:
    head = (
        "| setting | method | run | exact match % [95% CI] | exact match % [95% t, seeds] | first digit % "
        "| answer NLL | numeral CE | held-out CE | exact match % per seed |"
    )
    lines = [head, "|" + "---|" * 10]
    for t, e in results["teachers"].items():
        lines.append(
            f"| teacher | {t} tokenizer, CE only on the true table | teacher-{t} | "
            + " | ".join([_fmt(e, METRICS[0]), "-"] + [_fmt(e, m) for m in METRICS[1:]])
            + " | (one teacher) |"
        )
    for run in runs:
        e = results["runs"][run.name]
        seeds = ", ".join(f"{100 * v:.0f}" for v in e["per_seed"]["numeral_exact_match"])
        lines.append(
            f"| {run.setting} | {run.method} | {run.name} | "
            + " | ".join([_fmt(e, METRICS[0]), _fmt_t(e["t95"][METRICS[0]])] + [_fmt(e, m) for m in METRICS[1:]])
            + f" | {seeds} |"
        )
    return "\n".join(lines)


def claims_table(claims) -> str:
    lines = [
        "| claim | comparison | metric | a - b, seed mean [95% CI, seeds + items] | [95% t, seeds] | seeds agreeing "
        "| holds? |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        pct = 100 if c["metric"] in PERCENT else 1
        if c["b"] is None:
            value = f"{pct * c['diff']:.1f}% [{pct * c['ci95'][0]:.1f}, {pct * c['ci95'][1]:.1f}]"
            lines.append(f"| {c['text']} | {c['a']} | {c['metric']} | {value} | - | - | {c['holds']} |")
            continue
        unit = " pts" if pct == 100 else ""
        value = (
            f"{pct * c['diff']:+.1f}{unit} [{pct * c['ci95'][0]:+.1f}, {pct * c['ci95'][1]:+.1f}]"
            if pct == 100
            else f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        )
        t95 = _fmt_t(c["t95"], signed=True) if pct == 100 else _fmt_t(c["t95"], 1, 3, signed=True)
        lines.append(
            f"| {c['text']} | {c['a']} - {c['b']} | {c['metric']} | {value} | {t95} | {c['seeds_agreeing']} "
            f"| {c['holds']} |"
        )
    return "\n".join(lines)


def audit_table(audits) -> str:
    cats = list(audits[0]["categories"])
    lines = ["| category | " + " | ".join(a["teacher"] for a in audits) + " |", "|---|" + "---|" * len(audits)]
    for c in cats:
        lines.append(
            f"| {c} | "
            + " | ".join(f"{a['categories'][c]['covered']}/{a['categories'][c]['total']}" for a in audits)
            + " |"
        )
    lines.append(
        "| **recommended loss** | " + " | ".join(f"**{a['recommended_loss'].upper()}**" for a in audits) + " |"
    )
    return "\n".join(lines)


def digit_task_text(cfg) -> str:
    """The second task's paragraph of report.md (empty when the demo did not run it)."""
    if not getattr(cfg, "digit_task", False):
        return ""
    return """**Second task (J-KL, ours).** A second set of students reads the same kinds of sentences, but each
number keeps its true first digit and gets a random second one ("digits-*" runs): the first digit is in
the student's own text, the second only in the teacher's predictions. Qwen3 writes 47 as "4", "7"; Llama
as one token. P-KL sends Llama's "47" to Qwen3's "4" (W's row), so every "4x" looks the same to it; J-KL
adds the KL between the student's probabilities of "40" ... "49" and Qwen3's chain products
p("4") p(x | "4") (docs/method.md, "J-KL"). Same teacher, initial weights, steps and evaluation as above.

"""


def report_markdown(cfg, audits, vocab, results, table, claim_table, plots, timings) -> str:
    c = cfg
    vocab_line = ", ".join(f"{t} {v['compact']:,} of {v['full']:,} ids" for t, v in vocab.items())
    timing_lines = [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    collapsed = [
        f"{name} (seeds {', '.join(map(str, e['collapsed_seeds']))})"
        for name, e in results["runs"].items()
        if e.get("collapsed_seeds")
    ]
    collapse_line = (
        "Collapsed seeds (exact match below half of the run's median, in a run whose median is at least "
        f"{COLLAPSE_MIN_MEDIAN:.0%}): " + ("; ".join(collapsed) if collapsed else "none") + "."
    )
    if results.get("numerics"):
        timing_lines.append("- numerics: " + ", ".join(f"{k} {v}" for k, v in results["numerics"].items()))
    return f"""# X-Token CPU demo: a small reproduction

**Task.** A lookup table gives each of {c.num_facts} people a room number ({c.rooms[0]}-{c.rooms[1]}). The teachers'
corpus ({c.teacher_docs:,} documents) states the true numbers ("The room of Alice is 47."); the students'
corpus ({c.student_docs} documents) has the same sentences with every number drawn at random, so a student can
learn the table only from its teachers. Evaluation: the {c.num_facts} prompts "The room of <name> is" (greedy
exact match, first digit, NLL of the answer) and {c.heldout_docs} held-out documents stating the true numbers
(CE on all tokens and on numeral tokens, nats per student token).

**Models.** Teachers: Qwen3 and Phi-4-mini tokenizers, \
{c.teacher.num_layers}-layer hidden-{c.teacher.hidden_size} models trained CE-only,
{c.teacher.steps} steps of {c.teacher.batch} x {c.seq_length} tokens. Students: Llama-3.2 tokenizer, \
{c.student.num_layers}-layer hidden-{c.student.hidden_size}, {c.student.steps} steps of
{c.student.batch} x {c.seq_length} tokens, lr {c.student.lr:g}, through the real trainer with the paper's \
dynamic KD/CE scale and
chain-rule merge; seeds {", ".join(map(str, c.seeds))} (within a seed every student has the same initial \
weights and data order).

**What is scaled down.** Model sizes and data; and the vocabularies: each model's embedding and output
layer span only the token ids the demo's text uses ({vocab_line}; a teacher's
also keeps every id W reaches). W and the audit are built by the real code on the full tokenizers, W is then
restricted (no row loses mass); the segmentation, the alignment and the common sets are the full
tokenizers' (Llama's and Phi-4-mini's two-digit numerals against Qwen3's single digits are unchanged).

{digit_task_text(c)}## Coverage audit (student llama3, full tokenizers)

{audit_table(audits)}

![audit](audit.png)

## Results (mean over seeds; 95% interval over seeds and items)

The interval after each mean comes from {c.bootstrap} hierarchical resamples: each draws the seeds with
replacement, then the evaluation items with replacement, and averages over the drawn seeds, so it
includes the seed-to-seed spread of training as well as the sampling of the items. The column "95% t,
seeds" is the t-interval over the per-seed values (n - 1 degrees of freedom); the per-seed values are
in the last column and in results.json.

{table}

{collapse_line}

## The paper's claims, measured here (paired: same seeds, same items)

A claim holds ("yes") only when its hierarchical 95% interval excludes 0 in the claimed direction
(for "at least" claims, an interval that includes 0 is a tie); otherwise it is not established.

{claim_table}

## Plots

{chr(10).join(f"![{p}]({p})" for p in plots)}

## Wall time

{chr(10).join(timing_lines)}
"""


def _colors(names: list[str]) -> list[str]:
    return [
        "gray"
        if n.endswith("ce-only")
        else "tab:blue"
        if n.startswith("qwen3")
        else "tab:orange"
        if n.startswith("phi4mini")
        else "tab:green"
        for n in names
    ]


def plot_metrics(out: Path, runs, results) -> list[str]:
    """Exact match, answer NLL and numeral CE per run: bars = seed mean with its 95% interval, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (
        ("numeral_exact_match", "exact match on the lookup prompts (%)", 100),
        ("answer_nll", "NLL of the true answer (nats, lower is better)", 1),
        ("numeral_ce", "CE on numerals of held-out text (nats/token, lower is better)", 1),
    )
    for ax, (metric, title, scale) in zip(axes, panels):
        vals = np.array([results["runs"][n]["mean"][metric] for n in names]) * scale
        ci = np.array([results["runs"][n]["ci95"][metric] for n in names]) * scale
        err = np.clip(np.stack([vals - ci[:, 0], ci[:, 1] - vals]), 0, None)
        ax.bar(range(len(names)), vals, yerr=err, color=_colors(names), capsize=3, alpha=0.85)
        for i, n in enumerate(names):
            seeds = np.array(results["runs"][n]["per_seed"][metric]) * scale
            ax.scatter(np.full(len(seeds), i), seeds, color="black", s=9, zorder=3)
        if metric == "numeral_exact_match":
            for k, (t, e) in enumerate(results["teachers"].items()):
                ax.axhline(
                    100 * e["mean"][metric],
                    ls="--",
                    lw=1,
                    color=("tab:blue", "tab:orange")[k % 2],
                    label=f"teacher {t}",
                )
            ax.set_ylim(0, 105)
            ax.legend(fontsize=8, loc="upper left")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    return ["metrics.png"]


def plot_losses(out: Path, cfg, runs, teachers, students) -> list[str]:
    """Training curves: the teachers' CE, and the first seed's students (CE on the scrambled text; KD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for t, rec in teachers.items():
        axes[0].plot([h["step"] for h in rec["history"]], [h["ce"] for h in rec["history"]], label=f"teacher {t}")
    axes[0].set_title("teachers: training CE (true table)")
    seed = cfg.seeds[0]
    for run, color in zip(runs, _colors([r.name for r in runs])):
        hist = students[run_dir_name(run.name, seed)]["history"]
        style = "-" if run.name == "ce-only" or "pkl" in run.name or "hkl" in run.name or "multi" in run.name else "--"
        axes[1].plot([h["step"] for h in hist], [h["ce"] for h in hist], style, color=color, lw=1, label=run.name)
        if run.teachers:
            axes[2].plot(
                [h["step"] for h in hist], [h.get("kd", np.nan) for h in hist], style, color=color, lw=1, label=run.name
            )
    axes[1].set_title(f"students (seed {seed}): CE on their scrambled text")
    axes[2].set_title(f"students (seed {seed}): trainable KD loss")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    return ["loss_curves.png"]
