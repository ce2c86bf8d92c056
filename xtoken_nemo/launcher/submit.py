"""Prepare and submit one run: recipe -> config (+ overrides) -> layout -> checks -> script ->
``sbatch``."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from xtoken_nemo.distill.config import apply_overrides
from xtoken_nemo.errors import XTokenError
from xtoken_nemo.launcher.layout import Layout, derive_layout
from xtoken_nemo.launcher.sbatch import JobOptions, render
from xtoken_nemo.recipes import get_recipe, normalize_overrides, run_dir
from xtoken_nemo.recipes.validate import check_files


class SubmitError(XTokenError):
    """sbatch is missing or refused the script."""


@dataclass
class PreparedJob:
    recipe: str
    layout: Layout
    script: str
    script_path: Path
    problems: list[str]  # file checks that failed (submission refuses when non-empty)


def prepare(
    recipe_name: str,
    root: Path,
    overrides: list[str],
    nodes: int | None,
    gpus_per_node: int | None,
    opts: JobOptions,
    cpu_procs_per_node: int = 1,
    check: bool = True,
    note: str | None = None,
) -> PreparedJob:
    recipe = get_recipe(recipe_name)
    cfg = apply_overrides(recipe.config(root), normalize_overrides(overrides))
    layout = derive_layout(
        cfg,
        recipe.nodes if nodes is None else nodes,
        recipe.gpus_per_node if gpus_per_node is None else gpus_per_node,
        cpu_procs_per_node,
    )
    if opts.time_limit is None:
        opts.time_limit = recipe.time_limit
    directory = run_dir(cfg)
    script = render(recipe.name, cfg, layout, directory, opts, root=root, note=note)
    problems = check_files(cfg) if check else []
    return PreparedJob(recipe.name, layout, script, directory / f"{recipe.name}.sbatch", problems)


def submit(job: PreparedJob, sbatch: str = "sbatch") -> str:
    """Write the script beside the run and submit it; returns the job id."""
    if job.problems:
        raise SubmitError(f"recipe {job.recipe} is not ready to submit:\n  - " + "\n  - ".join(job.problems))
    if shutil.which(sbatch) is None:
        raise SubmitError(f"`{sbatch}` not found: run on a SLURM login node, or use --dry-run to print the script")
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(job.script)
    proc = subprocess.run([sbatch, "--parsable", str(job.script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {job.script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
