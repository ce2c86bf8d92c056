"""Continued pre-training: the student on NemotronClimbMix with cross-entropy only (no teacher)."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config


def build(root):
    return paper_config(root, "cpt", teachers=[], kd_scaling="ce_only")


RECIPE = Recipe(
    "cpt",
    "continued pre-training, CE only",
    build,
    paper=PaperRow("no teacher", "continued pre-training", 10.25, 36.63),
)
