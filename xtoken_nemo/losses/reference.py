"""Reference losses: plain PyTorch, unsharded, written to be read. The oracle for the tests.

All distribution losses take *chunk-merged logits* ``[N, V]`` (N aligned chunks; see
:func:`merge_chunks`) and return the mean over chunks (``reduction="none"``: the ``[N]`` vector).
Inputs may be any float dtype; the math runs in float32 (float64 stays float64, for gradcheck).

Conventions and choices (see also docs/method.md, "The losses" and "Chunk merge"):

- ``temperature`` divides both sides' logits; losses are *not* multiplied by T^2 (leave that to
  the caller's weight).
- KL direction is always forward, KL(p_T || p_S) (teacher mass-covering), as in the paper.
- Loss values mean something (docs/method.md, "Trainable part and constant"): a term whose
  student side is *structurally* zero (a teacher column no W row reaches, the "rest" bucket of a
  chain-merged chunk whose student side has no later token) is infinite in exact math and has no
  gradient. Such terms are not in the loss: :class:`LossParts` splits every KD loss into
  ``trainable`` (the KL over the outcomes the student can reach, shifted by a teacher-only
  constant so that it is >= 0 and 0 at the best fit the student can reach), ``constant`` (the
  gradient-free rest, with ``eps`` / ``MASS_CLAMP`` standing in for log 0, reported only) and
  ``uncovered`` (the teacher mass the student cannot reach). The loss functions return the
  trainable part; ``*_parts`` return all three. See docs/losses.md.
- ``log`` of a probability that is reachable but may underflow is taken of ``max(q, PROB_FLOOR)``
  (1e-30: far below any probability that moves a loss). Terms with ``p_T == 0`` contribute exactly
  0 (xlogy).

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

The types, constants and small helpers this module shares with the vocab-parallel losses
(``LossParts``, ``MergedChunks``, the floors, ``MERGE_MODES``, ``hkl_pairs``, ...) live in
:mod:`xtoken_nemo.losses.common`; the vocab-parallel losses import nothing from this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    check_topk,
    reduce_chunks,
)
from xtoken_nemo.losses.common import (
    DEFAULT_EPS,
    MASS_CLAMP,
    MERGE_MODES,
    PAPER_EPS,
    PAPER_TOPK,
    PROB_FLOOR,
    LossParts,
    MergedChunks,
    chunk_index,
    compute_dtype,
    hkl_pairs,
    hybrid_weights,
    split_parts,
    top_columns,
    unsplit_parts,
)
from xtoken_nemo.vocab.projection import ProjectionMatrix


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] -> [N, V] log-softmax in fp32 (fp64 kept) after dividing by the temperature."""
    return F.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)


def _check_chunk_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str,
    W: ProjectionMatrix | torch.Tensor | None = None,
) -> None:
    """The checks the ULD, GOLD and P-KL references start with: temperature, reduction, finite
    [N, V] logits on both sides with the same N, and (given W) W's shape [V_S, V_T]. (KL checks
    the same vocabulary on both sides, H-KL its W before building the pairs: their own lines.)"""
    check_temperature(temperature)
    check_reduction(reduction)
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_same_chunks(student_logits, teacher_logits)
    if W is not None:
        check_projection_shape(tuple(W.shape), student_logits.shape[-1], teacher_logits.shape[-1])


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
    _check_chunk_inputs(student_logits, teacher_logits, temperature, reduction)
    ps = log_probs(student_logits, temperature).exp()
    pt = log_probs(teacher_logits, temperature).exp()
    return reduce_chunks(sorted_l1(ps, pt), reduction)


# ------------------------------------------------------------------------------------------
# GOLD and H-KL (common-set KL + ULD on the rest)
# ------------------------------------------------------------------------------------------
def common_kl(log_ps: torch.Tensor, log_pt: torch.Tensor, pairs: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    """[N] sum over common teacher tokens t of p_T[t] * (log p_T[t] - log q_C[t]).

    q_C[t] = sum of p_S[s] over the pairs (s, t); the full-vocabulary distributions are used as
    they are (no renormalization over C). Every common teacher token has a student partner, so
    q_C > 0 in exact math: ``eps`` is only an underflow guard (default PROB_FLOOR).
    """
    teachers, inverse = torch.unique(pairs[:, 1], return_inverse=True)
    ps_pairs = log_ps[:, pairs[:, 0]].exp()  # [N, P]
    q_c = torch.zeros(log_ps.shape[0], teachers.numel(), dtype=log_ps.dtype).index_add(1, inverse, ps_pairs)
    pt_c = log_pt[:, teachers].exp()  # [N, |T_C|]
    return (torch.xlogy(pt_c, pt_c) - torch.xlogy(pt_c, q_c.clamp_min(eps))).sum(-1)


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    common_pairs: torch.Tensor,
    temperature: float = 1.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = PROB_FLOOR,
    reduction: str = "mean",
) -> torch.Tensor:
    """GOLD: KL on the common pairs + ULD on the uncommon rest (module docstring for the semantics).

    student_logits [N, V_S], teacher_logits [N, V_T], common_pairs [P, 2] (student_id, teacher_id).
    """
    _check_chunk_inputs(student_logits, teacher_logits, temperature, reduction)
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

    w_c, w_u = hybrid_weights(weighting, int(teacher_uncommon.numel() - teacher_uncommon.sum()), v_t)
    return reduce_chunks(w_c * common + w_u * uld, reduction)


def hkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    min_weight: float = 0.0,
    weighting: str | tuple[float, float] = "sum",
    eps: float = PROB_FLOOR,
    reduction: str = "mean",
) -> torch.Tensor:
    """H-KL: GOLD whose common set is W's argmax pairs (which contain the exact matches)."""
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    check_projection_shape(tuple(W.shape), student_logits.shape[-1], teacher_logits.shape[-1])
    return gold_loss(student_logits, teacher_logits, hkl_pairs(W, min_weight), temperature, weighting, eps, reduction)


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


def reached_columns(W: ProjectionMatrix | torch.Tensor) -> torch.Tensor:
    """[V_T] bool: the teacher columns some W row reaches with a non-zero weight (structural: the
    projected student q = W^T p_S is exactly 0 on every other column, whatever p_S)."""
    if isinstance(W, ProjectionMatrix):
        reached = torch.zeros(W.shape[1], dtype=torch.bool)
        reached[W.indices[(W.indices >= 0) & (W.values != 0)]] = True
        return reached
    return (W != 0).any(dim=0)


def pkl_loss_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> LossParts:
    """P-KL split into the part that trains and the constant (:class:`LossParts`).

    student [N, V_S], teacher [N, V_T], W [V_S, V_T]. q = W^T p_S is used as it is (student mass on
    zero rows of W is lost, not renormalized: docs/method.md, "P-KL"). On the reached columns R:
    trainable = sum_R p_T (log p_T - log q) - M log M, M = sum_R p_T. On the other columns q = 0:
    uncovered = sum_{not R} p_T and constant = sum_{not R} p_T (log p_T - log eps) + M log M.
    """
    _check_chunk_inputs(student_logits, teacher_logits, temperature, reduction, W)
    if isinstance(W, torch.Tensor):
        check_finite("W", W)
        if bool((W < 0).any()):
            raise LossInputError("W has negative entries; a projection matrix must be non-negative")
    p_s = log_probs(student_logits, temperature).exp()
    p_t = log_probs(teacher_logits, temperature).exp()
    q = project(p_s, W)
    reached = reached_columns(W).to(p_t.device)
    pt_log_pt = torch.xlogy(p_t, p_t)
    zero = p_t.new_zeros(())
    reach_kl = torch.where(reached, pt_log_pt - torch.xlogy(p_t, q.clamp_min(PROB_FLOOR)), zero).sum(-1)
    uncovered = torch.where(reached, zero, p_t).sum(-1)
    unreach_const = torch.where(reached, zero, pt_log_pt).sum(-1) - uncovered * math.log(eps)
    return split_parts(reach_kl, unreach_const, uncovered).reduce(reduction)


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """P-KL: KL(p_T || W^T p_S) per chunk, its trainable part (:func:`pkl_loss_parts`).

    student [N, V_S], teacher [N, V_T], W [V_S, V_T]. Teacher columns no W row reaches (q = 0)
    are left out (their term is an infinite teacher-only constant); ``eps`` only enters the
    constant that ``pkl_loss_parts`` reports.
    """
    return pkl_loss_parts(student_logits, teacher_logits, W, temperature, eps, reduction).trainable


def paper_pkl_value(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    W: ProjectionMatrix | torch.Tensor,
    temperature: float = 1.0,
    topk: int = PAPER_TOPK,
    eps: float = PAPER_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """NVIDIA's P-KL value as NeMo-RL's X-Token code computes it (no gradient): it only sets the
    dynamic scale under ``train.kd_scale_value="paper"`` (docs/losses.md, "Which value sets the
    dynamic scale").

    student [N, V_S], teacher [N, V_T], W [V_S, V_T]. K = the ``min(topk, V_T)`` teacher columns of
    largest max logit over the N rows (one set for all rows; ties to the lower id); on K:
    log p_T = log_softmax(teacher[:, K] / T) (renormalised on K), q = (W^T p_S)[K] with
    p_S = softmax(student / T) over the whole student vocab, q <- q / (sum_K q + eps), and
    KL = sum_K p_T (log p_T - log(q + eps)): teacher columns no W row reaches stay in the sum with
    log eps. NVIDIA multiplies by T^2; this value does not (our trainable P-KL carries no T^2; at
    T = 1 they agree).
    """
    _check_chunk_inputs(student_logits, teacher_logits, temperature, reduction, W)
    check_topk(topk)
    with torch.no_grad():
        cols = top_columns(teacher_logits.max(dim=0).values, min(topk, teacher_logits.shape[-1]))
        log_pt = log_probs(teacher_logits[:, cols], temperature)
        q = project(log_probs(student_logits, temperature).exp(), W)[:, cols]
        q = q / (q.sum(-1, keepdim=True) + eps)
        kl = (log_pt.exp() * (log_pt - (q + eps).log())).sum(-1)
    return reduce_chunks(kl, reduction)


# ------------------------------------------------------------------------------------------
# Chunk merging
# ------------------------------------------------------------------------------------------
def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[L, V] logits, [L] ids -> [L] log-softmax at the targets, accurate near 0.

    log p_t = d - log1p(expm1(d) + s), d = z_t - m, s = sum_{v != t} exp(z_v - m), m = max z: when
    t is the argmax (p_t near 1) this is -log1p(s), exact to the last bit, where z_t - lse loses
    everything below the lse's rounding (in fp32 any p_t > 1 - 6e-8 becomes exactly 1). The chain
    merge needs it: log(1 - c) of a chunk's log-mass c must be exactly -inf only when the chunk has
    no later token (:func:`chunk_mass_kl_parts`).
    """
    y = logits.to(compute_dtype(logits))
    targets = torch.as_tensor(targets, dtype=torch.int64, device=y.device)[:, None]
    m = y.detach().max(dim=-1).values
    d = y.gather(1, targets).squeeze(1) - m
    s = torch.exp(y.scatter(1, targets, float("-inf")) - m[:, None]).sum(-1)
    return d - torch.log1p(torch.expm1(d) + s)


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
    pos, cid = chunk_index(chunks, logits.shape[0])
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
        tgt_logp = target_log_probs(logits[pos[later]], targets[pos[later]])
        log_mass = torch.zeros(n, dtype=logp.dtype).index_add(0, cid[later], tgt_logp)
        return MergedChunks(logp[first], log_mass)
    # logmean
    counts = torch.bincount(cid, minlength=n).to(logp.dtype)
    mean = torch.zeros(n, logp.shape[1], dtype=logp.dtype).index_add(0, cid, logp[pos]) / counts[:, None]
    lse = torch.logsumexp(mean, dim=-1)
    return MergedChunks(mean - lse[:, None], lse)


def chunk_mass_kl_parts(
    student_log_mass: torch.Tensor,
    teacher_log_mass: torch.Tensor,
    shape_loss: LossParts | torch.Tensor | None = None,
    reduction: str = "mean",
) -> LossParts:
    """Bring a chain merge's log-mass into a KL-type loss, split into trainable and constant.

    Per chunk, with c = exp(log_mass), the KL of the unnormalized merged vectors completed by a
    "rest" bucket of mass 1 - c is ``c_T * L_shape + KL_Bernoulli(c_T || c_S)``. When the student
    side has no later token, log c_S = 0 exactly: the student's rest bucket is structurally empty,
    its term (1 - c_T) log((1 - c_T) / 0) is an infinite constant with no gradient, and it goes to
    ``constant`` (with ``MASS_CLAMP`` standing in for 0, as the old clamp did). Where log c_S < 0
    the term is computed exactly (no clamp) and trains. The shape loss's own unreachable teacher
    columns (P-KL) stay out of reach in the chunk: the c_T log(c_T / c_S) term covers only the
    teacher mass on reachable columns. ``shape_loss`` [N] (a tensor: every column reachable, or the
    per-chunk :class:`LossParts` of P-KL); None: the Bernoulli term alone.
    """
    check_reduction(reduction)
    log_ct = teacher_log_mass.to(compute_dtype(teacher_log_mass))
    log_cs = student_log_mass.to(log_ct.dtype)
    if shape_loss is None:
        shape_loss = LossParts.of(torch.zeros_like(log_ct))
    elif isinstance(shape_loss, torch.Tensor):
        shape_loss = LossParts.of(shape_loss)
    l_r, c_u, u = (x.to(log_ct.dtype) for x in unsplit_parts(shape_loss))
    m_shape = 1.0 - u  # teacher mass on the shape's reachable columns
    c_t = log_ct.exp()
    one_m_ct = -torch.expm1(log_ct)  # 1 - c_T, exactly 0 when c_T = 1
    rest_reached = log_cs.detach() < 0  # the student side has a later token: its rest bucket has mass
    log1m_cs = torch.log(-torch.expm1(torch.where(rest_reached, log_cs, log_cs.new_full((), -1.0))))
    ent_rest = torch.xlogy(one_m_ct, one_m_ct)  # (1 - c_T) log(1 - c_T), 0 when c_T = 1
    zero = log_ct.new_zeros(())
    reach_kl = (
        c_t * l_r + c_t * m_shape * (log_ct - log_cs) + torch.where(rest_reached, ent_rest - one_m_ct * log1m_cs, zero)
    )
    uncovered = c_t * u + torch.where(rest_reached, zero, one_m_ct)
    unreach_const = (
        c_t * c_u + c_t * u * log_ct + torch.where(rest_reached, zero, ent_rest - one_m_ct * math.log(MASS_CLAMP))
    )
    return split_parts(reach_kl, unreach_const, uncovered).reduce(reduction)


def chunk_mass_kl(
    student_log_mass: torch.Tensor,
    teacher_log_mass: torch.Tensor,
    shape_loss_per_chunk: LossParts | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The trainable part of :func:`chunk_mass_kl_parts`: ``c_T * L_shape + KL_Bern(c_T || c_S)``
    per chunk over the outcomes the student can reach (exactly that when log c_S < 0 and the
    shape loss has no unreachable column)."""
    return chunk_mass_kl_parts(student_log_mass, teacher_log_mass, shape_loss_per_chunk, reduction).trainable


# ------------------------------------------------------------------------------------------
# J-KL: the joint-chunk term
# ------------------------------------------------------------------------------------------
def jkl_teacher_support(
    teacher_logits: torch.Tensor,
    teacher_chunk: Sequence[int],
    teacher_targets: torch.Tensor,
    support,
    temperature: float = 1.0,
) -> list[tuple[int, torch.Tensor]]:
    """[(student id, log q_T)] of one joint chunk: for each realised prefix t_1 .. t_j (j = 1 .. k-1)
    and each support entry (x, v) under it, log q_T(v) = sum_{i<j} log p^{(i)}(t_{i+1}) + log p^{(j)}(x),
    with p^{(i)} the teacher's distribution at the chunk's i-th position; at j < k-1 the entry with
    x = t_{j+1} is skipped (it continues the realised path). ``support``: a
    :class:`~xtoken_nemo.vocab.prefix_support.PrefixSupport`."""
    pieces = [int(teacher_targets[p]) for p in teacher_chunk]
    k = len(pieces)
    out = []
    prefix_logp = torch.zeros((), dtype=compute_dtype(teacher_logits))
    for j in range(1, k):
        prefix_logp = prefix_logp + log_probs(teacher_logits[teacher_chunk[j - 1]][None], temperature)[0, pieces[j - 1]]
        level = log_probs(teacher_logits[teacher_chunk[j]][None], temperature)[0]
        for x, v in support.entries(tuple(pieces[:j])):
            if j < k - 1 and x == pieces[j]:
                continue
            out.append((v, prefix_logp + level[x]))
    return out


def jkl_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_chunks: Sequence[Sequence[int]],
    teacher_chunks: Sequence[Sequence[int]],
    teacher_targets: torch.Tensor,
    support,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """J-KL's joint term per chunk (docs/method.md, "J-KL"): on a chunk whose student side is one
    position and whose teacher side is k >= 2 positions, the KL between the teacher's chain
    products over the support (:func:`jkl_teacher_support`) plus REST and the student's
    probabilities of the same tokens plus REST; 0 on every other chunk.

    student_logits [T_S, V_S] and teacher_logits [T_T, V_T] per position; chunks as lists of
    positions (in order, the same count on both sides); teacher_targets [T_T] the teacher's next
    tokens (the chunk's pieces).
    """
    check_temperature(temperature)
    check_reduction(reduction)
    if len(student_chunks) != len(teacher_chunks):
        raise LossInputError(f"{len(student_chunks)} student chunks but {len(teacher_chunks)} teacher chunks")
    dtype = compute_dtype(student_logits)
    per_chunk = []
    for s_chunk, t_chunk in zip(student_chunks, teacher_chunks):
        joint = len(s_chunk) == 1 and len(t_chunk) >= 2
        entries = jkl_teacher_support(teacher_logits, t_chunk, teacher_targets, support, temperature) if joint else []
        if not entries:
            per_chunk.append(torch.zeros((), dtype=dtype))
            continue
        log_ps = log_probs(student_logits[s_chunk[0]][None], temperature)[0]
        students = torch.tensor([v for v, _ in entries])
        q = torch.stack([lq for _, lq in entries]).to(dtype).exp()
        p = log_ps[students].exp()
        rest_q, rest_p = (1.0 - q.sum()).clamp_min(0.0), 1.0 - p.sum()
        kl = (torch.xlogy(q, q) - q * p.log()).sum() + torch.xlogy(rest_q, rest_q) - rest_q * rest_p.log()
        per_chunk.append(kl)
    return reduce_chunks(torch.stack(per_chunk), reduction)
