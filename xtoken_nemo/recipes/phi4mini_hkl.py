"""Phi-4-mini teacher, X-Token H-KL (mode `hkl`), Llama-3.2-1B student."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "phi4mini-hkl", [teacher(root, "phi4-mini", "hkl")])


RECIPE = Recipe(
    "phi4mini-hkl", "Phi-4-mini, X-Token H-KL", build, paper=PaperRow("Phi-4-mini", "X-Token H-KL", 19.11, 39.18)
)
