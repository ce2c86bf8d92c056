"""What the reference and the vocab-parallel losses share: constants, mode lists, result types and
the small helpers both sides call.

- Constants: the floors and clamps (``DEFAULT_EPS``, ``PROB_FLOOR``, ``MASS_CLAMP``), the value of
  padded vocabulary columns (``MASK_VALUE``), the default token block (``DEFAULT_BLOCK``) and
  NVIDIA's P-KL settings for the paper-parity scale (``PAPER_TOPK``, ``PAPER_EPS``).
- Mode lists: ``MERGE_MODES`` (chunk merges) and ``ULD_METHODS`` (how the parallel ULD is computed);
  the one definition of each.
- Result types: :class:`LossParts` (a KD loss split into the part that trains, the gradient-free
  constant and the uncovered teacher mass; see docs/method.md, "Trainable part and constant") and
  :class:`MergedChunks` (a chunk merge's normalized shape ``[N, V]`` and log-mass ``[N]``).
- Helpers: :func:`split_parts` / :func:`unsplit_parts`, :func:`compute_dtype`, :func:`top_columns`,
  :func:`chunk_positions` / :func:`chunk_index` (validated chunk list or :class:`ChunkSpans` ->
  flat positions, vectorised on the host), :func:`to_device` (host index tensors onto the logits'
  device without blocking the host), :func:`hybrid_weights` (GOLD's common/uncommon weights) and
  :func:`hkl_pairs` (H-KL's common set from W).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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

PAPER_TOPK = 8192
"""Teacher columns NVIDIA's P-KL keeps (NeMo-RL ``vocab_topk``): the value that sets the dynamic
scale under ``train.kd_scale_value="paper"`` (:func:`~xtoken_nemo.losses.reference.paper_pkl_value`)."""

PAPER_EPS = 1e-10
"""NVIDIA's P-KL epsilon: in the renormalisation of the projected student and under its log."""


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


@dataclass(frozen=True)
class ChunkSpans:
    """N chunks of consecutive positions, chunk k = ``[starts[k], ends[k])``: the form the trainer's
    chunk tables take (``kd._flat_chunks``). Host int64 numpy arrays [N], so building the indices
    reads no tensor and runs no Python loop per chunk."""

    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.shape[0])


class ChunkIndex(NamedTuple):
    """A validated chunk list, flattened (host int64 tensors, chunks in order)."""

    pos: torch.Tensor  # [T'] every position of every chunk
    cid: torch.Tensor  # [T'] the chunk of each position, in [0, N)
    first: torch.Tensor  # [N] each chunk's first position
    counts: torch.Tensor  # [N] positions per chunk (>= 1)


def chunk_positions(chunks: Sequence[Sequence[int]] | ChunkSpans, num_positions: int) -> ChunkIndex:
    """:class:`ChunkIndex` of ``chunks``: a list of N non-empty lists of positions in
    ``[0, num_positions)`` (in order), or :class:`ChunkSpans`. Raises
    :class:`~xtoken_nemo.errors.LossInputError` on an empty list, an empty chunk or a position out of
    range (naming the first such chunk). Vectorised with numpy: one pass over the positions, no
    per-chunk Python work beyond ``len``."""
    n = len(chunks)
    if n == 0:
        raise LossInputError("empty chunk list: the alignment produced no chunk; skip this sequence")
    if isinstance(chunks, ChunkSpans):
        starts = np.asarray(chunks.starts, dtype=np.int64)
        counts = np.asarray(chunks.ends, dtype=np.int64) - starts
        bad_chunk = (counts > 0) & ((starts < 0) | (starts + counts > num_positions))
        empty = counts <= 0
        first_bad = _first_true(bad_chunk, n)
    else:
        counts = np.fromiter(map(len, chunks), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=int(counts.sum()))
        empty = counts == 0
        out = (flat < 0) | (flat >= num_positions)
        # positions come chunk by chunk: the first bad position lies in the first bad chunk
        first_bad = int(np.searchsorted(np.cumsum(counts), np.argmax(out), side="right")) if out.any() else n
    first_empty = _first_true(empty, n)
    if first_empty < first_bad:
        raise LossInputError(f"chunk {first_empty} is empty; every aligned chunk needs at least one position")
    if first_bad < n:
        raise LossInputError(f"chunk {first_bad} names positions outside [0, {num_positions})")
    offsets = np.cumsum(counts) - counts  # [N] where each chunk starts in the flat list
    cid = np.repeat(np.arange(n, dtype=np.int64), counts)
    if isinstance(chunks, ChunkSpans):
        first = starts.copy()
        flat = np.arange(int(offsets[-1] + counts[-1]), dtype=np.int64) + np.repeat(starts - offsets, counts)
    else:
        first = flat[offsets]
    return ChunkIndex(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (flat, cid, first, counts)))


def top_columns(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest entries of ``importance`` [V] (ties: the lower position
    first), in ascending order. Deterministic, so a vocab-parallel selection (local candidates,
    gathered in id order, selected again) picks the same columns as the unsharded one."""
    order = torch.sort(importance, descending=True, stable=True).indices[:k]
    return order.sort().values


def _first_true(mask: np.ndarray, default: int) -> int:
    return int(np.argmax(mask)) if mask.any() else default


def chunk_index(chunks: Sequence[Sequence[int]] | ChunkSpans, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and their chunk id, flattened: ([T'], [T']); validates the chunk list.

    ``chunks`` is a list of N non-empty lists of positions in ``[0, num_positions)`` (in order)
    or :class:`ChunkSpans`; returns every position of every chunk and, beside it, the index of its
    chunk in ``[0, N)`` (:func:`chunk_positions` has the chunks' first positions and sizes too).
    Raises :class:`~xtoken_nemo.errors.LossInputError` on an empty list, an empty chunk or a
    position out of range.
    """
    index = chunk_positions(chunks, num_positions)
    return index.pos, index.cid


def to_device(device: torch.device | str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host tensors of one dtype on ``device``, in one copy that does not block the host.

    A copy from pageable host memory to a GPU blocks the host until it is done, behind the work
    already queued on the stream; from page-locked memory with ``non_blocking=True`` it is queued
    and the host goes on. On CUDA the tensors go into one page-locked buffer (PyTorch's caching
    host allocator: no new allocation once warm, and the buffer is not reused before the copy has
    completed) and are copied once; the results are views of one device buffer. On the CPU they
    are returned as they are.
    """
    device = torch.device(device)
    if device.type == "cpu" or all(t.device == device for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1).cpu() for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)
    if device.type == "cuda" and flat.device.type == "cpu" and not flat.is_pinned():
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return tuple(part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))


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
