"""Same-tokenizer KD: token-level KL from Llama-3.2-3B (shares the student's tokenizer, no W)."""

from xtoken_nemo.recipes.common import PaperRow, Recipe, paper_config, teacher


def build(root):
    return paper_config(root, "llama3b-kl", [teacher(root, "llama-3b", "kl")])


RECIPE = Recipe(
    "llama3b-kl",
    "Llama-3.2-3B -> 1B, token-level KL",
    build,
    paper=PaperRow("same tokenizer", "Llama-3B -> 1B, KL", 12.89, 38.40),
)
