"""Qwen3-4B teacher, X-Token P-KL (mode `pkl`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "qwen3-pkl", [teacher(root, "qwen3-4b", "pkl")])


RECIPE = Recipe("qwen3-pkl", "Qwen3-4B, X-Token P-KL", build, paper=PaperRow("Qwen3-4B", "X-Token P-KL", 15.54, 38.85))
