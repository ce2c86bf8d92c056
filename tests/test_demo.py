"""`xtoken demo --fast`: the CPU demo end to end on tiny sizes (the numbers mean nothing here; the
full demo's results are in docs/demo.md). Checks the files it writes and that a rerun skips work."""

from __future__ import annotations

import json

from xtoken_nemo.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = ["ce-only", "qwen3-gold", "qwen3-uld", "qwen3-pkl", "qwen3-hkl",
        "phi4mini-gold", "phi4mini-uld", "phi4mini-pkl", "phi4mini-hkl", "multi-xtoken"]


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| setting | method | run |" in printed and "qwen3-pkl" in printed

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(RUNS)
    for name, metrics in results["runs"].items():
        for key in ("numeral_exact_match", "heldout_ce", "numeral_ce", "answer_nll"):
            assert isinstance(metrics[key], float), (name, key)
        assert 0.0 <= metrics["numeral_exact_match"] <= 1.0
        lo, hi = metrics["ci95"]["heldout_ce"]
        assert lo <= metrics["heldout_ce"] <= hi
    assert sorted(results["teachers"]) == ["teacher-phi4mini", "teacher-qwen3"]
    # the audit's rule: P-KL for the digit-splitting Qwen3, H-KL for Phi-4-mini
    assert results["audit"]["qwen3"]["recommended_loss"] == "pkl"
    assert results["audit"]["phi4mini"]["recommended_loss"] == "hkl"
    assert results["audit"]["qwen3"]["categories"]["numerals_3"]["covered"] == 0
    assert {c["claim"] for c in results["claims"]} >= {"gold-hurts-numerals", "pkl-transfers-numerals", "hkl-at-least-pkl-phi4mini"}

    report = (out / "report.md").read_text()
    assert "| setting | method | run | numeral EM % [95% CI] |" in report
    for name in RUNS:
        assert f"| {name} |" in report
    assert "recommended loss" in report and "**PKL**" in report and "**HKL**" in report
    for png in ("audit.png", "loss_curves.png", "metrics.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
        assert f"]({png})" in report

    # every student trained the same steps from the same initial checkpoint on the same data
    configs = [json.loads((out / "runs" / r / "config.json").read_text()) for r in RUNS]
    assert len({(c["train"]["train_steps"], c["train"]["seed"], c["student"]["checkpoint"], tuple(c["data"]["paths"])) for c in configs}) == 1
    assert [t["mode"] for t in json.loads((out / "runs" / "multi-xtoken" / "config.json").read_text())["teachers"]] == ["pkl", "hkl"]

    # resumable: a second run finds every result and trains nothing
    assert main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == len(RUNS) + 2
    assert json.loads((out / "results.json").read_text())["runs"]["qwen3-pkl"] == results["runs"]["qwen3-pkl"]
