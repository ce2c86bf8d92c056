"""The paper's best run: Phi-4-mini (H-KL, alpha 0.8) + Llama-3.2-3B (KL, alpha 0.2), static alphas."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(
        root, "multi-phi-llama", [teacher(root, "phi4-mini", "hkl", 0.8), teacher(root, "llama-3b", "kl", 0.2)]
    )


RECIPE = Recipe(
    "multi-phi-llama",
    "Phi-mini 0.8 (H-KL) + Llama-3B 0.2 (KL)",
    build,
    paper=PaperRow("Phi-mini 0.8 + Llama-3B 0.2", "X-Token multi-teacher", 20.39, 40.48),
)
