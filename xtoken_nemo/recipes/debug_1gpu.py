"""One GPU, tiny batch, few steps, the real models and every loss path: Phi-4-mini (H-KL) +
Qwen3-4B (P-KL) + Llama-3.2-3B (KL) on the paper's data, context 2048, global batch 8. For
checking a cluster set-up (container, paths, memory) before a 128-GPU run."""

from xtoken_nemo.recipes.common import Recipe, paper_config, teacher


def build(root):
    teachers = [
        teacher(root, "phi4-mini", "hkl", 0.6),
        teacher(root, "qwen3-4b", "pkl", 0.2),
        teacher(root, "llama-3b", "kl", 0.2),
    ]
    cfg = paper_config(root, "debug-1gpu", teachers, kd_scale_value="trainable")  # not a paper row: ours
    cfg.data.seq_length = 2048
    cfg.train.train_steps = 20
    cfg.train.global_batch_size = 8
    cfg.checkpoint.save_interval = 10
    return cfg


RECIPE = Recipe(
    "debug-1gpu",
    "1 GPU smoke run of the 3-teacher mixture: 20 steps, batch 8, context 2048",
    build,
    nodes=1,
    gpus_per_node=1,
    time_limit="00:30:00",
)
