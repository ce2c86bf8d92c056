"""Shared pieces of the recipes: where the converted checkpoints, W files and data live, the
paper's training settings, and the paper's table row each run reproduces.

Paths come from one root directory, ``XTOKEN_ROOT`` (or ``--root``), laid out as::

    $XTOKEN_ROOT/
      ckpt/llama-3.2-1b   ckpt/llama-3.2-3b   ckpt/qwen3-4b   ckpt/phi-4-mini   (xtoken convert hf-to-mcore)
      w/W_llama3_qwen3.safetensors   w/W_llama3_phi4mini.safetensors          (xtoken build-w)
      w/S_llama3_qwen3.safetensors   (J-KL's prefix support, jkl teachers)     (xtoken build-support)
      data/climbmix/                                                          (xtoken preprocess)
      runs/<recipe>/checkpoints  runs/<recipe>/tb  runs/<recipe>/slurm-<jobid>.out

Every path is an ordinary config field, so ``data.paths=[/lustre/climbmix]`` or
``teachers.0.model.checkpoint=/other/qwen3`` overrides one without moving the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

ROOT_ENV = "XTOKEN_ROOT"

# The paper: Llama-3.2-1B student, 30,000 steps, global batch 768, context 4096, AdamW lr 5e-5,
# 5% warmup then cosine, weight decay 0.1, clipping 1.0, on 128 H100 (16 nodes x 8).
PAPER_STEPS = 30_000
PAPER_GLOBAL_BATCH = 768
PAPER_SEQ_LENGTH = 4096
PAPER_NODES = 16
PAPER_GPUS_PER_NODE = 8

# converted checkpoints under $XTOKEN_ROOT/ckpt and the tokenizer each one uses
MODELS = {
    "llama-1b": ("llama-3.2-1b", "llama3", "llama"),
    "llama-3b": ("llama-3.2-3b", "llama3", "llama"),
    "qwen3-4b": ("qwen3-4b", "qwen3", "qwen3"),
    "phi4-mini": ("phi-4-mini", "phi4mini", "phi3"),
}


def default_root() -> Path:
    """``$XTOKEN_ROOT`` or the current directory."""
    return Path(os.environ.get(ROOT_ENV) or ".").expanduser().resolve()


@dataclass(frozen=True)
class PaperRow:
    """The row of docs/method.md, "The paper's runs", a recipe reproduces (None: the paper gives no figure)."""

    setting: str
    method: str
    gsm8k: float | None = None
    avg: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A named run: ``build(root)`` returns its DistillConfig; ``nodes`` x ``gpus_per_node`` is
    the allocation the launcher asks for by default."""

    name: str
    description: str
    build: Callable[[Path], DistillConfig]
    nodes: int = PAPER_NODES
    gpus_per_node: int = PAPER_GPUS_PER_NODE
    paper: PaperRow | None = None
    time_limit: str = "04:00:00"
    notes: list[str] = field(default_factory=list)

    def config(self, root: str | os.PathLike | None = None) -> DistillConfig:
        return self.build(Path(root).expanduser().resolve() if root else default_root())


def model(root: Path, key: str) -> ModelConfig:
    directory, tokenizer, family = MODELS[key]
    return ModelConfig(tokenizer=tokenizer, family=family, checkpoint=str(root / "ckpt" / directory))


def w_file(root: Path, teacher_tokenizer: str, student_tokenizer: str = "llama3") -> str:
    return str(root / "w" / f"W_{student_tokenizer}_{teacher_tokenizer}.safetensors")


def support_file(root: Path, teacher_tokenizer: str, student_tokenizer: str = "llama3") -> str:
    return str(root / "w" / f"S_{student_tokenizer}_{teacher_tokenizer}.safetensors")


def teacher(root: Path, key: str, mode: str, alpha: float = 1.0, merge: str = "chain") -> TeacherConfig:
    """A teacher from $XTOKEN_ROOT/ckpt; cross-tokenizer ones get their W (and jkl its prefix
    support) from $XTOKEN_ROOT/w (GOLD and ULD need none, but GOLD's exact common set is computed
    from the tokenizers)."""
    mc = model(root, key)
    name = key.replace("-", "_")
    projection = w_file(root, mc.tokenizer) if KDMode(mode).needs_projection else None
    support = support_file(root, mc.tokenizer) if KDMode(mode).needs_support else None
    return TeacherConfig(
        name=name, model=mc, mode=mode, alpha=alpha, projection=projection, support=support, merge=merge
    )


def paper_config(root: Path, name: str, teachers: list[TeacherConfig], **train) -> DistillConfig:
    """The paper's settings for a Llama-3.2-1B student on NemotronClimbMix. The dynamic scale
    divides by NVIDIA's P-KL value for P-KL teachers (``kd_scale_value="paper"``, the paper's
    effective KD weight; docs/losses.md, "Which value sets the dynamic scale")."""
    run = root / "runs" / name
    train.setdefault("kd_scale_value", "paper")
    return DistillConfig(
        name=name,
        student=model(root, "llama-1b"),
        teachers=teachers,
        data=DataConfig(paths=[str(root / "data" / "climbmix")], seq_length=PAPER_SEQ_LENGTH),
        optim=OptimConfig(lr=5e-5, warmup_fraction=0.05, weight_decay=0.1, clip_grad=1.0),
        # a progress line every 10 steps (about 15 s at the on-paper 17k tokens/s per GPU): 3,000 per run
        train=TrainConfig(
            train_steps=PAPER_STEPS,
            global_batch_size=PAPER_GLOBAL_BATCH,
            micro_batch_size=1,
            tensor_parallel=1,
            log_interval=10,
            **train,
        ),
        checkpoint=CheckpointConfig(dir=str(run / "checkpoints"), save_interval=500),
        log_dir=str(run / "tb"),
    )


def run_dir(cfg: DistillConfig) -> Path:
    """The run's directory: the parent of its checkpoint dir (where the launcher writes the job
    script, the resolved config and SLURM's output)."""
    return Path(cfg.checkpoint.dir).parent
