"""Per-micro-batch distillation loss on vocab-sharded logits: CE + each teacher's KD loss.

Everything here works on this rank's vocabulary shard; the collectives live in
:mod:`xtoken_nemo.losses` (``kl``, ``pkl``, ``hybrid``, ``merge``). Shapes:

- student logits [B, S, V_S_pad/tp], labels/loss_mask [B, S]
- teacher m logits [B, T_m, V_Tm_pad/tp], labels [B, T_m], chunks [B, K, 4] (-1 padded) with rows
  (s_start, s_end, t_start, t_end) in each side's label coordinates.

Chunk merging follows the teacher's ``merge`` mode on both sides. For ``chain`` the merged
chunk has a log-mass (the probability of the chunk's later actual tokens); the per-chunk loss is
then ``c_T * L_shape + KL_Bernoulli(c_T || c_S)`` (:func:`chunk_mass_kl_parts`), which is the KL of the
unnormalized chain-rule vectors. For ``first``/``logmean`` it is the shape loss alone.

Every teacher's loss is split (docs/method.md, "Trainable part and constant"; docs/losses.md): the
part that trains (KL over the outcomes the student can reach) is what enters L_KD and the dynamic
scale (with ``train.kd_scale_value="paper"`` the scale divides by NVIDIA's P-KL value for the pkl
teachers instead: :mod:`xtoken_nemo.losses.paper_pkl`); the gradient-free constant of the
unreachable outcomes (P-KL's teacher columns no W row reaches, the rest bucket of a chunk whose
student side is one token) and the teacher mass on them are only reported.

Each teacher's mode-specific loss comes from :mod:`xtoken_nemo.distill.teacher_loss` (its spec and
the mode registry). Profiler ranges (``torch.profiler.record_function``; nearly free when no
profiler runs) mark ``xtoken/ce_forward`` and ``xtoken/kd/<teacher name>``, the parts of the step
that bench/gpu_check_paper.py reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from xtoken_nemo.distill.config import KDMode, TrainConfig
from xtoken_nemo.distill.teacher_loss import TeacherLossSpec, mode_loss
from xtoken_nemo.losses import (
    LossParts,
    adaptive_alphas,
    chunk_log_mass_parallel,
    chunk_mass_kl_parts,
    merge_chunks_parallel,
    scale_kd_ce,
    teacher_confidence_parallel,
)
from xtoken_nemo.losses.common import ChunkSpans, to_device
from xtoken_nemo.losses.jkl import jkl_term_parallel, joint_entries
from xtoken_nemo.losses.paper_pkl import paper_pkl_value_parallel
from xtoken_nemo.losses.weighting import FIXED_WEIGHTINGS, dynamic_kd_scale
from xtoken_nemo.models.build import mask_padded_vocab

#: value written into padded vocabulary columns before any softmax
PAD_LOGIT = -1e4


@dataclass(frozen=True)
class KDOptions:
    """The run's loss settings (``train.*``), fixed for the run."""

    kd_scaling: str = "dynamic"
    alpha_mode: str = "static"
    alpha_temperature: float = 1.0
    block_size: int = 1024  # train.loss_block_size
    kd_scale_value: str = "trainable"  # train.kd_scale_value: what the dynamic scale divides by

    @classmethod
    def from_config(cls, train: TrainConfig) -> KDOptions:
        return cls(
            kd_scaling=train.kd_scaling,
            alpha_mode=train.alpha_mode,
            alpha_temperature=train.alpha_temperature,
            block_size=train.loss_block_size,
            kd_scale_value=train.kd_scale_value,
        )


@dataclass
class TeacherKD:
    """One teacher's KD loss on one micro-batch: chunk means (0-dim) of the trainable part (in
    L_KD), of the gradient-free constant and of the teacher mass out of the student's reach
    (both detached; :class:`~xtoken_nemo.losses.LossParts`), and the teacher's merged chunk
    logits [N, V_T_pad/tp] with the chunks' first teacher positions [N] on the logits' device (for
    confidences; None without chunks)."""

    trainable: torch.Tensor
    constant: torch.Tensor
    uncovered: torch.Tensor
    teacher_chunks: torch.Tensor | None
    teacher_first: torch.Tensor | None  # [N] each chunk's first position in the flattened [B*T] teacher side
    paper: torch.Tensor | None = None  # NVIDIA's P-KL value (0-dim, detached): pkl teachers, kd_scale_value="paper"


@dataclass
class StepLosses:
    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor | None
    per_teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable part (in L_KD)
    per_teacher_const: dict[str, torch.Tensor] = field(default_factory=dict)  # gradient-free constant (reported)
    per_teacher_uncovered: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher mass out of reach
    alphas: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-dim tensors, one per teacher
    kd_scale: torch.Tensor | None = None  # the factor that multiplies L_KD in total (relative to L_CE)
    kd_abs: torch.Tensor | None = None  # |L_KD| (detached): the denominator of the batch's dynamic ratio
    per_teacher_paper: dict[str, torch.Tensor] = field(default_factory=dict)  # NVIDIA's P-KL (kd_scale_value="paper")
    confidences: dict[str, torch.Tensor] = field(default_factory=dict)  # adaptive alphas' scores (0-dim, detached)


def student_ce(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token CE over loss_mask, via megatron-core's vocab-parallel cross-entropy, with
    Megatron's padded vocabulary columns masked (the KD losses mask them themselves)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    rank = parallel_state.get_tensor_model_parallel_rank()
    with record_function("xtoken/ce_forward"):
        # a new tensor either way: vocab_parallel_cross_entropy modifies its fp32 input in place
        masked = mask_padded_vocab(logits.float(), vocab_size, rank, fill=PAD_LOGIT)
        per_token = vocab_parallel_cross_entropy(masked if masked is not logits else logits.clone(), labels)
        mask = loss_mask.float()
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _flat_chunks(chunks: torch.Tensor, s_len: int, t_len: int) -> tuple[ChunkSpans, ChunkSpans]:
    """[B, K, 4] host chunk table (-1 padded) -> each side's chunks as spans of positions of the
    [B*S] / [B*T] flattened logits, in table order (sequence by sequence). Vectorised on the
    table's numpy view: no tensor read, no per-chunk Python."""
    table = chunks.detach().cpu().numpy().astype(np.int64, copy=False)
    b = np.repeat(np.arange(table.shape[0], dtype=np.int64), table.shape[1])
    rows = table.reshape(-1, 4)
    keep = rows[:, 0] >= 0
    rows, b = rows[keep], b[keep]
    s_off, t_off = b * s_len, b * t_len
    return (
        ChunkSpans(rows[:, 0] + s_off, rows[:, 1] + s_off),
        ChunkSpans(rows[:, 2] + t_off, rows[:, 3] + t_off),
    )


def teacher_kd_loss(
    spec: TeacherLossSpec,
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    student_vocab_size: int,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    chunks: torch.Tensor,
    block_size: int,
    teacher_labels_host: torch.Tensor | None = None,
    paper_value: bool = False,
) -> TeacherKD:
    """One teacher's KD loss over this micro-batch's chunks (means over the chunks). ``chunks``
    stays on the host; the indices built from it reach the logits' device in non-blocking copies.
    ``teacher_labels_host``: the teacher labels on the host (jkl reads the realised pieces from
    them; without it they are copied from the device, which waits for it). ``paper_value``: a pkl
    teacher also gets NVIDIA's P-KL value (``TeacherKD.paper``), on the same chunk logits as its
    loss (the chain merge's log-mass left out, as NVIDIA has none)."""
    cfg = spec.config
    B, S, Vs = student_logits.shape
    T = teacher_logits.shape[1]
    s_spans, t_spans = _flat_chunks(chunks, S, T)
    if not len(s_spans):
        zero = student_logits.sum() * 0.0
        paper = zero.detach() if paper_value and KDMode(cfg.mode) is KDMode.PKL else None
        return TeacherKD(zero, zero.detach(), zero.detach(), None, None, paper)
    s_flat, t_flat = student_logits.reshape(B * S, Vs), teacher_logits.reshape(B * T, -1)
    s_targets, t_targets = student_labels.reshape(-1), teacher_labels.reshape(-1)
    # [2, N] both sides' first positions, in one copy (the chunk validation is the merges')
    firsts = to_device(student_logits.device, torch.from_numpy(np.stack([s_spans.starts, t_spans.starts])))[0]
    if cfg.merge == "logmean":
        s_merged = merge_chunks_parallel(s_flat, s_spans, student_vocab_size, targets=s_targets, mode="logmean")
        with torch.no_grad():
            t_merged = merge_chunks_parallel(t_flat, t_spans, spec.vocab_size, targets=t_targets, mode="logmean")
        s, t = s_merged.logits, t_merged.logits.detach()
    else:
        # first/chain: the chunk's shape is its first position's distribution. Every loss
        # softmaxes its input, so the raw first-position logits serve as they are (no extra
        # [N, V] normalization pass); chain adds the log-mass of the later actual tokens.
        s = s_flat[firsts[0]]
        t = t_flat[firsts[1]].detach()
        if cfg.merge == "chain":
            s_mass = chunk_log_mass_parallel(s_flat, s_spans, student_vocab_size, s_targets)
            with torch.no_grad():
                t_mass = chunk_log_mass_parallel(t_flat, t_spans, spec.vocab_size, t_targets)
    kw = dict(temperature=cfg.temperature, block_size=block_size, reduction="none")
    per_chunk = mode_loss(spec, s, t, student_vocab_size, kw)
    paper = None
    if paper_value and KDMode(cfg.mode) is KDMode.PKL:
        paper = paper_pkl_value_parallel(
            s, t, spec.projection, student_vocab_size, spec.vocab_size, cfg.temperature, block_size=block_size
        )
    if cfg.merge == "chain":
        per_chunk = chunk_mass_kl_parts(s_mass, t_mass, per_chunk, reduction="none")
    if spec.support is not None:  # jkl: the joint-chunk term on top of the P-KL term
        host_labels = teacher_labels if teacher_labels_host is None else teacher_labels_host
        entries = joint_entries(spec.support, s_spans, t_spans, host_labels.reshape(-1))
        joint = jkl_term_parallel(
            s, t_flat.detach(), entries, student_vocab_size, spec.vocab_size, cfg.temperature, block_size=block_size
        )
        per_chunk = LossParts(per_chunk.trainable + cfg.joint_weight * joint, per_chunk.constant, per_chunk.uncovered)
    return TeacherKD(
        per_chunk.trainable.mean(),
        per_chunk.constant.detach().mean(),
        per_chunk.uncovered.detach().mean(),
        t,
        firsts[1],
        paper,
    )


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    student_vocab_size: int,
    teachers: list[TeacherLossSpec],
    teacher_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    options: KDOptions,
    *,
    kd_scale: float | None = None,
    alphas: list[float] | None = None,
) -> StepLosses:
    """Total loss of one micro-batch. teacher_outputs[m] = (logits, labels, chunks) or (logits,
    labels, chunks, host labels); ``options``: the run's loss settings.

    ``kd_scale`` (dynamic scaling only) and ``alphas`` (adaptive alphas only), when given, are
    used instead of this micro-batch's own ratio ``sg(L_CE / |L_KD|)`` and its own softmax of
    teacher confidences: the trainer passes the previous global step's values
    (``train.kd_scale_source="previous_step"``, docs/losses.md). Python floats: applying them
    needs no host-to-device copy. The confidences are computed (and returned) either way, so the
    trainer can form the next step's alphas.
    """
    kd_scaling, alpha_mode = options.kd_scaling, options.alpha_mode
    ce = student_ce(student_logits, labels, loss_mask, student_vocab_size)
    if not teachers or kd_scaling == "ce_only":
        return StepLosses(total=ce, ce=ce, kd=None)
    losses, consts, uncovered, confidences, paper = {}, {}, {}, [], {}
    paper_value = options.kd_scale_value == "paper" and kd_scaling == "dynamic"
    for spec, (t_logits, t_labels, chunks, *host_labels) in zip(teachers, teacher_outputs):
        name = spec.config.name
        with record_function(f"xtoken/kd/{name}"):
            out = teacher_kd_loss(
                spec,
                student_logits,
                labels,
                student_vocab_size,
                t_logits,
                t_labels,
                chunks,
                options.block_size,
                host_labels[0] if host_labels else None,
                paper_value=paper_value,
            )
        losses[name], consts[name], uncovered[name] = out.trainable, out.constant, out.uncovered
        if out.paper is not None:
            paper[name] = out.paper
        merged_teacher = out.teacher_chunks
        if alpha_mode != "static" and merged_teacher is not None:
            # confidence, higher = more sure: mean log-prob of the chunks' first actual tokens
            # ("ce"), negative entropy, or mean max-probability of the merged teacher chunks
            targets = t_labels.reshape(-1)[out.teacher_first] if alpha_mode == "ce" else None
            confidences.append(
                teacher_confidence_parallel(merged_teacher, alpha_mode, spec.vocab_size, targets=targets)
            )
    names = [spec.config.name for spec in teachers]
    adaptive = alpha_mode != "static" and len(confidences) == len(teachers)
    if adaptive and alphas is None:
        alpha_vec = adaptive_alphas(confidences, options.alpha_temperature).to(ce.device)
    else:
        given = alphas if adaptive else [spec.config.alpha for spec in teachers]
        # fill kernels, not a host-to-device copy (which would wait for the device on GPU)
        alpha_vec = torch.stack([ce.new_full((), float(a), dtype=torch.float32) for a in given])
    # alphas are valid by construction (static: the config checks they sum to 1; adaptive: a
    # softmax), so the weighted sum skips combine_teachers' host-side checks: no device sync here.
    # L_KD (and through it the dynamic scale) is made of the trainable parts only.
    kd = (alpha_vec * torch.stack([losses[n].float() for n in names])).sum()
    # what the dynamic scale divides by: L_KD itself, or (kd_scale_value="paper") the same sum with
    # NVIDIA's P-KL value in place of each pkl teacher's trainable part; detached either way
    scale_kd = kd
    if paper:
        scale_kd = (alpha_vec * torch.stack([paper.get(n, losses[n]).detach().float() for n in names])).sum()
    if kd_scaling == "dynamic" and kd_scale is not None:
        # a constant factor (the previous step's global ratio): stop-gradient by construction
        total = float(kd_scale) * kd + ce
        applied = ce.detach().new_full((), float(kd_scale), dtype=torch.float32)
    elif kd_scaling == "dynamic":
        applied = dynamic_kd_scale(scale_kd, ce)
        total = applied * kd + ce
    else:
        total = scale_kd_ce(kd, ce, kd_scaling)
        w_kd, w_ce = FIXED_WEIGHTINGS[kd_scaling]
        applied = ce.detach().new_full((), w_kd / w_ce, dtype=torch.float32)
    return StepLosses(
        total=total,
        ce=ce,
        kd=kd,
        per_teacher=losses,
        per_teacher_const=consts,
        per_teacher_uncovered=uncovered,
        kd_scale=applied,
        kd_abs=scale_kd.detach().abs(),
        per_teacher_paper=paper,
        alphas={n: a for n, a in zip(names, alpha_vec.detach())},
        confidences=dict(zip(names, (c.detach().float().reshape(()) for c in confidences))) if adaptive else {},
    )
