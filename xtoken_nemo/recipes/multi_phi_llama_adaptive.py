"""The adaptive-alpha variant of the best mixture: Phi-4-mini (H-KL) + Llama-3.2-3B (KL) with
per-step alphas from each teacher's confidence (its cross-entropy on the batch: the more
confident teacher weighs more). The paper found static alphas better; this run shows it."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    # alphas are recomputed every step (train.alpha_mode=ce); the static values are unused
    return paper_config(
        root,
        "multi-phi-llama-adaptive",
        [teacher(root, "phi4-mini", "hkl", 0.5), teacher(root, "llama-3b", "kl", 0.5)],
        alpha_mode="ce",
    )


RECIPE = Recipe(
    "multi-phi-llama-adaptive",
    "Phi-mini (H-KL) + Llama-3B (KL), adaptive alpha from teacher CE",
    build,
    paper=PaperRow("Phi-mini + Llama-3B, adaptive alpha", "X-Token multi-teacher", None, None),
    notes=["the paper reports static alphas beat adaptive ones, without a table figure"],
)
