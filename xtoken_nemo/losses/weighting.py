"""Multi-teacher combination and KD/CE scaling (docs/method.md, "Multi-teacher weighting" and
"Dynamic KD/CE scaling").

    L_KD = sum_m alpha_m * L_m,   L_m = mean over teacher m's chunks of its per-chunk loss
    L    = sg(L_CE / L_KD) * L_KD + L_CE                        (dynamic scaling, the default)
    L    = w_KD * L_KD + w_CE * L_CE                             (fixed weightings, options)

Alphas are static (given, non-negative, summing to 1) or adaptive: a softmax over teachers of a
confidence score divided by a temperature, computed without gradient. Scores come from
:func:`teacher_confidence` (reference, unsharded) or
:func:`xtoken_nemo.losses.merge.teacher_confidence_parallel` (vocab-parallel):

- ``ce``:      mean cross-entropy of the teacher on the target chunk tokens (lower = more confident)
- ``entropy``: mean entropy of the teacher's chunk distributions (lower = more confident)
- ``maxprob``: mean of the teacher's largest probability (higher = more confident)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses.checks import check_alphas, check_finite, check_logits, check_temperature

CONFIDENCE_KINDS = ("ce", "entropy", "maxprob")

FIXED_WEIGHTINGS: dict[str, tuple[float, float]] = {
    # (w_KD, w_CE); the paper compares three fixed weightings; these values are ours.
    "kd_heavy": (0.9, 0.1),
    "balanced": (0.5, 0.5),
    "ce_heavy": (0.1, 0.9),
}


def teacher_confidence(teacher_logits: torch.Tensor, kind: str, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar confidence of one teacher on its chunks (higher = more confident), no gradient.

    teacher_logits [N, V_T] chunk-merged; targets [N] teacher-vocab ids of the chunks' first
    actual tokens (only for ``kind="ce"``).
    """
    if kind not in CONFIDENCE_KINDS:
        raise LossInputError(f"unknown confidence {kind!r}; choose one of {CONFIDENCE_KINDS}")
    check_logits("teacher logits", teacher_logits)
    with torch.no_grad():
        logp = torch.log_softmax(teacher_logits.float(), dim=-1)
        if kind == "ce":
            if targets is None:
                raise LossInputError("confidence 'ce' needs the target token ids of the teacher's chunks")
            targets = torch.as_tensor(targets, dtype=torch.int64)
            if targets.shape != teacher_logits.shape[:1]:
                raise LossInputError(f"targets must be [{teacher_logits.shape[0]}], got {tuple(targets.shape)}")
            return logp.gather(1, targets[:, None]).mean()  # = -CE
        if kind == "entropy":
            return (logp.exp() * logp).sum(-1).mean()  # = -entropy
        return logp.max(dim=-1).values.exp().mean()


def adaptive_alphas(confidences: Sequence[torch.Tensor | float], temperature: float = 1.0) -> torch.Tensor:
    """[M] alphas = softmax(confidence / temperature) over teachers (stop-gradient), float32 on the
    confidences' device: the per-micro-batch form (``train.kd_scale_source="micro_batch"``)."""
    check_temperature(temperature)
    c = torch.stack([torch.as_tensor(x, dtype=torch.float32).detach().reshape(()) for x in confidences])
    check_finite("teacher confidences", c)
    return torch.softmax(c / temperature, dim=0)


def adaptive_alphas_host(confidences: Sequence[float], temperature: float = 1.0) -> list[float] | None:
    """The same softmax as :func:`adaptive_alphas` on host floats (the previous step's reduced mean
    confidences, which the trainer applies to the next step): no tensor, so no device sync.
    None when a scaled confidence is not finite (the caller keeps its previous alphas)."""
    check_temperature(temperature)
    scaled = [c / temperature for c in confidences]
    if not all(math.isfinite(x) for x in scaled):
        return None
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    return [w / sum(weights) for w in weights]


def combine_teachers(losses: Sequence[torch.Tensor], alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """L_KD = sum_m alpha_m * L_m. Each L_m is already a mean over that teacher's chunks.

    Static alphas must be non-negative and sum to 1 (LossInputError otherwise); adaptive alphas
    from :func:`adaptive_alphas` satisfy this by construction.
    """
    if len(losses) == 0:
        raise LossInputError("no teacher losses to combine; configure at least one teacher")
    a = check_alphas(alphas.detach() if isinstance(alphas, torch.Tensor) else alphas, len(losses))
    for m, loss in enumerate(losses):
        if loss.dim() != 0:
            raise LossInputError(f"teacher {m} loss must be a scalar (mean over its chunks), got {tuple(loss.shape)}")
        check_finite(f"teacher {m} loss", loss.detach())
    return sum(float(a[m]) * losses[m] for m in range(len(losses)))


def dynamic_kd_scale(kd_loss: torch.Tensor, ce_loss: torch.Tensor, min_kd: float = 1e-12) -> torch.Tensor:
    """The factor sg(L_CE / |L_KD|) that multiplies L_KD in the dynamic scaling; 0 when
    |L_KD| <= min_kd. A tensor (no host synchronization: the trainer logs it as is)."""
    magnitude = kd_loss.detach().abs()
    return torch.where(magnitude > min_kd, ce_loss.detach() / magnitude.clamp_min(min_kd), torch.zeros_like(magnitude))


def scale_kd_ce(
    kd_loss: torch.Tensor,
    ce_loss: torch.Tensor,
    mode: str | tuple[float, float] = "dynamic",
    min_kd: float = 1e-12,
) -> torch.Tensor:
    """Total loss from L_KD and L_CE.

    ``dynamic``: sg(L_CE / |L_KD|) * L_KD + L_CE: the KD term has the CE term's magnitude and its
    gradient is grad(L_KD) * L_CE / |L_KD| (the paper's sg(L_CE / L_KD) * L_KD for the usual
    positive L_KD). The absolute value matters for GOLD/H-KL, whose common-set KL over partial
    distributions (as in TRL) can be negative: a negative scale would turn descent on L_KD into
    ascent. If |L_KD| <= min_kd (teacher and student agree) the KD term is dropped for this step
    (its gradient would be 0 * inf). A name from FIXED_WEIGHTINGS or a (w_KD, w_CE) pair gives a
    fixed weighting.
    """
    check_finite("KD loss", kd_loss.detach())
    check_finite("CE loss", ce_loss.detach())
    if mode == "dynamic":
        return dynamic_kd_scale(kd_loss, ce_loss, min_kd) * kd_loss + ce_loss
    if isinstance(mode, str):
        if mode not in FIXED_WEIGHTINGS:
            raise LossInputError(
                f"unknown KD/CE scaling {mode!r}; choose 'dynamic', {sorted(FIXED_WEIGHTINGS)} or (w_kd, w_ce)"
            )
        w_kd, w_ce = FIXED_WEIGHTINGS[mode]
    else:
        w_kd, w_ce = (float(x) for x in mode)
        if w_kd < 0 or w_ce < 0:
            raise LossInputError(f"fixed KD/CE weights must be non-negative, got {mode!r}")
    return w_kd * kd_loss + w_ce * ce_loss
