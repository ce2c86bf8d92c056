"""Reference losses: plain PyTorch, unsharded, written to be read. The oracle for the tests.

All distribution losses take *chunk-merged logits* ``[N, V]`` (N aligned chunks; see
:func:`merge_chunks`) and return the mean over chunks (``reduction="none"``: the ``[N]`` vector).
Inputs may be any float dtype; the math runs in float32 (float64 stays float64, for gradcheck).

Conventions and choices (see also ../../shared/method.md sections 2-4):

- ``temperature`` divides both sides' logits; losses are *not* multiplied by T^2 (leave that to
  the caller's weight).
- KL direction is always forward, KL(p_T || p_S) (teacher mass-covering), as in the paper.
- ``log`` of a probability that may be structurally zero (a teacher column no W row maps to, an
  underflowed sum) is taken of ``max(q, eps)``. Terms with ``p_T == 0`` contribute exactly 0 (xlogy).

GOLD semantics (following TRL's ``GOLDTrainer``/``ULDLoss`` hybrid mode, see :func:`gold_loss`):

- common set C: the given (student_id, teacher_id) pairs (exact string matches, 1-to-1).
- common term: ``sum_{(s,t) in C} p_T[t] * (log p_T[t] - log p_S[s])`` on the *full-vocabulary*
  softmaxes, **not renormalized over C** (TRL takes the matched columns of the full
  distributions). This is what makes Proposition 1 hold: for an uncommon student logit z_j,
  d(common)/dz_j = p_S[j] * M_C(T) >= 0 with M_C(T) = sum_{t in C} p_T[t].
  TRL's matched term is a generalized JSD with ``beta``; we use forward KL (its beta = 0), which
  is what the X-Token paper calls "KL on the common pairs".
- uncommon term: ULD (sorted L1) between the student's and the teacher's probabilities restricted
  to their uncommon tokens (again not renormalized), zero-padded to equal length.
- weights: ``matched_weight * common + unmatched_weight * uld``, default 1 and 1;
  ``weighting="vocab_overlap"`` gives TRL's default adaptive weights (|C| / V_T and 1 - that).
- H-KL grows C with W's argmax pairs; then several student tokens may share one teacher token.
  We aggregate: for a common teacher token t, the student side is the *summed* mass of all student
  tokens paired with t (``q_C[t] = sum_{s:(s,t) in C} p_S[s]``), so teacher mass is never counted
  twice and M_C(T) <= 1. For 1-to-1 pairs (GOLD) this is exactly TRL's term.

Chunk merging (chain / logmean / first): see :func:`merge_chunks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses.checks import (
    check_finite,
    check_logits,
    check_pairs,
    check_projection_shape,
    check_reduction,
    check_same_chunks,
    check_temperature,
    reduce_chunks,
)
from xtoken_nemo.vocab.projection import ProjectionMatrix

DEFAULT_EPS = 1e-8
"""Floor under a probability before its log (P-KL's projected student, GOLD's common student mass)."""


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] -> [N, V] log-softmax in fp32 (fp64 kept) after dividing by the temperature."""
    return F.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


# ------------------------------------------------------------------------------------------
# Same-tokenizer KL and ULD
# ------------------------------------------------------------------------------------------
def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(p_T || p_S) per chunk; student/teacher [N, V] with the same vocabulary."""
    check_temperature(temperature)
    check_reduction(reduction)
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits, vocab_size=student_logits.shape[-1])
    check_same_chunks(student_logits, teacher_logits)
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature)
    per_chunk = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return reduce_chunks(per_chunk, reduction)


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[N, A], [N, B] non-negative -> [N]: L1 between descending-sorted rows, shorter one zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    ps = F.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    qs = F.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (ps - qs).abs().sum(-1)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """ULD: L1 between the sorted student and teacher probabilities (zero-padded), per chunk."""
    check_temperature(temperature)
    check_reduction(reduction)
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    ps = log_probs(student_logits, temperature).exp()
    pt = log_probs(teacher_logits, temperature).exp()
    return reduce_chunks(sorted_l1(ps, pt), reduction)


# ------------------------------------------------------------------------------------------
# GOLD and H-KL (common-set KL + ULD on the rest)
# ------------------------------------------------------------------------------------------
def common_kl(
    log_ps: torch.Tensor, log_pt: torch.Tensor, pairs: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """[N] sum over common teacher tokens t of p_T[t] * (log p_T[t] - log q_C[t]).

    q_C[t] = sum of p_S[s] over the pairs (s, t); the full-vocabulary distributions are used as
    they are (no renormalization over C).
    """
    teachers, inverse = torch.unique(pairs[:, 1], return_inverse=True)
    ps_pairs = log_ps[:, pairs[:, 0]].exp()  # [N, P]
    q_c = torch.zeros(log_ps.shape[0], teachers.numel(), dtype=log_ps.dtype).index_add(1, inverse, ps_pairs)
    pt_c = log_pt[:, teachers].exp()  # [N, |T_C|]
    return (torch.xlogy(pt_c, pt_c) - torch.xlogy(pt_c, q_c.clamp_min(eps))).sum(-1)


def _hybrid_weights(weighting: str | tuple[float, float], num_common_teacher: int, teacher_vocab: int) -> tuple[float, float]:
    if weighting == "sum":
        return 1.0, 1.0
    if weighting == "vocab_overlap":  # TRL's default when no weights are configured
        w = num_common_teacher / max(1, teacher_vocab)
        return w, 1.0 - w
    if isinstance(weighting, (tuple, list)) and len(weighting) == 2:
        return float(weighting[0]), float(weighting[1])
    raise LossInputError(f"weighting must be 'sum', 'vocab_overlap' or (matched, unmatched) floats, got {weighting!r}")


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    common_pairs: torch.Tensor,
    temperature: float = 1.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """GOLD: KL on the common pairs + ULD on the uncommon rest (module docstring for the semantics).

    student_logits [N, V_S], teacher_logits [N, V_T], common_pairs [P, 2] (student_id, teacher_id).
    """
    check_temperature(temperature)
    check_reduction(reduction)
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    pairs = check_pairs(common_pairs, v_s, v_t)
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature)

    common = common_kl(log_ps, log_pt, pairs, eps)
    student_uncommon = torch.ones(v_s, dtype=torch.bool)
    student_uncommon[pairs[:, 0]] = False
    teacher_uncommon = torch.ones(v_t, dtype=torch.bool)
    teacher_uncommon[pairs[:, 1]] = False
    uld = sorted_l1(log_ps.exp()[:, student_uncommon], log_pt.exp()[:, teacher_uncommon])

    w_c, w_u = _hybrid_weights(weighting, int(teacher_uncommon.numel() - teacher_uncommon.sum()), v_t)
    return reduce_chunks(w_c * common + w_u * uld, reduction)


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


def hkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    min_weight: float = 0.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """H-KL: GOLD whose common set is W's argmax pairs (which contain the exact matches)."""
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_projection_shape(tuple(W.shape), student_logits.shape[-1], teacher_logits.shape[-1])
    return gold_loss(
        student_logits, teacher_logits, hkl_pairs(W, min_weight), temperature, weighting, eps, reduction
    )


# ------------------------------------------------------------------------------------------
# P-KL
# ------------------------------------------------------------------------------------------
def project(p_s: torch.Tensor, W: ProjectionMatrix | torch.Tensor) -> torch.Tensor:
    """[N, V_S] -> [N, V_T]: p~_S = W^T p_S (row vectors: p_S @ W)."""
    if isinstance(W, ProjectionMatrix):
        mask = W.indices >= 0
        rows = torch.arange(W.shape[0])[:, None].expand_as(W.indices)[mask]
        cols = W.indices[mask]
        vals = W.values[mask].to(p_s.dtype)
        out = torch.zeros(p_s.shape[0], W.shape[1], dtype=p_s.dtype)
        return out.index_add(1, cols, p_s[:, rows] * vals)
    return p_s @ W.to(p_s.dtype)


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """P-KL: KL(p_T || W^T p_S) per chunk. student [N, V_S], teacher [N, V_T], W [V_S, V_T].

    W^T p_S is used as it is: student mass on zero rows of W is lost (not renormalized), and a
    teacher column no W row reaches gets q = eps (a constant term, no gradient).
    """
    check_temperature(temperature)
    check_reduction(reduction)
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    check_projection_shape(tuple(W.shape), student_logits.shape[-1], teacher_logits.shape[-1])
    if isinstance(W, torch.Tensor):
        check_finite("W", W)
        if bool((W < 0).any()):
            raise LossInputError("W has negative entries; a projection matrix must be non-negative")
    p_s = log_probs(student_logits, temperature).exp()
    p_t = log_probs(teacher_logits, temperature).exp()
    q = project(p_s, W)
    per_chunk = (torch.xlogy(p_t, p_t) - torch.xlogy(p_t, q.clamp_min(eps))).sum(-1)
    return reduce_chunks(per_chunk, reduction)


# ------------------------------------------------------------------------------------------
# Chunk merging
# ------------------------------------------------------------------------------------------
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


MERGE_MODES = ("chain", "logmean", "first")


def _chunk_index(chunks: Sequence[Sequence[int]], num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and their chunk id, flattened: ([T'], [T']); validates the chunk list."""
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


def merge_chunks(
    logits: torch.Tensor,
    chunks: Sequence[Sequence[int]],
    targets: torch.Tensor | None = None,
    mode: str = "chain",
) -> MergedChunks:
    """Per-position logits [T, V] + chunks (lists of positions, in order) -> MergedChunks [N, V].

    ``targets[i]`` is the actual token that position i's logits predict (the next token).

    - ``chain`` (paper, default): log p_first[v] + sum_{i in chunk[1:]} log p_i[targets[i]].
      The first position's distribution scaled by the probability of the chunk's remaining actual
      tokens: shape = p_first, log_mass = the sum of the later actual-token log-probs. Exact for
      the observed chunk, an approximation for the counterfactual first tokens (TRL's choice too).
    - ``logmean``: mean over the chunk's positions of the log-probs: shape = its softmax,
      log_mass = logsumexp of the mean (<= 0 by the AM-GM inequality).
    - ``first``: the first position's distribution; log_mass = 0.

    Losses consume ``.logits`` (normalized shapes); for chain the log_mass is a per-chunk scalar
    that a softmax-based loss cannot see (softmax is shift invariant). :func:`chunk_mass_kl` turns
    it into a loss term: over V plus one "rest" bucket of mass 1 - c, KL of the unnormalized
    vectors is exactly ``c_T * KL(shape_T || shape_S) + KL_Bernoulli(c_T || c_S)``.
    """
    if mode not in MERGE_MODES:
        raise LossInputError(f"unknown chunk merge {mode!r}; choose one of {MERGE_MODES}")
    check_logits("per-position logits", logits)
    pos, cid = _chunk_index(chunks, logits.shape[0])
    n = len(chunks)
    logp = log_probs(logits)
    first = torch.tensor([int(c[0]) for c in chunks], dtype=torch.int64)
    if mode == "first":
        return MergedChunks(logp[first], torch.zeros(n, dtype=logp.dtype))
    if mode == "chain":
        if targets is None:
            raise LossInputError("chain merge needs the target token ids (the actual next tokens)")
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.shape[0] != logits.shape[0]:
            raise LossInputError(f"targets have {targets.shape[0]} positions, logits {logits.shape[0]}")
        later = pos != first[cid]
        tgt_logp = logp[pos[later], targets[pos[later]]]
        log_mass = torch.zeros(n, dtype=logp.dtype).index_add(0, cid[later], tgt_logp)
        return MergedChunks(logp[first], log_mass)
    # logmean
    counts = torch.bincount(cid, minlength=n).to(logp.dtype)
    mean = torch.zeros(n, logp.shape[1], dtype=logp.dtype).index_add(0, cid, logp[pos]) / counts[:, None]
    lse = torch.logsumexp(mean, dim=-1)
    return MergedChunks(mean - lse[:, None], lse)


def chunk_mass_kl(
    student_log_mass: torch.Tensor,
    teacher_log_mass: torch.Tensor,
    shape_loss_per_chunk: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bring a merge's log-mass into a KL-type loss: ``c_T * L_shape + KL_Bern(c_T || c_S)`` per chunk.

    With c = exp(log_mass), this is the KL between the unnormalized merged vectors completed by a
    "rest" bucket of mass 1 - c. Without ``shape_loss_per_chunk`` only the Bernoulli term is returned.
    """
    check_reduction(reduction)
    log_ct = teacher_log_mass.to(_compute_dtype(teacher_log_mass))
    log_cs = student_log_mass.to(log_ct.dtype)
    c_t = log_ct.exp()
    # log(1 - c) computed stably from log c (log c <= 0)
    log1m_ct = torch.log(-torch.expm1(log_ct.clamp_max(-1e-12)))
    log1m_cs = torch.log(-torch.expm1(log_cs.clamp_max(-1e-12)))
    bern = c_t * (log_ct - log_cs) + (1 - c_t) * (log1m_ct - log1m_cs)
    out = bern if shape_loss_per_chunk is None else c_t * shape_loss_per_chunk + bern
    return reduce_chunks(out, reduction)
