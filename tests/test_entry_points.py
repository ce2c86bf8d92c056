"""The ways to run the ``xtoken`` command: ``python -m xtoken_nemo``, ``python -m xtoken_nemo.cli``
(what the sbatch node script runs) and the ``xtoken`` console script (``xtoken_nemo.cli:main``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xtoken_nemo.cli import build_parser


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["xtoken_nemo", "xtoken_nemo.cli"])
def test_python_m_runs_the_command(module):
    proc = _run("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: xtoken ") and "build-w" in proc.stdout and "train" in proc.stdout

    proc = _run("-m", module, "no-such-command")
    assert proc.returncode == 2
    assert "invalid choice: 'no-such-command'" in proc.stderr and proc.stdout == ""


def test_every_command_is_in_the_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [
        "build-w",
        "audit",
        "inspect-w",
        "build-support",
        "inspect-support",
        "align",
        "preprocess",
        "convert",
        "score",
        "train",
        "export",
        "init-model",
        "recipes",
        "prepare-cpu-tiny",
        "launch",
        "eval",
        "report",
        "demo",
    ]
