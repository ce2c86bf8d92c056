"""Phi-4-mini teacher, X-Token P-KL (wrong mode) (mode `pkl`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "phi4mini-pkl", [teacher(root, "phi4-mini", "pkl")])


RECIPE = Recipe(
    "phi4mini-pkl",
    "Phi-4-mini, X-Token P-KL (wrong mode)",
    build,
    paper=PaperRow("Phi-4-mini", "X-Token P-KL (wrong mode)", None, 37.50),
)
