"""Qwen3-4B teacher, GOLD (mode `gold`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "qwen3-gold", [teacher(root, "qwen3-4b", "gold")])


RECIPE = Recipe("qwen3-gold", "Qwen3-4B, GOLD", build, paper=PaperRow("Qwen3-4B", "GOLD", 2.56, 35.03))
