"""Loss values must mean something (docs/method.md, "Trainable part and constant"): no logged KD loss, no dynamic scale
and no gradient may depend on a clamp or an epsilon.

Two structural zeros on the student side make a KL term infinite in exact math: the rest bucket of
a chain-merged chunk whose student side is one token (c_S = 1 exactly) and P-KL's teacher columns
that no W row reaches (q = 0). Their terms are teacher-only constants: reported separately
(``LossParts.constant``), never trained on nor scaled with. Moving the clamp (1e-12), eps (1e-8)
and the underflow floor (1e-30) by 10^4 either way must change the trainable KD loss, the dynamic
scale and every gradient by less than 0.1%.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from test_losses_parallel import make_W

import xtoken_nemo.distill.kd as kd
import xtoken_nemo.distill.teacher_loss as teacher_loss
from xtoken_nemo import losses as P
from xtoken_nemo.distill.config import TeacherConfig
from xtoken_nemo.losses import hybrid, pkl
from xtoken_nemo.losses import reference as R

VS, VT = 37, 45
VS_PAD, VT_PAD = 40, 48
S, T = 8, 12
# (s_start, s_end, t_start, t_end): chunk 0 is a one-token student side against a three-token
# teacher side ("201" against "2" "0" "1"); the others have later tokens on both sides
CHUNKS = [(0, 1, 0, 3), (1, 3, 3, 4), (3, 4, 4, 5), (4, 6, 5, 8), (6, 8, 8, 12)]
ALPHAS = {"cross": 0.7, "same": 0.3}
FACTORS = [1.0, 1e4, 1e-4]  # the defaults, moved up and down by 10^4


def _case(dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, S, VS_PAD, generator=g, dtype=torch.float64) * 2
    s[..., 5:9] = -26.0  # tokens with p_S ~ 1e-12: reached teacher columns whose q lies below eps
    t = torch.randn(1, T, VT_PAD, generator=g, dtype=torch.float64) * 2
    t_same = torch.randn(1, S, VS_PAD, generator=g, dtype=torch.float64) * 2
    s[..., VS:], t[..., VT:], t_same[..., VS:] = 50.0, 50.0, 50.0  # padded columns: masked
    labels = torch.randint(0, VS, (1, S), generator=g)
    # chunk 1's later token (position 2): the student is sure of it, log p = -2e-14 (an fp32
    # log_softmax rounds it to 0; the old clamp at -1e-12 replaced it)
    labels[0, 2] = int(s[0, 2, :VS].argmax())
    s[0, 2, labels[0, 2]] += 35.0
    return {
        "s": s.to(dtype),
        "t": t.to(dtype),
        "t_same": t_same.to(dtype),
        "labels": labels,
        "t_labels": torch.randint(0, VT, (1, T), generator=g),
        "W": make_W(VS, VT, seed=seed),
        "chunks": torch.tensor([CHUNKS]),
        "same_chunks": torch.tensor([[(i, i + 1, i, i + 1) for i in range(S)]]),
    }


def _specs(c: dict, merge: str = "chain", mode: str = "pkl") -> list:
    cross = kd.TeacherLossSpec(
        TeacherConfig(name="cross", mode=mode, alpha=ALPHAS["cross"], merge=merge),
        VT,
        projection=P.prepare_projection(c["W"], VS_PAD, VT_PAD),
        W=c["W"],
    )
    same = kd.TeacherLossSpec(TeacherConfig(name="same", mode="kl", alpha=ALPHAS["same"], merge=merge), VS)
    return [cross, same]


def _simple_ce(logits, labels, loss_mask, vocab_size):
    """student_ce without megatron's parallel state (one rank): mean CE over the real vocab."""
    logp = torch.log_softmax(logits[..., :vocab_size].float(), -1)
    return -(logp.gather(-1, labels[..., None]).squeeze(-1) * loss_mask).sum() / loss_mask.sum()


def _move_floors(monkeypatch, factor: float) -> None:
    """Scale every clamp/eps/floor of the KD path by ``factor`` (those that exist in this code)."""
    for module in (R, pkl, hybrid):  # the modules that read MASS_CLAMP / PROB_FLOOR when they run
        for name, default in (("MASS_CLAMP", 1e-12), ("PROB_FLOOR", 1e-30)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, default * factor)
    for name in ("pkl_loss_parallel_parts", "pkl_loss_parallel"):  # eps is a keyword of P-KL
        if hasattr(teacher_loss, name):  # the mode registry's P-KL calls it from there
            monkeypatch.setattr(teacher_loss, name, partial(getattr(teacher_loss, name), eps=R.DEFAULT_EPS * factor))


def _step(c: dict, merge: str = "chain", mode: str = "pkl") -> dict:
    student = c["s"].clone().requires_grad_(True)
    outputs = [(c["t"], c["t_labels"], c["chunks"]), (c["t_same"], c["labels"], c["same_chunks"])]
    losses = kd.distillation_loss(
        student,
        c["labels"],
        torch.ones(1, S),
        VS,
        _specs(c, merge, mode),
        outputs,
        kd.KDOptions(kd_scaling="dynamic", alpha_mode="static", alpha_temperature=1.0, block_size=3),
    )
    losses.total.backward()
    out = {"kd": losses.kd.detach(), "kd_scale": losses.kd_scale.detach(), "grad": student.grad.clone()}
    out.update({f"kd/{n}": v.detach() for n, v in losses.per_teacher.items()})
    out.update({f"kd_const/{n}": v for n, v in getattr(losses, "per_teacher_const", {}).items()})
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("merge", ["chain", "first"])
def test_moving_clamp_and_eps_by_1e4_changes_nothing_that_trains(monkeypatch, dtype, merge):
    monkeypatch.setattr(kd, "student_ce", _simple_ce)
    c = _case(dtype)
    results = []
    for factor in FACTORS:
        with monkeypatch.context() as m:
            _move_floors(m, factor)
            results.append(_step(c, merge))
    base = results[0]
    assert math.isfinite(base["kd"]) and base["kd"] > 0 and base["kd_scale"] > 0
    for factor, res in zip(FACTORS[1:], results[1:]):
        for key in ("kd", "kd_scale", "kd/cross", "kd/same"):
            rel = abs(float(res[key] - base[key])) / abs(float(base[key]))
            assert rel < 1e-3, f"{key} moved by {rel:.2%} when the clamps/eps were scaled by {factor:g}"
        g, g0 = res["grad"], base["grad"]
        assert float((g - g0).norm() / g0.norm()) < 1e-3, f"gradient moved (factor {factor:g})"
        torch.testing.assert_close(g, g0, rtol=1e-3, atol=1e-5 * float(g0.abs().max()))
        # the constant is what carries the clamps: it moves (log 10^4 = 9.2 nats per unit of mass)
        assert abs(float(res["kd_const/cross"] - base["kd_const/cross"])) > 1e-3


def test_one_token_student_chunk_has_finite_trainable_loss_and_a_separate_constant():
    """Student "201" (one token, log c_S = 0 exactly) against teacher "2" "0" "1" (c_T < 1)."""
    c = _case(torch.float64)
    s, t = c["s"][0].clone().requires_grad_(True), c["t"][0]
    s_pos = [range(a, b) for a, b, _, _ in CHUNKS]
    t_pos = [range(a, b) for _, _, a, b in CHUNKS]
    s_mass = P.chunk_log_mass_parallel(s, s_pos, VS, c["labels"][0])
    t_mass = P.chunk_log_mass_parallel(t, t_pos, VT, c["t_labels"][0])
    assert s_mass[0] == 0 and t_mass[0] < -0.1  # c_S = 1 exactly, c_T well below 1
    multi = torch.tensor([b - a > 1 for a, b, _, _ in CHUNKS])
    assert bool((s_mass[multi] < 0).all()) and bool((s_mass[~multi] == 0).all())
    assert -1e-12 < s_mass[1] < 0  # chunk 1's later token is near-certain, yet log c_S < 0
    first_s, first_t = [r[0] for r in s_pos], [r[0] for r in t_pos]
    shape = P.pkl_loss_parallel_parts(s[first_s], t[first_t], c["W"], VS, VT, reduction="none")
    parts = R.chunk_mass_kl_parts(s_mass, t_mass, shape, reduction="none")
    assert bool(torch.isfinite(parts.trainable).all()) and bool((parts.trainable >= -1e-12).all())
    # chunk 0: the teacher's rest bucket (1 - c_T) is out of reach, on top of the unreached columns
    c_t = t_mass.exp()
    torch.testing.assert_close(parts.uncovered, c_t * shape.uncovered + torch.where(s_mass == 0, 1 - c_t, 0 * c_t))
    assert parts.constant[0] > (1 - c_t[0]) * 20  # ~ (1 - c_T) * log(1 / 1e-12) = 27.6 (1 - c_T) nats
    # the clamped total (what the loss used to be) is trainable + constant
    torch.testing.assert_close(parts.total, parts.trainable + parts.constant)
    # the trainable part of chunk 0 is c_T times the shape loss: the rest bucket does not train
    torch.testing.assert_close(parts.trainable[0], c_t[0] * shape.trainable[0])
    parts.trainable.sum().backward()
    assert bool(torch.isfinite(s.grad).all()) and float(s.grad[0].abs().max()) > 0


def test_trainable_part_is_kl_over_reachable_outcomes():
    """trainable = M * KL(teacher renormalized to the reachable outcomes || student) >= 0, 0 at the
    best fit the student can reach; trainable + constant = the clamped full KL."""
    c = _case(torch.float64)
    W = c["W"]
    reached = R.reached_columns(W)
    assert 0 < int(reached.sum()) < VT
    s = c["s"][0, :, :VS]
    # a teacher with half its mass on unreached columns and the other half proportional to q on the
    # reached ones: trainable = 0.5 * KL(q / Q || q) = -0.5 log Q (Q < 1: mass on zero rows of W is
    # lost), whatever the constant of the unreached half
    q = R.project(torch.softmax(s, -1), W)
    mass = q.sum(-1, keepdim=True)
    p_t = torch.where(reached, q / mass / 2, 0.5 / int((~reached).sum()))
    parts = R.pkl_loss_parts(s, p_t.log(), W, reduction="none")
    torch.testing.assert_close(parts.trainable, -0.5 * mass.squeeze(-1).log(), rtol=1e-6, atol=1e-7)  # W is fp32
    torch.testing.assert_close(parts.uncovered, torch.full((S,), 0.5, dtype=torch.float64))
    # against a direct computation of the clamped full KL
    t = c["t"][0, :S, :VT]
    parts = R.pkl_loss_parts(s, t, W, reduction="none")
    pt = torch.softmax(t, -1)
    full = (torch.xlogy(pt, pt) - pt * torch.where(reached, q.clamp_min(1e-30), torch.full_like(q, 1e-8)).log()).sum(-1)
    torch.testing.assert_close(parts.total, full)
    m = pt[:, reached].sum(-1)
    kl_renorm = ((pt / m[:, None]) * ((pt / m[:, None]).log() - q.log()))[:, reached].sum(-1)
    torch.testing.assert_close(parts.trainable, m * kl_renorm)
    assert bool((parts.trainable > 0).all())


def test_gold_common_mass_floor_is_only_an_underflow_guard():
    """GOLD/H-KL: every common teacher token has a student partner, so its q_C is never a structural
    zero; the floor under it must not touch a probability of 1e-12 (it used to be 1e-8)."""
    c = _case(torch.float64)
    s = c["s"][0, :, :VS].clone()
    t = c["t"][0, :S, :VT]
    pairs = R.hkl_pairs(c["W"])
    s[:, pairs[:3, 0]] = -27.0  # common student tokens at p_S ~ 1e-12
    base_eps = getattr(R, "PROB_FLOOR", R.DEFAULT_EPS)
    values, grads = [], []
    for factor in FACTORS:
        x = s.clone().requires_grad_(True)
        loss = R.gold_loss(x, t, pairs, eps=base_eps * factor)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    for v, g in zip(values[1:], grads[1:]):
        assert abs(float(v - values[0])) / abs(float(values[0])) < 1e-3
        torch.testing.assert_close(g, grads[0], rtol=1e-3, atol=1e-5 * float(grads[0].abs().max()))
    # and the vocab-parallel path agrees with the reference at the default
    x = s.clone().requires_grad_(True)
    torch.testing.assert_close(P.gold_loss_parallel(x, t, pairs, VS, VT), values[0])


def test_near_certain_later_token_keeps_its_bernoulli_term():
    """A later token with p = 1 - 1e-9 gives log c_S = -1e-9, not 0: the rest-bucket term
    (1 - c_T) log((1 - c_T) / 1e-9) is computed exactly and trains (fp32 log_softmax would round
    log p to 0 and lose it)."""
    logits = torch.zeros(2, 6)
    logits[1, 2] = math.log(5 / 1e-9)  # p(target 2 | position 1) = 1 - 1e-9 (5 others at logit 0)
    targets = torch.tensor([0, 2])
    m = R.merge_chunks(logits, [[0, 1]], targets, mode="chain")
    assert m.log_mass[0] < 0
    torch.testing.assert_close(m.log_mass[0], torch.tensor(-1e-9), rtol=1e-3, atol=0)
    mp = P.merge_chunks_parallel(logits, [[0, 1]], 6, targets, mode="chain")
    torch.testing.assert_close(mp.log_mass, m.log_mass, rtol=1e-5, atol=0)
    parts = R.chunk_mass_kl_parts(m.log_mass, torch.tensor([-0.5]), reduction="none")
    assert float(parts.uncovered[0]) == 0.0 and float(parts.constant[0]) == 0.0
    expected = math.exp(-0.5) * (-0.5 + 1e-9) + (1 - math.exp(-0.5)) * (math.log(1 - math.exp(-0.5)) - math.log(1e-9))
    assert float(parts.trainable[0]) == pytest.approx(expected, rel=1e-5)
