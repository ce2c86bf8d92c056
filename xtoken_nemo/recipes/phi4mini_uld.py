"""Phi-4-mini teacher, ULD (mode `uld`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "phi4mini-uld", [teacher(root, "phi4-mini", "uld")])


RECIPE = Recipe("phi4mini-uld", "Phi-4-mini, ULD", build, paper=PaperRow("Phi-4-mini", "ULD", None, 38.31))
