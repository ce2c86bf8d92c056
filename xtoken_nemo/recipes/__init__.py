"""Recipes: one short module per run of the paper (docs/method.md, "The paper's runs"), one of ours
beyond the paper (``qwen3-jkl``) and the utility runs ``debug-1gpu`` and ``cpu-tiny``. Each module
defines ``RECIPE``, a :class:`Recipe` whose ``config(root)`` returns the run's
:class:`~xtoken_nemo.distill.config.DistillConfig`.

    from xtoken_nemo.recipes import get_recipe
    cfg = get_recipe("qwen3-pkl").config("/lustre/xtoken")     # or $XTOKEN_ROOT
"""

from __future__ import annotations

import importlib

from xtoken_nemo.distill.config import ConfigError
from xtoken_nemo.recipes.common import PaperRow, Recipe, default_root, run_dir

# the paper's table, in its order, then the utility recipes
PAPER = (
    "cpt",
    "llama3b_kl",
    "qwen3_uld",
    "qwen3_gold",
    "qwen3_pkl",
    "phi4mini_uld",
    "phi4mini_gold",
    "phi4mini_hkl",
    "phi4mini_pkl",
    "multi_phi_llama",
    "multi_phi_qwen",
    "multi_phi_qwen_llama",
    "multi_phi_llama_adaptive",
)
# beyond the paper: the same shape, a mode of ours
BEYOND = ("qwen3_jkl",)
UTILITY = ("debug_1gpu", "cpu_tiny")

__all__ = [
    "PaperRow",
    "Recipe",
    "all_recipes",
    "default_root",
    "get_recipe",
    "paper_recipes",
    "run_dir",
    "resolve_sweep",
]


def _load(module: str) -> Recipe:
    return importlib.import_module(f"xtoken_nemo.recipes.{module}").RECIPE


def all_recipes() -> list[Recipe]:
    return [_load(m) for m in PAPER + BEYOND + UTILITY]


def paper_recipes() -> list[Recipe]:
    return [_load(m) for m in PAPER]


def get_recipe(name: str) -> Recipe:
    for recipe in all_recipes():
        if recipe.name == name:
            return recipe
    raise ConfigError(
        f"unknown recipe '{name}'; `xtoken recipes` lists them: {', '.join(r.name for r in all_recipes())}"
    )


def resolve_sweep(name: str) -> list[Recipe]:
    """``paper`` (the whole table), or a comma-separated list of recipe names."""
    if name == "paper":
        return paper_recipes()
    return [get_recipe(n.strip()) for n in name.split(",") if n.strip()]


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Let list values be written without JSON quotes: ``data.paths=[/a,/b]`` -> ``data.paths=/a,/b``
    (JSON such as ``data.paths=["/a"]`` or ``data.weights=[0.3,0.7]`` passes unchanged)."""
    import json

    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and value.startswith("[") and value.endswith("]"):
            try:
                json.loads(value)
            except json.JSONDecodeError:
                value = ",".join(v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip())
        out.append(f"{key}{sep}{value}")
    return out
