"""Qwen3-4B teacher, J-KL (mode `jkl`, ours, beyond the paper), Llama-3.2-1B student: the paper's
shape and settings, P-KL plus the joint-chunk term that carries the teacher's multi-piece chunks
(Qwen3's digit-by-digit numbers against Llama's one-token numerals; docs/method.md, "J-KL")."""

from xtoken_nemo.recipes.common import Recipe, paper_config, teacher


def build(root):
    # a run of ours: the dynamic scale divides by the trainable KD value (NVIDIA's value, which
    # the paper rows use, is defined for P-KL teachers only)
    return paper_config(root, "qwen3-jkl", [teacher(root, "qwen3-4b", "jkl")], kd_scale_value="trainable")


RECIPE = Recipe(
    "qwen3-jkl",
    "Qwen3-4B, J-KL (ours: P-KL + joint-chunk term)",
    build,
    notes=[
        "not a row of the paper: compare with qwen3-pkl, which it extends (same data, steps and settings; "
        "the dynamic scale divides by the trainable KD value, qwen3-pkl's by NVIDIA's P-KL value)"
    ],
)
