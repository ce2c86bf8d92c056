"""`xtoken build-w`, `xtoken audit` and `xtoken inspect-w` through the real entry point."""

import json

import pytest

from xtoken_nemo.cli import main


def test_audit_json_single_teacher(capsys):
    assert main(["audit", "--student", "llama3", "--teacher", "qwen3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["categories"]["numerals_3"]["covered"] == 0
    assert report["categories"]["numerals_3"]["total"] == 1000
    assert report["recommended_loss"] == "pkl" and report["reason"]
    assert isinstance(report["common_size"], int)


def test_audit_text_two_teachers_and_plot(capsys, tmp_path):
    plot = tmp_path / "audit.png"
    assert (
        main(["audit", "--student", "llama3", "--teacher", "qwen3", "--teacher", "phi4mini", "--plot", str(plot)]) == 0
    )
    out = capsys.readouterr().out
    assert "recommended loss: PKL" in out and "recommended loss: HKL" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_w_and_inspect(capsys, tmp_path):
    out = tmp_path / "W.safetensors"
    assert main(["build-w", "--student", "llama3", "--teacher", "phi4mini", "--out", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "exact rows" in summary and "zero rows" in summary and "time" in summary
    assert main(["inspect-w", str(out), "--student", "llama3", "--teacher", "phi4mini", "--token", "Hundreds"]) == 0
    shown = capsys.readouterr().out
    assert "'Hund': 0.9091" in shown
    assert main(["inspect-w", str(out), "--student", "llama3", "--teacher", "qwen3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rebuild it with `xtoken build-w`" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--student", "nope", "--teacher", "qwen3"],
        ["build-w", "--student", "llama3", "--teacher", "/no/such/tokenizer.json", "--out", "x"],
    ],
)
def test_bad_tokenizer_is_one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xtoken {argv[0]}: error:") and "\n" not in err


def test_build_support_and_inspect_row_of_47(capsys, tmp_path):
    out = tmp_path / "S.safetensors"
    assert main(["build-support", "--student", "llama3", "--teacher", "qwen3", "--out", str(out), "--quiet"]) == 0
    assert "student tokens under" in capsys.readouterr().out
    assert main(["inspect-support", str(out), "--student", "llama3", "--teacher", "qwen3", "--token", "47"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "teacher pieces ['4', '7']; under prefix ['4']: 10 student tokens" in line
    assert str([f"4{d}" for d in range(10)]) in line
    # built for other tokenizers: a one-line error, exit 2
    assert main(["inspect-support", str(out), "--student", "llama3", "--teacher", "phi4mini"]) == 2
    assert "rebuild it with `xtoken build-support`" in capsys.readouterr().err
