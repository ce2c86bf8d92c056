"""Phi-4-mini (H-KL) + Qwen3-4B (P-KL), static alphas. The paper does not print this mixture's
alphas; ours keep its best run's weight on Phi-mini (0.8) and give the rest to Qwen3-4B."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(
        root, "multi-phi-qwen", [teacher(root, "phi4-mini", "hkl", 0.8), teacher(root, "qwen3-4b", "pkl", 0.2)]
    )


RECIPE = Recipe(
    "multi-phi-qwen",
    "Phi-mini 0.8 (H-KL) + Qwen-4B 0.2 (P-KL)",
    build,
    paper=PaperRow("Phi-mini + Qwen-4B", "X-Token multi-teacher", None, 38.49),
    notes=["alphas 0.8/0.2 are ours (the paper does not print them)"],
)
