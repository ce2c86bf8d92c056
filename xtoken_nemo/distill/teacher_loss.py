"""A teacher's KD loss as one unit: what the loss needs about a teacher (:class:`TeacherLossSpec`),
the one function that builds it from the teacher's config and the tokenizers
(:func:`build_teacher_spec`), and the mode registry (:data:`MODE_LOSSES`) that maps each
:class:`~xtoken_nemo.distill.config.KDMode` to its per-chunk loss on this rank's vocabulary shard.

A new mode adds a member to ``KDMode``, its loss in :mod:`xtoken_nemo.losses`, and an entry here
(and, if it needs teacher-side data besides W, a field of the spec filled by
:func:`build_teacher_spec`). :mod:`xtoken_nemo.distill.kd` merges the chunks and calls the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from xtoken_nemo.distill.config import ConfigError, KDMode, TeacherConfig
from xtoken_nemo.losses import (
    LocalProjection,
    LossParts,
    gold_loss_parallel,
    hkl_loss_parallel,
    kl_loss_parallel,
    pkl_loss_parallel_parts,
    prepare_projection,
    uld_loss_parallel,
)
from xtoken_nemo.losses.common import hkl_pairs
from xtoken_nemo.losses.hybrid import CommonSet, prepare_common_set
from xtoken_nemo.vocab import ProjectionMatrix
from xtoken_nemo.vocab.canonical import exact_matches
from xtoken_nemo.vocab.prefix_support import PrefixSupport


@dataclass
class TeacherLossSpec:
    """What the loss needs about one teacher besides its logits."""

    config: TeacherConfig
    vocab_size: int  # real teacher vocab (W columns); padded logit columns are masked
    projection: LocalProjection | None = None  # pkl
    W: object | None = None  # ProjectionMatrix, hkl
    common_pairs: torch.Tensor | None = None  # gold: [P, 2] exact (student, teacher) pairs
    # hkl/gold/uld: the common pairs (W's argmax pairs / the exact pairs / none) laid out on this
    # rank's shards, built once here; without it the loss rebuilds them from W/common_pairs per call
    common: CommonSet | None = None
    support: PrefixSupport | None = None  # jkl: the student tokens under each teacher prefix


def check_teacher_tokenizer(tc: TeacherConfig, student_tok, teacher_tok) -> None:
    """A ``kl`` teacher must share the student's tokenizer (ConfigError otherwise). Cheap: the
    trainer calls it for every teacher before any model loads."""
    if KDMode(tc.mode) is KDMode.KL and teacher_tok.fingerprint != student_tok.fingerprint:
        raise ConfigError(
            f"teacher '{tc.name}' has mode kl but tokenizer {teacher_tok.name} differs from the student's "
            f"{student_tok.name}: use pkl/hkl/gold/uld for a cross-tokenizer teacher"
        )


def build_teacher_spec(
    tc: TeacherConfig, student_tok, teacher_tok, student_local_vocab: int, teacher_local_vocab: int
) -> TeacherLossSpec:
    """The loss spec of one teacher: W for the modes that read it (pkl and jkl also get W's columns
    for this rank's vocabulary shards: ``*_local_vocab`` = padded vocab / TP; jkl its prefix
    support), the exact-match pairs
    for gold, and for hkl/gold/uld the common set laid out on this rank's shards (the pairs depend
    on the tokenizers only: built here once, not per micro-batch)."""
    check_teacher_tokenizer(tc, student_tok, teacher_tok)
    mode = KDMode(tc.mode)
    spec = TeacherLossSpec(config=tc, vocab_size=teacher_tok.vocab_size)
    if mode.needs_projection:
        spec.W = ProjectionMatrix.load(tc.projection, student_tok, teacher_tok)
        if mode in (KDMode.PKL, KDMode.JKL):
            spec.projection = prepare_projection(spec.W, student_local_vocab, teacher_local_vocab)
    if mode.needs_support:
        spec.support = PrefixSupport.load(tc.support, student_tok, teacher_tok)
    if mode is KDMode.GOLD:
        spec.common_pairs = torch.tensor(exact_matches(student_tok, teacher_tok).pairs(), dtype=torch.int64)
    if mode in (KDMode.HKL, KDMode.GOLD, KDMode.ULD):
        if mode is KDMode.HKL:
            pairs = hkl_pairs(spec.W)  # min_weight 0, as the registry's hkl call
        elif mode is KDMode.GOLD:
            pairs = spec.common_pairs
        else:
            pairs = torch.zeros(0, 2, dtype=torch.int64)
        spec.common = prepare_common_set(
            pairs, student_local_vocab, teacher_local_vocab, student_tok.vocab_size, teacher_tok.vocab_size
        )
    return spec


# ----------------------------------------------------------------------------------------------
# the mode registry: (spec, merged student chunks s, merged teacher chunks t, student vocab size,
# the losses' keyword arguments) -> per-chunk LossParts (reduction="none")
# ----------------------------------------------------------------------------------------------
ModeLoss = Callable[[TeacherLossSpec, torch.Tensor, torch.Tensor, int, dict], LossParts]


def _uld_options(spec: TeacherLossSpec) -> dict:
    return dict(uld_topk=spec.config.uld_topk, uld_method=spec.config.uld_method)


def _kl(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    return LossParts.of(kl_loss_parallel(s, t, student_vocab, **kw))


def _pkl(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    return pkl_loss_parallel_parts(s, t, spec.projection, student_vocab, spec.vocab_size, **kw)


def _hkl(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    common = spec.W if spec.common is None else spec.common
    return LossParts.of(hkl_loss_parallel(s, t, common, student_vocab, spec.vocab_size, **_uld_options(spec), **kw))


def _gold(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    common = spec.common_pairs if spec.common is None else spec.common
    return LossParts.of(gold_loss_parallel(s, t, common, student_vocab, spec.vocab_size, **_uld_options(spec), **kw))


def _uld(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    return LossParts.of(
        uld_loss_parallel(s, t, student_vocab, spec.vocab_size, **_uld_options(spec), common=spec.common, **kw)
    )


#: KDMode -> its per-chunk loss; every member of KDMode has an entry
MODE_LOSSES: dict[KDMode, ModeLoss] = {
    KDMode.KL: _kl,
    KDMode.PKL: _pkl,
    KDMode.HKL: _hkl,
    KDMode.GOLD: _gold,
    KDMode.ULD: _uld,
    # jkl's first-position term is P-KL; kd.teacher_kd_loss adds the joint-chunk term, which reads
    # the per-position teacher logits and the realised pieces (losses/jkl.py)
    KDMode.JKL: _pkl,
}


def mode_loss(spec: TeacherLossSpec, s: torch.Tensor, t: torch.Tensor, student_vocab: int, kw: dict) -> LossParts:
    """Per-chunk LossParts of the teacher's mode on merged chunk logits ``s`` [N, V_S/tp] and ``t``
    [N, V_T/tp]; ``kw``: temperature, block_size, reduction."""
    return MODE_LOSSES[KDMode(spec.config.mode)](spec, s, t, student_vocab, kw)
