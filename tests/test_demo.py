"""`xtoken demo --fast`: the CPU demo end to end on tiny sizes (the numbers mean nothing here; the
full demo's results are in docs/demo.md). Checks the files it writes and that a rerun skips work."""

from __future__ import annotations

import json

from xtoken_nemo.cli import main
from xtoken_nemo.demo.corpus import NAMES, LookupTable, documents
from xtoken_nemo.demo.pipeline import fast_config
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


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo_out"
    seeds = fast_config().seeds
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| setting | method | run |" in printed and "qwen3-pkl" in printed and "| claim |" in printed
    for phase in ("vocabulary", "teachers", "students", "evaluation"):
        assert phase in printed and "done in" in printed

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(RUNS)
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
    }
    assert all(c["holds"] for c in results["claims"])

    report = (out / "report.md").read_text()
    assert "| setting | method | run | exact match % [95% CI] |" in report
    for name in RUNS:
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

    # resumable: a second run finds every result and trains nothing
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == len(RUNS) * len(seeds) + 2
    assert json.loads((out / "results.json").read_text())["runs"]["qwen3-pkl"] == results["runs"]["qwen3-pkl"]
