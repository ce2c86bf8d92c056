"""Phi-4-mini (H-KL) + Qwen3-4B (P-KL) + Llama-3.2-3B (KL), static alphas. The paper does not
print these alphas; ours keep Phi-mini dominant (0.6) and split the rest (0.2 / 0.2)."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    teachers = [
        teacher(root, "phi4-mini", "hkl", 0.6),
        teacher(root, "qwen3-4b", "pkl", 0.2),
        teacher(root, "llama-3b", "kl", 0.2),
    ]
    return paper_config(root, "multi-phi-qwen-llama", teachers)


RECIPE = Recipe(
    "multi-phi-qwen-llama",
    "Phi-mini 0.6 (H-KL) + Qwen-4B 0.2 (P-KL) + Llama-3B 0.2 (KL)",
    build,
    paper=PaperRow("Phi-mini + Qwen-4B + Llama-3B", "X-Token multi-teacher", 19.18, 40.15),
    notes=["alphas 0.6/0.2/0.2 are ours (the paper does not print them)"],
)
