"""Reference losses: properties (Proposition 1, P-KL zero/non-negative), gradcheck, chunk merges,
multi-teacher weighting and KD/CE scaling, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_losses_parallel import VS, VT, exact_pairs, make_case, make_W

from xtoken_nemo.errors import LossInputError, XTokenError
from xtoken_nemo.losses import gold_loss_parallel, pkl_loss_parallel
from xtoken_nemo.losses import reference as R
from xtoken_nemo.losses import weighting as Wt
from xtoken_nemo.vocab.projection import ProjectionMatrix


@pytest.fixture(scope="module")
def case():
    c = make_case(1)
    c["s"], c["t"], c["t_same"] = c["s"][:, :VS], c["t"][:, :VT], c["t_same"][:, :VS]
    return c


# ----- Proposition 1 and the numeral example ---------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "parallel_tp1"])
def test_proposition1_gold_common_term_pushes_uncommon_down(case, impl):
    """d L_common / d z_j = p_S[j] * M_C(T) >= 0 for every uncommon student token j."""
    s = case["s"].clone().requires_grad_(True)
    t, pairs = case["t"], case["pairs"]
    if impl == "reference":
        per_chunk = R.gold_loss(s, t, pairs, weighting=(1.0, 0.0), reduction="none")
    else:
        per_chunk = gold_loss_parallel(s, t, pairs, VS, VT, weighting=(1.0, 0.0), reduction="none", block_size=2)
    per_chunk.sum().backward()
    p_s, p_t = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    m_c = p_t[:, torch.unique(pairs[:, 1])].sum(-1)  # teacher mass on the common set [N]
    uncommon = torch.ones(VS, dtype=torch.bool)
    uncommon[pairs[:, 0]] = False
    assert uncommon.sum() > 10
    g = s.grad[:, uncommon]
    assert bool((g >= 0).all())
    torch.testing.assert_close(g, p_s[:, uncommon] * m_c[:, None], rtol=1e-10, atol=1e-12)


def _numeral_setup():
    """Student token 3 = "201" (uncommon); teacher pieces "2","0","1" = ids 0,1,2 carry mass."""
    v_s, v_t = 6, 7
    idx = torch.full((v_s, 4), -1, dtype=torch.int64)
    val = torch.zeros(v_s, 4)
    # exact matches: student 0,1,2 = teacher 0,1,2 ("2","0","1"); student 4 = teacher 4; 5 = 5
    for s_id, t_id in [(0, 0), (1, 1), (2, 2), (4, 4), (5, 5)]:
        idx[s_id, 0], val[s_id, 0] = t_id, 1.0
    idx[3, :3] = torch.tensor([0, 1, 2])  # "201" -> "2" + "0" + "1", beta * gamma^i normalized
    val[3, :3] = torch.tensor([0.9, 0.09, 0.009]) / 0.999
    W = ProjectionMatrix(idx, val, v_t)
    student = torch.zeros(1, v_s, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[4.0, 0.5, 0.5, -2.0, 0.0, 0.0, -1.0]], dtype=torch.float64)  # "2" likely
    pairs = torch.tensor([[0, 0], [1, 1], [2, 2], [4, 4], [5, 5]])
    return W, student, teacher, pairs


def test_pkl_pulls_numeral_up_gold_pushes_it_down():
    W, student, teacher, pairs = _numeral_setup()
    R.pkl_loss(student, teacher, W).backward()
    assert student.grad[0, 3] < 0, "P-KL must pull the numeral '201' up (negative gradient)"
    g_pkl_par = student.grad.clone()
    student.grad = None
    pkl_loss_parallel(student, teacher, W, 6, 7).backward()
    torch.testing.assert_close(student.grad, g_pkl_par)
    student.grad = None
    R.gold_loss(student, teacher, pairs, weighting=(1.0, 0.0)).backward()
    assert student.grad[0, 3] > 0, "GOLD's common KL pushes the uncommon numeral down (Proposition 1)"


# ----- P-KL zero / non-negative, gradcheck ------------------------------------------------------
def test_pkl_zero_when_projection_matches_teacher():
    W = make_W(VS, VT, seed=3)
    idx, val = W.indices.clone(), W.values.clone()
    zero_rows = W.row_nnz() == 0
    idx[zero_rows, 0] = torch.nonzero(zero_rows).squeeze(1) % VT  # no zero rows: W^T p_S sums to 1
    val[zero_rows, 0] = 1.0
    W_full = ProjectionMatrix(idx, val, VT)
    s = torch.randn(5, VS, dtype=torch.float64)
    q = R.project(torch.softmax(s, -1), W_full)
    torch.testing.assert_close(q.sum(-1), torch.ones(5, dtype=torch.float64))
    teacher = q.clamp_min(1e-300).log()  # p_T = W^T p_S exactly (unreached columns: ~0)
    assert (
        R.pkl_loss(s, teacher, W_full, reduction="none").abs().max() < 1e-7
    )  # W is float32: rows sum to 1 within ~1e-8
    assert (
        pkl_loss_parallel(s, teacher, W_full, VS, VT, reduction="none").abs().max() < 1e-7
    )  # W is float32: rows sum to 1 within ~1e-8
    assert R.pkl_loss(s + torch.randn_like(s), teacher, W_full, reduction="none").min() > 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_pkl_non_negative(seed):
    g = torch.Generator().manual_seed(seed)
    W = make_W(VS, VT, seed=seed)
    s = torch.randn(6, VS, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, VT, generator=g, dtype=torch.float64) * 3
    assert R.pkl_loss(s, t, W, reduction="none").min() >= 0
    assert R.kl_loss(s, t[:, :VS], reduction="none").min() >= -1e-12


def test_pkl_dense_and_sparse_W_agree(case):
    a = R.pkl_loss(case["s"], case["t"], case["W"])
    b = R.pkl_loss(case["s"], case["t"], case["W"].to_dense(torch.float64))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", ["kl", "pkl", "gold", "hkl", "uld"])
def test_gradcheck_reference(case, loss):
    x = case["s"][:3].clone().requires_grad_(True)
    t, ts = case["t"][:3], case["t_same"][:3]
    fns = {
        "kl": lambda y: R.kl_loss(y, ts, temperature=1.5),
        "pkl": lambda y: R.pkl_loss(y, t, case["W"], temperature=1.5),
        "gold": lambda y: R.gold_loss(y, t, case["pairs"]),
        "hkl": lambda y: R.hkl_loss(y, t, case["W"]),
        "uld": lambda y: R.uld_loss(y, t),
    }
    assert torch.autograd.gradcheck(fns[loss], (x,), eps=1e-6, atol=1e-5)


def test_losses_of_identical_distributions_are_zero(case):
    s = case["s"]
    assert R.kl_loss(s, s) < 1e-12
    assert R.uld_loss(s, s + 3.0) < 1e-12
    eye = ProjectionMatrix(torch.tensor([[i, -1, -1, -1] for i in range(VS)]), torch.tensor([[1.0, 0, 0, 0]] * VS), VS)
    assert R.pkl_loss(s, s, eye) < 1e-9
    assert R.hkl_loss(s, s, eye) < 1e-9  # all pairs common: the common KL is the full KL


def test_hkl_pairs_grow_the_common_set(case):
    W = case["W"]
    pairs = R.hkl_pairs(W)
    exact = exact_pairs(W)
    assert set(map(tuple, exact.tolist())) <= set(map(tuple, pairs.tolist()))
    assert pairs.shape[0] == int((W.row_nnz() > 0).sum())
    torch.testing.assert_close(pairs, W.argmax_pairs())
    assert R.hkl_pairs(W, min_weight=0.6).shape[0] < pairs.shape[0]


def test_gold_vocab_overlap_weights_follow_trl(case):
    s, t, pairs = case["s"], case["t"], case["pairs"]
    common = R.gold_loss(s, t, pairs, weighting=(1.0, 0.0))
    uld = R.gold_loss(s, t, pairs, weighting=(0.0, 1.0))
    w = pairs.shape[0] / VT
    torch.testing.assert_close(R.gold_loss(s, t, pairs, weighting="vocab_overlap"), w * common + (1 - w) * uld)
    torch.testing.assert_close(R.gold_loss(s, t, pairs), common + uld)


# ----- chunk merges -------------------------------------------------------------------------------
def test_chain_merge_is_the_chain_rule():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64)
    targets = torch.tensor([2, 5, 1, 8, 0, 3])
    chunks = [[0, 1, 2], [3], [4, 5]]
    m = R.merge_chunks(logits, chunks, targets, mode="chain")
    logp = torch.log_softmax(logits, -1)
    for k, chunk in enumerate(chunks):
        joint = sum(logp[i, targets[i]] for i in chunk)  # log P(actual chunk) by the chain rule
        torch.testing.assert_close(m.log_values()[k, targets[chunk[0]]], joint)
        torch.testing.assert_close(m.logits[k], logp[chunk[0]])  # shape = first position
    assert bool((m.log_mass <= 0).all()) and m.log_mass[1] == 0


def test_logmean_and_first_merges():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    chunks = [[0, 1], [2, 3, 4]]
    logp = torch.log_softmax(logits, -1)
    lm = R.merge_chunks(logits, chunks, mode="logmean")
    torch.testing.assert_close(lm.log_values()[1], logp[2:5].mean(0))
    torch.testing.assert_close(lm.logits.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    assert bool((lm.log_mass <= 1e-12).all())
    first = R.merge_chunks(logits, chunks, mode="first")
    torch.testing.assert_close(first.logits, logp[[0, 2]])
    assert bool((first.log_mass == 0).all())


def test_chunk_mass_kl_is_kl_with_a_rest_bucket():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    log_cs, log_ct = -torch.rand(4, generator=g, dtype=torch.float64), -torch.rand(4, generator=g, dtype=torch.float64)
    shape = R.kl_loss(s, t, reduction="none")
    got = R.chunk_mass_kl(log_cs, log_ct, shape, reduction="none")
    ps = torch.cat([log_cs.exp()[:, None] * torch.softmax(s, -1), 1 - log_cs.exp()[:, None]], 1)
    pt = torch.cat([log_ct.exp()[:, None] * torch.softmax(t, -1), 1 - log_ct.exp()[:, None]], 1)
    torch.testing.assert_close(got, (pt * (pt.log() - ps.log())).sum(-1))


# ----- multi-teacher and scaling -------------------------------------------------------------------
def test_combine_static_alphas():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    total = Wt.combine_teachers([a, b], [0.8, 0.2])
    assert math.isclose(total.item(), 2.4, rel_tol=1e-6)
    total.backward()
    assert math.isclose(a.grad.item(), 0.8, rel_tol=1e-6) and math.isclose(b.grad.item(), 0.2, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["ce", "entropy", "maxprob"])
def test_adaptive_alphas_favor_the_confident_teacher(kind):
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (8,), generator=g)
    sharp = torch.randn(8, 10, generator=g)
    sharp[torch.arange(8), targets] += 8.0
    flat = torch.randn(8, 10, generator=g) * 0.1
    conf = [Wt.teacher_confidence(x, kind, targets) for x in (sharp, flat)]
    alphas = Wt.adaptive_alphas(conf, temperature=0.5)
    assert alphas[0] > alphas[1]
    assert math.isclose(float(alphas.sum()), 1.0, rel_tol=1e-6)
    Wt.combine_teachers([torch.tensor(1.0), torch.tensor(2.0)], alphas)  # accepted as static alphas too
    hot = Wt.adaptive_alphas(conf, temperature=1e6)
    torch.testing.assert_close(hot, torch.tensor([0.5, 0.5]), rtol=1e-4, atol=1e-4)


def test_dynamic_scaling():
    kd = torch.tensor(4.0, requires_grad=True)
    ce = torch.tensor(2.0, requires_grad=True)
    total = Wt.scale_kd_ce(kd, ce)
    assert math.isclose(total.item(), 4.0)  # sg(2/4) * 4 + 2
    total.backward()
    assert math.isclose(kd.grad.item(), 0.5) and math.isclose(ce.grad.item(), 1.0)  # stop-gradient on the ratio
    for mode, (w_kd, w_ce) in Wt.FIXED_WEIGHTINGS.items():
        assert math.isclose(Wt.scale_kd_ce(kd, ce, mode).item(), 4 * w_kd + 2 * w_ce, rel_tol=1e-6)
    assert math.isclose(Wt.scale_kd_ce(kd, ce, (1.0, 0.0)).item(), 4.0, rel_tol=1e-6)
    zero = Wt.scale_kd_ce(torch.tensor(0.0, requires_grad=True), ce)
    assert math.isfinite(zero.item()) and math.isclose(zero.item(), 2.0, rel_tol=1e-6)
    # a negative KD value (GOLD's partial-distribution KL can be < 0) keeps a positive scale:
    # gradient descent still lowers L_KD
    negative = torch.tensor(-4.0, requires_grad=True)
    Wt.scale_kd_ce(negative, ce.detach()).backward()
    assert math.isclose(negative.grad.item(), 0.5)


# ----- bad input -----------------------------------------------------------------------------------
def _bad_inputs(case):
    s, t, W, pairs = case["s"], case["t"], case["W"], case["pairs"]
    nan = s.clone()
    nan[1, 2] = float("nan")
    inf = t.clone()
    inf[0, 0] = float("inf")
    return {
        "W rows != student vocab": (lambda: R.pkl_loss(s[:, :-1], t, W), "W has shape"),
        "W cols != teacher vocab": (lambda: R.pkl_loss(s, t[:, :-1], W), "W has shape"),
        "dense W mismatch": (lambda: R.pkl_loss(s, t, W.to_dense()[:, :-1]), "W has shape"),
        "hkl W mismatch": (lambda: R.hkl_loss(s, t[:, :-2], W), "W has shape"),
        "negative dense W": (lambda: R.pkl_loss(s, t, -W.to_dense()), "negative"),
        "NaN student": (lambda: R.pkl_loss(nan, t, W), "NaN/inf"),
        "inf teacher": (lambda: R.gold_loss(s, inf, pairs), "NaN/inf"),
        "NaN kl": (lambda: R.kl_loss(nan, s), "NaN/inf"),
        "no chunks": (lambda: R.kl_loss(s[:0], s[:0]), "no chunks"),
        "chunk count": (lambda: R.kl_loss(s, s[:-1]), "chunks"),
        "kl vocab": (lambda: R.kl_loss(s, t), "vocab dim"),
        "empty chunk list": (lambda: R.merge_chunks(s, [], mode="first"), "empty chunk list"),
        "empty chunk": (lambda: R.merge_chunks(s, [[0], []], mode="first"), "empty"),
        "chunk out of range": (lambda: R.merge_chunks(s, [[0, 99]], mode="first"), "outside"),
        "chain without targets": (lambda: R.merge_chunks(s, [[0, 1]], mode="chain"), "target"),
        "unknown merge": (lambda: R.merge_chunks(s, [[0]], mode="max"), "unknown chunk merge"),
        "pairs out of range": (lambda: R.gold_loss(s, t, torch.tensor([[VS, 0]])), "outside"),
        "duplicate student pair": (lambda: R.gold_loss(s, t, torch.tensor([[1, 0], [1, 2]])), "more than one"),
        "negative alpha": (lambda: Wt.combine_teachers([torch.tensor(1.0)] * 2, [1.2, -0.2]), "non-negative"),
        "unnormalized alphas": (lambda: Wt.combine_teachers([torch.tensor(1.0)] * 2, [0.8, 0.8]), "sum to"),
        "alpha count": (lambda: Wt.combine_teachers([torch.tensor(1.0)] * 2, [1.0]), "one weight per teacher"),
        "no teachers": (lambda: Wt.combine_teachers([], []), "at least one teacher"),
        "NaN teacher loss": (lambda: Wt.combine_teachers([torch.tensor(float("nan"))], [1.0]), "NaN/inf"),
        "temperature": (lambda: R.kl_loss(s, s, temperature=0.0), "temperature"),
        "reduction": (lambda: R.kl_loss(s, s, reduction="sum"), "reduction"),
        "scaling mode": (lambda: Wt.scale_kd_ce(torch.tensor(1.0), torch.tensor(1.0), "heavy"), "unknown"),
        "confidence kind": (lambda: Wt.teacher_confidence(t, "margin"), "unknown confidence"),
        "1-d logits": (lambda: R.kl_loss(s[0], s[0]), "chunks, vocab"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs(make_case(1))))
def test_bad_input_raises_clear_error(case, name):
    fn, match = _bad_inputs(case)[name]
    with pytest.raises(LossInputError, match=match):
        fn()
    assert issubclass(LossInputError, XTokenError)


def test_host_alphas_are_the_same_softmax_as_the_tensor_alphas():
    """The trainer applies the previous step's alphas from host floats: the same rule as the
    per-micro-batch tensor form, and None (keep the old alphas) when a confidence is not finite."""
    from xtoken_nemo.losses import adaptive_alphas, adaptive_alphas_host

    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        for _ in range(50):
            conf = (torch.rand(3, generator=gen, dtype=torch.float64) * -6).tolist()
            host = adaptive_alphas_host(conf, temperature)
            assert host == pytest.approx(adaptive_alphas(conf, temperature).tolist(), abs=1e-6)
            assert sum(host) == pytest.approx(1.0, abs=1e-12)
    assert adaptive_alphas_host([-1.0, float("nan")], 1.0) is None
    assert adaptive_alphas_host([-1.0, float("-inf")], 1.0) is None
