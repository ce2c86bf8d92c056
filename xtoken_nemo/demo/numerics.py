"""Pinned CPU numerics for the demo: the same kernels, so the same numbers, on any x86-64 machine
with AVX2 (docs/demo.md, "Reproducible figures").

Two machines of one class differ in their vector ISA (AVX-512 or only AVX2), and torch, MKL and
oneDNN each pick their kernels by it; the kernels round differently in the last bits, and 200
training steps turn that into different students. The demo pins each library's kernel choice to
AVX2, the widest every such machine has, before torch is imported:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorized CPU kernels (softmax, exp, reductions, ...);
- ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility (the BLAS behind matmul);
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's kernels (used by some convolutions and matmuls).

A value the user set already is kept (``ATEN_CPU_CAPABILITY=default xtoken demo`` runs the demo on
the unvectorized kernel path: the robustness check of docs/demo.md). Not pinned: the thread count
is (one thread per training worker), and nothing is pinned off x86-64.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_numerics(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the variables of :data:`PINNED` that are not set yet (x86-64 only); return the values in
    effect. The libraries read them once, at their first use: ``xtoken demo`` calls this before
    torch loads; where torch is loaded already (the demo run inside a test), the training workers,
    new processes, still get them."""
    env = os.environ if environ is None else environ
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    for key, value in PINNED.items():
        env.setdefault(key, value)
    return {key: env[key] for key in PINNED}


def cpu_description() -> str:
    """'<model name>, <widest vector ISA>, <n> cores' from /proc/cpuinfo (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}, {os.cpu_count()} cores"


def numerics_in_effect() -> dict[str, str]:
    """What the report records: the machine, the pinned variables and the kernel path ATen uses."""
    import torch

    info = {"cpu": cpu_description()}
    info |= {key: os.environ.get(key, "(unset)") for key in PINNED}
    info["aten_cpu_capability_in_use"] = torch.backends.cpu.get_cpu_capability()
    info["torch"] = torch.__version__
    return info
