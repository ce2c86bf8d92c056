"""`xtoken demo --fast`: the CPU demo end to end on tiny sizes (the numbers mean nothing here; the
full demo's results are in docs/demo.md). Checks the files it writes and that a rerun skips work.
The report's statistics (intervals over seeds and items, t-intervals, verdicts) are checked on
small fixed inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xtoken_nemo.cli import main
from xtoken_nemo.demo.corpus import NAMES, LookupTable, documents
from xtoken_nemo.demo.evaluate import (
    EvalItems,
    bootstrap_indices,
    items_only_difference,
    paired_difference,
    summarize,
    t975,
    t_interval,
)
from xtoken_nemo.demo.pipeline import fast_config
from xtoken_nemo.demo.report import check_claim, claim_verdict
from xtoken_nemo.tokenizers import load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = [
    "ce-only",
    "qwen3-gold",
    "qwen3-uld",
    "qwen3-pkl",
    "qwen3-hkl",
    "phi4mini-gold",
    "phi4mini-uld",
    "phi4mini-pkl",
    "phi4mini-hkl",
    "multi-xtoken",
]
DIGIT_RUNS = ["digits-ce-only", "digits-qwen3-pkl", "digits-qwen3-jkl", "digits-qwen3-gold"]


def test_lookup_keys_are_one_token_for_every_model():
    """The lookup key (a first name) is one token in every tokenizer, and the room numbers are one
    token for Llama-3.2 and Phi-4-mini and one per digit for Qwen3: the tokenization difference the
    demo is about."""
    for name in ("llama3", "qwen3", "phi4mini"):
        tok = load_tokenizer(name)
        assert all(len(tok.encode(" " + n, add_bos=False).ids) == 1 for n in NAMES), name
        assert len(tok.encode(" 47", add_bos=False).ids) == (3 if name == "qwen3" else 2), name


def test_students_text_does_not_state_the_table():
    table = LookupTable(num_facts=60)
    facts = dict(table.facts())
    true_docs, scrambled = documents(table, 50, seed=1), documents(table, 50, seed=1, scrambled=True)
    mentions = [line for d in scrambled for line in d.splitlines() if line.startswith("The room of")]
    agree = sum(int(line.split()[-1].rstrip(".")) == facts[line.split()[3]] for line in mentions)
    assert len(mentions) > 200 and agree / len(mentions) < 0.05  # chance: 1 in 90
    assert all(
        int(line.split()[-1].rstrip(".")) == facts[line.split()[3]]
        for d in true_docs
        for line in d.splitlines()
        if line.startswith("The room of")
    )


def test_second_task_keeps_the_true_first_digit_only():
    table = LookupTable(num_facts=60)
    facts = dict(table.facts())
    docs = documents(table, 50, seed=2, scrambled=True, keep_first_digit=True)
    mentions = [line for d in docs for line in d.splitlines() if line.startswith("The room of")]
    rooms = [(int(line.split()[-1].rstrip(".")), facts[line.split()[3]]) for line in mentions]
    assert len(rooms) > 200 and all(r // 10 == true // 10 for r, true in rooms)
    assert sum(r == true for r, true in rooms) / len(rooms) < 0.2  # second digit: chance 1 in 10


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo_out"
    seeds = fast_config().seeds
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| setting | method | run |" in printed and "qwen3-pkl" in printed and "| claim |" in printed
    for phase in ("vocabulary", "teachers", "students", "evaluation"):
        assert phase in printed and "done in" in printed

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(RUNS + DIGIT_RUNS)
    for name, entry in results["runs"].items():
        for key in ("numeral_exact_match", "first_digit_match", "heldout_ce", "numeral_ce", "answer_nll"):
            assert isinstance(entry["mean"][key], float), (name, key)
            assert len(entry["per_seed"][key]) == len(seeds)
            lo, hi = entry["ci95"][key]
            assert lo - 1e-9 <= entry["mean"][key] <= hi + 1e-9, (name, key)
        assert 0.0 <= entry["mean"]["numeral_exact_match"] <= 1.0
    assert sorted(results["teachers"]) == ["phi4mini", "qwen3"]
    # compact vocabularies: far fewer ids than the tokenizers, W restricted to them
    for tok, sizes in results["vocabularies"].items():
        assert sizes["compact"] < 1000 < sizes["full"], tok
    # the audit's rule: P-KL for the digit-splitting Qwen3, H-KL for Phi-4-mini
    assert results["audit"]["qwen3"]["recommended_loss"] == "pkl"
    assert results["audit"]["phi4mini"]["recommended_loss"] == "hkl"
    assert results["audit"]["qwen3"]["categories"]["numerals_3"]["covered"] == 0
    assert {c["claim"] for c in results["claims"]} >= {
        "teacher-knows-table",
        "kd-moves-knowledge",
        "pkl-beats-gold-qwen3",
        "gold-hurts-numerals",
        "hkl-at-least-pkl-phi4mini",
        "two-teachers-at-least-best-single",
        "jkl-moves-second-digit",
        "pkl-misses-second-digit",
    }
    assert all(c["holds"] for c in results["claims"])

    report = (out / "report.md").read_text()
    assert "| setting | method | run | exact match % [95% CI] |" in report and "Second task (J-KL" in report
    for name in RUNS + DIGIT_RUNS:
        assert f"| {name} |" in report
    assert "recommended loss" in report and "**PKL**" in report and "**HKL**" in report
    for png in ("audit.png", "loss_curves.png", "metrics.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
        assert f"]({png})" in report

    # within a seed, every student trained the same steps from the same initial checkpoint on the
    # same data; the seeds differ in initial weights and data order
    per_seed = []
    for seed in seeds:
        configs = [json.loads((out / "runs" / f"{r}-s{seed}" / "config.json").read_text()) for r in RUNS]
        keys = {
            (c["train"]["train_steps"], c["train"]["seed"], c["student"]["checkpoint"], tuple(c["data"]["paths"]))
            for c in configs
        }
        assert len(keys) == 1
        per_seed.append(keys.pop())
        assert all(c["student"]["tokenizer"].endswith("llama3.subvocab.json") for c in configs)
    assert len(set(per_seed)) == len(seeds)
    multi = json.loads((out / "runs" / f"multi-xtoken-s{seeds[0]}" / "config.json").read_text())["teachers"]
    assert [t["mode"] for t in multi] == ["pkl", "hkl"]
    # the second task: same initial weights per seed, its own data, J-KL reads the prefix support
    for seed in seeds:
        configs = [json.loads((out / "runs" / f"{r}-s{seed}" / "config.json").read_text()) for r in DIGIT_RUNS]
        assert {(c["student"]["checkpoint"], tuple(c["data"]["paths"])) for c in configs} == {
            (per_seed[seeds.index(seed)][2], (str(out / "data" / "student_digits"),))
        }
        (jkl,) = configs[2]["teachers"]
        assert jkl["mode"] == "jkl" and jkl["support"].endswith("S_llama3_qwen3.safetensors")
        assert jkl["joint_weight"] == fast_config().joint_weight == 2.0

    # resumable: a second run finds every result and trains nothing
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == len(RUNS + DIGIT_RUNS) * len(seeds) + 2
    assert json.loads((out / "results.json").read_text())["runs"]["qwen3-pkl"] == results["runs"]["qwen3-pkl"]

    # bench/demo_steps.py times this demo's run configurations with students of other shapes
    bench = Path(__file__).resolve().parents[1] / "bench" / "demo_steps.py"
    args = ["--demo", str(out), "--runs", "ce-only,qwen3-pkl", "--shapes", "1x0,1x16", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run([sys.executable, str(bench), *args, "--reps", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures["median_ms_per_step"]) == {"ce-only", "qwen3-pkl"}
    assert all(ms > 0 for per in figures["median_ms_per_step"].values() for ms in per.values())
    assert figures["ratio_to_first_shape"]["1x0"] == 1.0 and "| one step of every run |" in proc.stdout
    proc = subprocess.run([sys.executable, str(bench), "--demo", str(out / "runs")], capture_output=True, text=True)
    assert proc.returncode != 0 and "holds no finished demo" in proc.stderr


# ----------------------------------------------------------------------------------------------
# statistics on small fixed inputs (no training)
# ----------------------------------------------------------------------------------------------
ITEMS, DOCS = 120, 8


def _eval(correct) -> EvalItems:
    """One seed's model: exact match per lookup item as given; fixed document values."""
    correct = np.asarray(correct, dtype=np.float64)
    docs = np.linspace(1.0, 2.0, DOCS)
    return EvalItems(
        docs * 50, docs * 40, docs * 200, docs * 5, docs * 2, docs * 4, correct, correct, 1.0 - correct, []
    )


def _runs(wins: list[bool], seed: int = 0) -> tuple[list[EvalItems], list[EvalItems]]:
    """Runs a and b over len(wins) seeds: on a seed where a wins, a answers ~90% of the items and b
    ~10%; where a loses, the other way round (the same item-level margin on every seed)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for w in wins:
        hi, lo = (rng.random(ITEMS) < 0.9).astype(float), (rng.random(ITEMS) < 0.1).astype(float)
        a.append(_eval(hi if w else lo))
        b.append(_eval(lo if w else hi))
    return a, b


def test_items_agree_seeds_disagree_is_not_yes():
    """a beats b on 3 seeds and loses on 2, each by a wide margin over every item: resampling the
    items alone (the former interval) would call a > b outside noise; the interval over seeds and
    items includes 0, and the claim is not established."""
    a, b = _runs([True, True, True, False, False])
    idx = bootstrap_indices(DOCS, ITEMS, 1000, seed=1234)
    old_lo, old_hi = items_only_difference(a, b, idx)["numeral_exact_match"]
    assert 0 < old_lo < old_hi  # items only: "yes (95% CI excludes 0)" under the former verdict
    c = check_claim(a, b, "numeral_exact_match", +1, False, idx)
    lo, hi = c["ci95"]
    assert lo < 0 < hi and c["diff"] > 0
    assert c["seeds_agreeing"] == "3/5"
    assert not c["holds"].startswith("yes") and c["holds"].startswith("not established")
    assert c["t95"][0] < 0 < c["t95"][1]
    # the reverse claim (b above a) is not "the opposite, outside noise" either
    assert claim_verdict(-c["diff"], [-hi, -lo], +1, False).startswith("not established")


def test_an_at_least_claim_inside_the_noise_is_a_tie_whichever_side_its_estimate_is_on():
    """Two kernel paths put "H-KL's numeral CE at most P-KL's" at -0.001 [-0.008, +0.005] and +0.003
    [-0.010, +0.016] nats: both ties within noise, and the verdict must say the same on both (it
    read "yes within noise" on one and "tie ..., leaning no" on the other); only the lean differs."""
    one = claim_verdict(-0.001, [-0.008, 0.005], -1, True)
    other = claim_verdict(0.003, [-0.010, 0.016], -1, True)
    assert one == "tie within noise (CI includes 0), leaning yes"
    assert other == "tie within noise (CI includes 0), leaning no"
    # higher-is-better claims alike; outside the noise nothing changes
    assert claim_verdict(0.002, [-0.01, 0.02], +1, True).startswith("tie within noise")
    assert claim_verdict(0.0, [-0.01, 0.02], +1, True) == "tie within noise (CI includes 0), an exact tie"
    assert claim_verdict(-0.2, [-0.3, -0.1], -1, True).startswith("yes (95% CI")
    assert claim_verdict(0.2, [0.1, 0.3], -1, True).startswith("no: the opposite")


def test_all_seeds_agree_is_yes():
    a, b = _runs([True] * 5)
    idx = bootstrap_indices(DOCS, ITEMS, 1000, seed=1234)
    c = check_claim(a, b, "numeral_exact_match", +1, False, idx)
    assert c["ci95"][0] > 0 and c["t95"][0] > 0 and c["seeds_agreeing"] == "5/5"
    assert c["holds"].startswith("yes (95% CI")
    # seen from the other side: b above a is the opposite, outside noise; "b at least a" too
    assert check_claim(b, a, "numeral_exact_match", +1, False, idx)["holds"].startswith("no: the opposite")
    assert check_claim(b, a, "numeral_exact_match", +1, True, idx)["holds"].startswith("no: the opposite")
    # lower-is-better metric (answer NLL here is 1 - correct): a's is below b's
    assert check_claim(a, b, "answer_nll", -1, False, idx)["holds"].startswith("yes")


def test_statistics_are_deterministic():
    a, b = _runs([True, False, True, True, False], seed=3)

    def once():
        idx = bootstrap_indices(DOCS, ITEMS, 300, seed=7)
        return summarize(a, idx), paired_difference(a, b, idx), items_only_difference(a, b, idx)

    assert once() == once()
    # the seed draws are the same for every run with the same number of seeds, and differ by count
    idx = bootstrap_indices(DOCS, ITEMS, 300, seed=7)
    assert np.array_equal(idx.seeds(5), idx.seeds(5)) and idx.seeds(5).shape == (300, 5)
    assert idx.seeds(5).max() == 4 and idx.seeds(1).max() == 0


def test_t_interval_by_hand():
    """Three seeds with exact match 50%, 60%, 90%: mean 2/3, squared deviations sum 13/150, sample
    variance 13/300, standard error sqrt(13)/30, t(0.975, 2) = 4.302653."""
    seeds = [_eval(np.arange(ITEMS) < n) for n in (60, 72, 108)]
    half = 4.302653 * math.sqrt(13) / 30
    expected = [2 / 3 - half, 2 / 3 + half]  # [0.149552, 1.183781]
    assert t_interval([0.5, 0.6, 0.9]) == pytest.approx(expected, abs=1e-6)
    s = summarize(seeds, bootstrap_indices(DOCS, ITEMS, 200, seed=0))
    assert s["t95"]["numeral_exact_match"] == pytest.approx(expected, abs=1e-6)
    assert s["per_seed"]["numeral_exact_match"] == pytest.approx([0.5, 0.6, 0.9])
    # paired: the t-interval is over the per-seed differences (here against a run at 50% every seed)
    base = [_eval(np.arange(ITEMS) < 60)] * 3
    d = paired_difference(seeds, base, bootstrap_indices(DOCS, ITEMS, 200, seed=0))["numeral_exact_match"]
    assert d["t95"] == pytest.approx([x - 0.5 for x in expected], abs=1e-6)
    # one seed (a teacher): no t-interval, and the bootstrap resamples the items only
    idx = bootstrap_indices(DOCS, ITEMS, 200, seed=0)
    one = summarize(seeds[:1], idx)
    assert one["t95"]["numeral_exact_match"] is None
    items_only = np.percentile(seeds[0].correct[idx.items].mean(1), [2.5, 97.5])
    assert one["ci95"]["numeral_exact_match"] == pytest.approx(items_only.tolist())
    assert t_interval([0.3]) is None


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 31), 31, 40, 100, 1000):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-6), df


def test_a_seed_that_did_not_take_off_is_reported_as_collapsed():
    from xtoken_nemo.demo.report import collapsed_seeds

    assert collapsed_seeds((1, 2, 3, 4, 5), [0.96, 0.95, 0.05, 0.93, 0.96]) == [3]
    assert collapsed_seeds((1, 2, 3), [0.96, 0.95, 0.93]) == []
    # a run near chance (CE only, ULD) has no seed to lose: its low values are the method's, not a collapse
    assert collapsed_seeds((1, 2, 3), [0.02, 0.0, 0.01]) == []


def test_default_demo_trains_exactly_the_runs_its_claims_compare():
    from xtoken_nemo.demo.pipeline import digit_task_runs, full_config, student_runs
    from xtoken_nemo.demo.report import CLAIMS, DIGIT_CLAIMS

    recommended = {"qwen3": "pkl", "phi4mini": "hkl"}  # the audit's picks in the demo
    cfg = full_config()
    assert not cfg.all_methods and len(cfg.seeds) >= 5
    names = [r.name for r in student_runs(recommended, cfg.multi_alphas, cfg.all_methods)]
    compared = {n for c in CLAIMS for n in (c[1], c[2]) if n != "best-single"}
    singles = {f"{t}-{m}" for t, m in recommended.items()}
    assert set(names) == compared | singles | {"multi-xtoken"}
    assert {"qwen3-uld", "phi4mini-uld"}.isdisjoint(names)
    # another audit pick: the two-teacher run's singles are still trained
    other = [r.name for r in student_runs({"qwen3": "hkl", "phi4mini": "hkl"}, all_methods=False)]
    assert "qwen3-hkl" in other
    assert [r.name for r in student_runs(recommended)] == RUNS  # --all-methods, and the fast demo
    # the second task: the runs its claims compare, GOLD only with --all-methods
    assert cfg.digit_task
    digit_names = {r.name for r in digit_task_runs(cfg.all_methods)}
    assert digit_names == {n for c in DIGIT_CLAIMS for n in (c[1], c[2])}
    assert [r.name for r in digit_task_runs(True)] == DIGIT_RUNS
    # every mode has a cost for the workers' longest-first order (J-KL runs cost about what P-KL's do)
    from xtoken_nemo.demo.pipeline import RUN_COST
    from xtoken_nemo.distill.config import KD_MODES

    assert set(RUN_COST) == set(KD_MODES)
