"""Phi-4-mini teacher, GOLD (mode `gold`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "phi4mini-gold", [teacher(root, "phi4-mini", "gold")])


RECIPE = Recipe("phi4mini-gold", "Phi-4-mini, GOLD", build, paper=PaperRow("Phi-4-mini", "GOLD", 16.50, 38.66))
