"""Qwen3-4B teacher, ULD (mode `uld`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "qwen3-uld", [teacher(root, "qwen3-4b", "uld")])


RECIPE = Recipe("qwen3-uld", "Qwen3-4B, ULD", build, paper=PaperRow("Qwen3-4B", "ULD", None, 36.77))
