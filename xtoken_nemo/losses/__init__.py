"""Distillation losses: reference (plain PyTorch oracle) and vocab-parallel implementations.

- :mod:`xtoken_nemo.losses.reference`: unsharded KL, ULD, GOLD, P-KL, H-KL, chunk merging.
- :mod:`xtoken_nemo.losses.parallel`: the same losses on tensor-parallel vocab shards
  (megatron-core ``parallel_state``); at tp=1 the single-device path.
- :mod:`xtoken_nemo.losses.weighting`: multi-teacher alphas and KD/CE scaling.
"""

from xtoken_nemo.losses.parallel import (
    LocalProjection,
    chunk_log_mass_parallel,
    gold_loss_parallel,
    hkl_loss_parallel,
    kl_loss_parallel,
    merge_chunks_parallel,
    pkl_loss_parallel,
    pkl_loss_parallel_parts,
    prepare_projection,
    teacher_confidence_parallel,
    uld_loss_parallel,
)
from xtoken_nemo.losses.reference import (
    LossParts,
    MergedChunks,
    chunk_mass_kl,
    chunk_mass_kl_parts,
    gold_loss,
    hkl_loss,
    hkl_pairs,
    kl_loss,
    merge_chunks,
    pkl_loss,
    pkl_loss_parts,
    uld_loss,
)
from xtoken_nemo.losses.weighting import adaptive_alphas, combine_teachers, scale_kd_ce, teacher_confidence

__all__ = [
    "LocalProjection",
    "LossParts",
    "MergedChunks",
    "adaptive_alphas",
    "chunk_log_mass_parallel",
    "chunk_mass_kl",
    "chunk_mass_kl_parts",
    "combine_teachers",
    "gold_loss",
    "gold_loss_parallel",
    "hkl_loss",
    "hkl_loss_parallel",
    "hkl_pairs",
    "kl_loss",
    "kl_loss_parallel",
    "merge_chunks",
    "merge_chunks_parallel",
    "pkl_loss",
    "pkl_loss_parallel",
    "pkl_loss_parallel_parts",
    "pkl_loss_parts",
    "prepare_projection",
    "scale_kd_ce",
    "teacher_confidence",
    "teacher_confidence_parallel",
    "uld_loss",
    "uld_loss_parallel",
]
