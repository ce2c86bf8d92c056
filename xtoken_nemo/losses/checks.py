"""Input validation shared by the reference and the vocab-parallel losses.

Every check raises :class:`~xtoken_nemo.errors.LossInputError` with a message that says what was
wrong and what to do, never a silent NaN loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch

from xtoken_nemo.errors import LossInputError


def check_logits(
    name: str, logits: torch.Tensor, vocab_size: int | None = None, ndim: int = 2, finite: bool = True
) -> None:
    """[N, V] floating logits, N > 0, finite (unless ``finite=False``); ``vocab_size`` (if given) == V."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise LossInputError(f"{name} must be a floating-point tensor, got {type(logits).__name__}")
    if logits.dim() != ndim:
        raise LossInputError(
            f"{name} must be [chunks, vocab] (chunk-merged logits), got shape {tuple(logits.shape)}; "
            "merge per-position logits with merge_chunks first"
        )
    if logits.shape[0] == 0:
        raise LossInputError(
            f"{name} has no chunks (empty chunk list): nothing to distill; skip the loss for this batch"
        )
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise LossInputError(f"{name} has vocab dim {logits.shape[-1]} but {vocab_size} was expected")
    if finite:
        check_finite(name, logits)


_DEFERRED = contextvars.ContextVar("xtoken_nonfinite_deferred", default=False)


@contextlib.contextmanager
def nonfinite_checks_deferred() -> Iterator[None]:
    """Inside this block the losses do not check their inputs and results for NaN/inf: the caller
    (the trainer) checks once per global step over every rank and skips the step everywhere.

    Raising here would be wrong in a multi-rank job: the rank that raises leaves while the others
    wait in the next collective until the NCCL timeout; and each check costs a device-to-host
    synchronization (plus an all-reduce for the vocab-parallel ones) per loss call.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def nonfinite_checks_enabled() -> bool:
    return not _DEFERRED.get()


def check_finite(name: str, t: torch.Tensor) -> None:
    if _DEFERRED.get():
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LossInputError(
            f"{name} contains {bad} NaN/inf values; check the model forward (overflow in bf16, "
            "a masked position) before the loss"
        )


def check_same_chunks(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise LossInputError(
            f"student has {student.shape[0]} chunks but teacher has {teacher.shape[0]}; both sides must "
            "be merged with the same alignment"
        )


def check_projection_shape(W_shape: tuple[int, int], student_vocab: int, teacher_vocab: int) -> None:
    if tuple(W_shape) != (student_vocab, teacher_vocab):
        raise LossInputError(
            f"W has shape {tuple(W_shape)} but the logits have student vocab {student_vocab} and teacher "
            f"vocab {teacher_vocab}; W must be [V_S, V_T] for exactly these tokenizers (rebuild it with "
            "`xtoken build-w`, or pass the real, unpadded vocab sizes)"
        )


def check_pairs(pairs: torch.Tensor, student_vocab: int, teacher_vocab: int) -> torch.Tensor:
    """[P, 2] int (student_id, teacher_id), ids in range, each student id at most once."""
    pairs = torch.as_tensor(pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point():
        raise LossInputError(
            f"common pairs must be an integer [P, 2] tensor of (student_id, teacher_id), got {tuple(pairs.shape)}"
        )
    pairs = pairs.to(torch.int64)
    if pairs.numel():
        if int(pairs[:, 0].min()) < 0 or int(pairs[:, 0].max()) >= student_vocab:
            raise LossInputError(f"common pairs name a student id outside [0, {student_vocab})")
        if int(pairs[:, 1].min()) < 0 or int(pairs[:, 1].max()) >= teacher_vocab:
            raise LossInputError(f"common pairs name a teacher id outside [0, {teacher_vocab})")
        if torch.unique(pairs[:, 0]).numel() != pairs.shape[0]:
            raise LossInputError(
                "a student id appears in more than one common pair; each student token may match one teacher token"
            )
    return pairs


def check_alphas(alphas: Sequence[float] | torch.Tensor, num_teachers: int, tol: float = 1e-4) -> torch.Tensor:
    """Static teacher weights: one per teacher, non-negative, summing to 1."""
    a = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    if a.numel() != num_teachers:
        raise LossInputError(f"got {a.numel()} alphas for {num_teachers} teachers; give one weight per teacher")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise LossInputError(f"alphas {a.tolist()} must be finite and non-negative")
    if not math.isclose(float(a.sum()), 1.0, abs_tol=tol):
        raise LossInputError(
            f"alphas {a.tolist()} sum to {float(a.sum()):.6g}, not 1; normalize them (e.g. 0.8 and 0.2)"
        )
    return a


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise LossInputError(f"temperature must be a positive finite number, got {temperature!r}")


def check_topk(topk: int) -> None:
    """A count of teacher columns to keep (NVIDIA's P-KL value): a positive int."""
    if not isinstance(topk, int) or topk < 1:
        raise LossInputError(f"topk must be a positive int, got {topk!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "none"):
        raise LossInputError(f"reduction must be 'mean' (over chunks) or 'none' (per chunk), got {reduction!r}")


def reduce_chunks(per_chunk: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_chunk.mean() if reduction == "mean" else per_chunk
