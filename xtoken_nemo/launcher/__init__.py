"""SLURM launcher: parallel layout, sbatch rendering, submission (``xtoken launch``)."""

from xtoken_nemo.launcher.layout import Layout, LayoutError, derive_layout
from xtoken_nemo.launcher.sbatch import JobOptions, job_name, render

__all__ = ["JobOptions", "Layout", "LayoutError", "derive_layout", "job_name", "render"]
