"""Distillation losses: reference (plain PyTorch oracle) and vocab-parallel implementations.

- :mod:`~xtoken_nemo.losses.common`: what both share: ``LossParts``, ``MergedChunks``, the
  floors and clamps, ``MERGE_MODES``, ``ULD_METHODS``, chunk index, GOLD weights, H-KL pairs.
- :mod:`~xtoken_nemo.losses.reference`: unsharded KL, ULD, GOLD, P-KL, H-KL, J-KL's term, chunk merging
  (plain PyTorch, the oracle of the tests).
- The same losses on tensor-parallel vocab shards (megatron-core ``parallel_state``; at tp=1 the
  single-device path), one file per concept:
  :mod:`~xtoken_nemo.losses.shard` (shards, checks, block helpers),
  :mod:`~xtoken_nemo.losses.kl` (same-tokenizer KL), :mod:`~xtoken_nemo.losses.pkl` (P-KL),
  :mod:`~xtoken_nemo.losses.jkl` (J-KL's joint-chunk term),
  :mod:`~xtoken_nemo.losses.hybrid` (GOLD, H-KL, ULD; histogram ULD in
  :mod:`~xtoken_nemo.losses.uld_hist`), :mod:`~xtoken_nemo.losses.merge` (chunk merge, teacher
  confidence), :mod:`~xtoken_nemo.losses.paper_pkl` (NVIDIA's P-KL value, for the dynamic scale
  under ``train.kd_scale_value="paper"``); collectives in :mod:`~xtoken_nemo.losses.comm`, input
  checks in :mod:`~xtoken_nemo.losses.checks`.
- :mod:`~xtoken_nemo.losses.weighting`: multi-teacher alphas and KD/CE scaling.
"""

from xtoken_nemo.losses.common import MERGE_MODES, ULD_METHODS, LossParts, MergedChunks
from xtoken_nemo.losses.hybrid import gold_loss_parallel, hkl_loss_parallel, uld_loss_parallel
from xtoken_nemo.losses.jkl import jkl_term_parallel, joint_entries
from xtoken_nemo.losses.kl import kl_loss_parallel
from xtoken_nemo.losses.merge import chunk_log_mass_parallel, merge_chunks_parallel, teacher_confidence_parallel
from xtoken_nemo.losses.pkl import LocalProjection, pkl_loss_parallel, pkl_loss_parallel_parts, prepare_projection
from xtoken_nemo.losses.reference import (
    chunk_mass_kl,
    chunk_mass_kl_parts,
    gold_loss,
    hkl_loss,
    hkl_pairs,
    jkl_term,
    kl_loss,
    merge_chunks,
    pkl_loss,
    pkl_loss_parts,
    uld_loss,
)
from xtoken_nemo.losses.weighting import (
    adaptive_alphas,
    adaptive_alphas_host,
    combine_teachers,
    scale_kd_ce,
    teacher_confidence,
)

__all__ = [
    "MERGE_MODES",
    "ULD_METHODS",
    "LocalProjection",
    "LossParts",
    "MergedChunks",
    "adaptive_alphas",
    "adaptive_alphas_host",
    "chunk_log_mass_parallel",
    "chunk_mass_kl",
    "chunk_mass_kl_parts",
    "combine_teachers",
    "gold_loss",
    "gold_loss_parallel",
    "hkl_loss",
    "hkl_loss_parallel",
    "hkl_pairs",
    "jkl_term",
    "jkl_term_parallel",
    "joint_entries",
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
