"""A student run of the demo: its spec (shared by the pipeline, which trains it once per seed, and
the report, which tabulates it) and the name of its directory under ``runs/``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSpec:
    """One student configuration (trained once per seed as ``<name>-s<seed>``)."""

    name: str
    setting: str  # table grouping
    method: str
    teachers: list = field(default_factory=list)  # [(teacher_tok, mode, alpha)]
    task: str = "rooms"  # "rooms": every number scrambled; "digits": the second task, first digit kept


def run_dir_name(run: str, seed: int) -> str:
    return f"{run}-s{seed}"
