"""What the reference and the vocab-parallel losses share: constants, mode lists, result types and
the small helpers both sides call.

- Constants: the floors and clamps (``DEFAULT_EPS``, ``PROB_FLOOR``, ``MASS_CLAMP``), the value of
  padded vocabulary columns (``MASK_VALUE``) and the default token block (``DEFAULT_BLOCK``).
- Mode lists: ``MERGE_MODES`` (chunk merges) and ``ULD_METHODS`` (how the parallel ULD is computed);
  the one definition of each.
- Result types: :class:`LossParts` (a KD loss split into the part that trains, the gradient-free
  constant and the uncovered teacher mass; see docs/method.md, "Trainable part and constant") and
  :class:`MergedChunks` (a chunk merge's normalized shape ``[N, V]`` and log-mass ``[N]``).
- Helpers: :func:`split_parts` / :func:`unsplit_parts`, :func:`compute_dtype`,
  :func:`chunk_index` (validated chunk list -> flat positions), :func:`hybrid_weights` (GOLD's
  common/uncommon weights) and :func:`hkl_pairs` (H-KL's common set from W).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses.checks import reduce_chunks
from xtoken_nemo.vocab.projection import ProjectionMatrix

DEFAULT_EPS = 1e-8
"""Stands in for P-KL's structural zeros (q = 0 on teacher columns no W row reaches) in the
*reported* constant only (``LossParts.constant``); no trainable value or gradient depends on it."""

PROB_FLOOR = 1e-30
"""Underflow guard under a reachable probability before its log (P-KL's reached columns, GOLD's and
H-KL's common student mass). Changes a value only where q < 1e-30 (an fp32 softmax that underflowed)."""

MASS_CLAMP = 1e-12
"""Stands in for 1 - c_S = 0 (a chain-merged chunk whose student side is one token) in the
*reported* constant of :func:`~xtoken_nemo.losses.reference.chunk_mass_kl_parts` only."""

MASK_VALUE = -1e30  # finite: exp() underflows to exactly 0 and 0 * MASK_VALUE stays 0 (no NaN)
"""Value of the padded vocabulary columns (global id >= the real vocab size) in the parallel losses."""

DEFAULT_BLOCK = 256
"""Chunks per block of the vocab-parallel losses (forward and recomputing backward)."""

MERGE_MODES = ("chain", "logmean", "first")
"""Chunk merges (:func:`~xtoken_nemo.losses.reference.merge_chunks`); ``chain`` is the paper's."""

ULD_METHODS = ("hist", "sort")
"""How the vocab-parallel ULD is computed: the layer-cake histogram (default) or the all-gather sort."""


@dataclass
class LossParts:
    """A KD loss split into the part that trains and the gradient-free constant (per chunk [N] or
    reduced to 0-dim).

    trainable: the KL over the outcomes the student can reach (teacher columns some W row reaches;
               a chunk's rest bucket when the student side has later tokens), minus M log M with M
               the teacher's mass on those outcomes: = M * KL(teacher renormalized to them || student),
               >= 0 and 0 at the best fit the student can reach. Carries the gradient; independent
               of every floor/clamp (up to PROB_FLOOR underflow guards).
    constant:  the rest of the (clamped) KL, no gradient: the terms of the outcomes the student
               gives probability exactly 0, with ``log eps`` / ``log MASS_CLAMP`` in place of log 0,
               plus M log M. Depends on eps/MASS_CLAMP by construction: reported, never trained on.
    uncovered: 1 - M, the teacher mass on outcomes the student cannot reach (no floor involved).
    """

    trainable: torch.Tensor
    constant: torch.Tensor
    uncovered: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """trainable + constant: the clamped KL as computed before the split (for comparison)."""
        return self.trainable + self.constant

    def reduce(self, reduction: str) -> LossParts:
        return LossParts(*(reduce_chunks(x, reduction) for x in (self.trainable, self.constant, self.uncovered)))

    @staticmethod
    def of(loss: torch.Tensor) -> LossParts:
        """A loss with every outcome reachable (KL, GOLD, H-KL, ULD): no constant."""
        zero = torch.zeros_like(loss.detach())
        return LossParts(loss, zero, zero)


def split_parts(reach_kl: torch.Tensor, unreach_const: torch.Tensor, uncovered: torch.Tensor) -> LossParts:
    """[N] KL over the reachable outcomes, the clamped terms of the unreachable ones, and the teacher
    mass on those -> :class:`LossParts` (moves M log M, M = 1 - uncovered, to the constant)."""
    m = (1.0 - uncovered).detach()
    shift = torch.xlogy(m, m)
    return LossParts(reach_kl - shift, unreach_const + shift, uncovered)


def unsplit_parts(parts: LossParts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_parts`: (reach_kl, unreach_const, uncovered), each [N]."""
    m = (1.0 - parts.uncovered).detach()
    shift = torch.xlogy(m, m)
    return parts.trainable + shift, parts.constant - shift, parts.uncovered


@dataclass
class MergedChunks:
    """Chunk-level distributions, split into a normalized shape and a total log-mass.

    logits:   [N, V] log-probabilities (log-softmax normalized): the chunk distribution's shape.
              Every loss takes these as its logits.
    log_mass: [N] log of the total mass of the merged (unnormalized) vector, <= 0:
              the unnormalized chunk vector of the paper/TRL is ``exp(logits + log_mass[:, None])``.
    """

    logits: torch.Tensor
    log_mass: torch.Tensor

    def log_values(self) -> torch.Tensor:
        """[N, V] log of the unnormalized merged vector (what TRL's merge returns, in log space)."""
        return self.logits + self.log_mass[:, None]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the losses compute in: float64 stays float64 (gradcheck), everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def chunk_index(chunks: Sequence[Sequence[int]], num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and their chunk id, flattened: ([T'], [T']); validates the chunk list.

    ``chunks`` is a list of N non-empty lists of positions in ``[0, num_positions)`` (in order);
    returns every position of every chunk and, beside it, the index of its chunk in ``[0, N)``.
    Raises :class:`~xtoken_nemo.errors.LossInputError` on an empty list, an empty chunk or a
    position out of range.
    """
    if len(chunks) == 0:
        raise LossInputError("empty chunk list: the alignment produced no chunk; skip this sequence")
    pos, cid = [], []
    for k, chunk in enumerate(chunks):
        chunk = [int(i) for i in chunk]
        if not chunk:
            raise LossInputError(f"chunk {k} is empty; every aligned chunk needs at least one position")
        if min(chunk) < 0 or max(chunk) >= num_positions:
            raise LossInputError(f"chunk {k} names positions outside [0, {num_positions})")
        pos.extend(chunk)
        cid.extend([k] * len(chunk))
    return torch.tensor(pos, dtype=torch.int64), torch.tensor(cid, dtype=torch.int64)


def hybrid_weights(
    weighting: str | tuple[float, float], num_common_teacher: int, teacher_vocab: int
) -> tuple[float, float]:
    """(w_c, w_u): the weights of GOLD's common-pair KL and of its ULD on the uncommon rest.

    ``"sum"``: (1, 1); ``"vocab_overlap"``: TRL's default adaptive weights, (|T_C| / V_T, 1 - that)
    with |T_C| = ``num_common_teacher`` the number of distinct common teacher tokens;
    a pair of floats: those weights.
    """
    if weighting == "sum":
        return 1.0, 1.0
    if weighting == "vocab_overlap":  # TRL's default when no weights are configured
        w = num_common_teacher / max(1, teacher_vocab)
        return w, 1.0 - w
    if isinstance(weighting, (tuple, list)) and len(weighting) == 2:
        return float(weighting[0]), float(weighting[1])
    raise LossInputError(f"weighting must be 'sum', 'vocab_overlap' or (matched, unmatched) floats, got {weighting!r}")


def hkl_pairs(W: ProjectionMatrix | torch.Tensor, min_weight: float = 0.0) -> torch.Tensor:
    """[P, 2] H-KL common set: (s, argmax_t W[s, t]) for every non-zero row with max weight >= min_weight.

    Exact matches (weight 1) are kept; NeMo-RL's public code uses min_weight = 0.6.
    """
    if isinstance(W, ProjectionMatrix):
        best_val, best = W.values.max(dim=1)
        teacher = W.indices.gather(1, best[:, None]).squeeze(1)
        keep = (teacher >= 0) & (best_val > 0) & (best_val >= min_weight)
    else:
        best_val, teacher = W.max(dim=1)
        keep = (best_val > 0) & (best_val >= min_weight)
    rows = torch.nonzero(keep).squeeze(1)
    return torch.stack([rows, teacher[rows]], dim=1)
