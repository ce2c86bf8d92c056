"""Tiny random models on CPU with the real built-in tokenizers: a Llama-3.2-tokenizer student and
two teachers (Qwen3 tokenizer with P-KL, Llama-3.2 tokenizer with KL), a few steps on synthetic
text. (H-KL/GOLD/ULD sort the 200k-wide distributions for their ULD part, about 3 s per step on 2
CPU cores even at this size, so the CPU recipe leaves them to the GPU recipes and the tests.)
`xtoken prepare-cpu-tiny` writes its inputs to $XTOKEN_ROOT/cpu-tiny first. Same code path as the
paper runs; minutes on a laptop, CI or a one-node SLURM test."""

from xtoken_nemo.distill.config import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    KDMode,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
)
from xtoken_nemo.recipes.common import Recipe

# shapes written by `xtoken prepare-cpu-tiny` (xtoken_nemo.recipes.prepare)
TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2)
SEQ_LENGTH = 64
TEACHERS = (  # name, tokenizer, family, mode, alpha
    ("qwen3", "qwen3", "qwen3", "pkl", 0.7),
    ("llama", "llama3", "llama", "kl", 0.3),
)


def build(root):
    base = root / "cpu-tiny"
    teachers = [
        TeacherConfig(
            name=name,
            model=ModelConfig(tokenizer=tok, family=family, checkpoint=str(base / "ckpt" / f"{name}-tiny"), **TINY),
            mode=mode,
            alpha=alpha,
            projection=str(base / "w" / f"W_llama3_{tok}.safetensors") if KDMode(mode).needs_projection else None,
        )
        for name, tok, family, mode, alpha in TEACHERS
    ]
    run = root / "runs" / "cpu-tiny"
    return DistillConfig(
        name="cpu-tiny",
        student=ModelConfig(
            tokenizer="llama3", family="llama", checkpoint=str(base / "ckpt" / "llama3-tiny-student"), **TINY
        ),
        teachers=teachers,
        data=DataConfig(paths=[str(base / "data")], seq_length=SEQ_LENGTH),
        optim=OptimConfig(lr=1e-3, warmup_fraction=0.0),
        train=TrainConfig(
            train_steps=4, global_batch_size=2, micro_batch_size=1, tensor_parallel=1, loss_block_size=64
        ),
        checkpoint=CheckpointConfig(dir=str(run / "checkpoints"), save_interval=2),
        log_dir=str(run / "tb"),
    )


RECIPE = Recipe(
    "cpu-tiny",
    "tiny random models on CPU, built-in tokenizers, Qwen3-tok P-KL 0.7 + Llama-tok KL 0.3, 4 steps",
    build,
    nodes=1,
    gpus_per_node=0,
    time_limit="00:20:00",
)
