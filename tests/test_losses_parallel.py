"""Vocab-parallel losses: TP=2 (two gloo processes) == TP=1 == reference, values and gradients.

All TP=2 cases run in ONE spawned 2-process run (module-scoped fixture); each test asserts on
its part of the results. Vocab sizes are not multiples of tp and the padded columns hold garbage
logits that must be masked; W has rows with 0 to 4 non-zeros.
"""

from __future__ import annotations

import math

import pytest
import torch

import xtoken_nemo.losses as P
from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import reference as R
from xtoken_nemo.vocab.projection import ProjectionMatrix

N, VS, VT = 7, 37, 45  # chunks, real vocab sizes (odd: not divisible by tp)
PAD = 8  # pad vocab to a multiple of PAD (Megatron pads to 128 * tp)
VS_PAD, VT_PAD = 40, 48
BLOCK = 3  # several blocks, the last one partial
TP = 2


def make_W(num_student: int = VS, num_teacher: int = VT, seed: int = 0) -> ProjectionMatrix:
    """W with rows of 0, 1, 2, 3, 4 non-zeros (row r has r % 5), rows normalized; 1-nnz rows weight 1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((num_student, 4), -1, dtype=torch.int64)
    val = torch.zeros(num_student, 4)
    for r in range(num_student):
        k = r % 5
        if k:
            idx[r, :k] = torch.randperm(num_teacher, generator=g)[:k]
            v = torch.rand(k, generator=g) + 0.05
            val[r, :k] = v / v.sum()
    return ProjectionMatrix(idx, val, num_teacher)


def exact_pairs(W: ProjectionMatrix) -> torch.Tensor:
    """1-to-1 (student, teacher) pairs from W's single-entry rows (the 'exact matches')."""
    seen, pairs = set(), []
    for r in range(W.shape[0]):
        row = W.row(r)
        if len(row) == 1:
            t = next(iter(row))
            if t not in seen:
                seen.add(t)
                pairs.append((r, t))
    return torch.tensor(pairs, dtype=torch.int64)


def make_case(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Full padded logits (garbage in padded columns), W, pairs, per-chunk loss weights."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, VS_PAD, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, VT_PAD, generator=g, dtype=torch.float64) * 2
    t_same = torch.randn(N, VS_PAD, generator=g, dtype=torch.float64) * 2  # same-tokenizer teacher
    s[:, VS:] = 50.0  # padded columns: huge garbage that would dominate the softmax if not masked
    t[:, VT:] = 50.0
    t_same[:, VS:] = 50.0
    W = make_W(seed=seed)
    return {
        "s": s.to(dtype),
        "t": t.to(dtype),
        "t_same": t_same.to(dtype),
        "W": W,
        "pairs": exact_pairs(W),
        "weights": torch.rand(N, generator=g, dtype=torch.float64) + 0.5,
    }


def _shard_cols(x: torch.Tensor, rank: int, ws: int) -> torch.Tensor:
    w = x.shape[-1] // ws
    return x[..., rank * w : (rank + 1) * w].contiguous()


# ---- the cases: name -> (parallel call on local shards, reference call on full real logits) ----
def parallel_cases(c: dict, group=None) -> dict:
    """name -> fn(s_local, t_local_or_same, rank, ws) -> per-chunk [N] loss (parallel)."""
    kw = dict(group=group, block_size=BLOCK, reduction="none")
    return {
        "kl": lambda s, t, ts: P.kl_loss_parallel(s, ts, VS, **kw),
        "kl_T2": lambda s, t, ts: P.kl_loss_parallel(s, ts, VS, temperature=2.0, **kw),
        "uld": lambda s, t, ts: P.uld_loss_parallel(s, t, VS, VT, **kw),
        "uld_topk_exact": lambda s, t, ts: P.uld_loss_parallel(s, t, VS, VT, uld_topk=64, **kw),
        "gold": lambda s, t, ts: P.gold_loss_parallel(s, t, c["pairs"], VS, VT, **kw),
        "gold_overlap": lambda s, t, ts: P.gold_loss_parallel(
            s, t, c["pairs"], VS, VT, weighting="vocab_overlap", **kw
        ),
        "pkl": lambda s, t, ts: P.pkl_loss_parallel(s, t, c["W"], VS, VT, **kw),
        "pkl_T2": lambda s, t, ts: P.pkl_loss_parallel(s, t, c["W"], VS, VT, temperature=2.0, **kw),
        "hkl": lambda s, t, ts: P.hkl_loss_parallel(s, t, c["W"], VS, VT, **kw),
        # the exact full sort (uld_method="sort"); the cases above use the default "hist" (no sort)
        "uld_sort": lambda s, t, ts: P.uld_loss_parallel(s, t, VS, VT, uld_method="sort", **kw),
        "gold_sort": lambda s, t, ts: P.gold_loss_parallel(s, t, c["pairs"], VS, VT, uld_method="sort", **kw),
        "hkl_sort": lambda s, t, ts: P.hkl_loss_parallel(s, t, c["W"], VS, VT, uld_method="sort", **kw),
        "hkl_T2": lambda s, t, ts: P.hkl_loss_parallel(s, t, c["W"], VS, VT, temperature=2.0, **kw),
    }


def reference_cases(c: dict) -> dict:
    t, ts = c["t"][:, :VT], c["t_same"][:, :VS]
    return {
        "kl": lambda x: R.kl_loss(x, ts, reduction="none"),
        "kl_T2": lambda x: R.kl_loss(x, ts, temperature=2.0, reduction="none"),
        "uld": lambda x: R.uld_loss(x, t, reduction="none"),
        "uld_topk_exact": lambda x: R.uld_loss(x, t, reduction="none"),
        "gold": lambda x: R.gold_loss(x, t, c["pairs"], reduction="none"),
        "gold_overlap": lambda x: R.gold_loss(x, t, c["pairs"], weighting="vocab_overlap", reduction="none"),
        "pkl": lambda x: R.pkl_loss(x, t, c["W"], reduction="none"),
        "pkl_T2": lambda x: R.pkl_loss(x, t, c["W"], temperature=2.0, reduction="none"),
        "hkl": lambda x: R.hkl_loss(x, t, c["W"], reduction="none"),
        "uld_sort": lambda x: R.uld_loss(x, t, reduction="none"),
        "gold_sort": lambda x: R.gold_loss(x, t, c["pairs"], reduction="none"),
        "hkl_sort": lambda x: R.hkl_loss(x, t, c["W"], reduction="none"),
        "hkl_T2": lambda x: R.hkl_loss(x, t, c["W"], temperature=2.0, reduction="none"),
    }


CHAIN_S = [[0], [1, 2], [3, 4, 5], [6]]  # student positions per chunk
CHAIN_T = [[0, 1, 2], [3], [4, 5], [6]]  # teacher positions per chunk


def merge_objective(
    logits: torch.Tensor, log_mass: torch.Tensor, weights: torch.Tensor, start: int, ws: int
) -> torch.Tensor:
    """A linear functional of a merge's output whose per-rank partials sum to the full one.

    The log_mass term is used as it is on every rank, like the replicated losses: the merge's
    backward must count it once (not ws times).
    """
    cols = torch.arange(start, start + logits.shape[1])
    col_w = torch.where(cols < VS, cols.to(logits.dtype).sin(), torch.zeros((), dtype=logits.dtype))
    w = weights[: logits.shape[0]].to(logits.dtype)
    return (logits * col_w).sum() + (log_mass * w).sum()


def run_cases(c: dict, rank: int, ws: int, group=None) -> dict:
    """Every loss on this rank's shards: {name: (per-chunk loss [N], grad of sum(w * loss) [N, VS_PAD/ws])}."""
    out = {}
    t_loc = _shard_cols(c["t"], rank, ws)
    ts_loc = _shard_cols(c["t_same"], rank, ws)
    for name, fn in parallel_cases(c, group).items():
        s_loc = _shard_cols(c["s"], rank, ws).requires_grad_(True)
        per_chunk = fn(s_loc, t_loc, ts_loc)
        (per_chunk * c["weights"].to(per_chunk.dtype)).sum().backward()
        out[name] = (per_chunk.detach(), s_loc.grad.detach())
    # chunk merges (per-position logits [T, V]) and teacher confidences
    chunks = [[0], [1, 2], [3, 4, 5], [6]]
    targets = torch.tensor([3, 7, 36, 0, 20, 19, 5])  # student ids, some in each shard
    for mode in R.MERGE_MODES:
        s_loc = _shard_cols(c["s"], rank, ws).requires_grad_(True)
        m = P.merge_chunks_parallel(s_loc, chunks, VS, targets, mode=mode, group=group)
        obj = merge_objective(m.logits, m.log_mass, c["weights"], rank * s_loc.shape[1], ws)
        obj.backward()
        out[f"merge_{mode}"] = (m.logits.detach(), m.log_mass.detach(), s_loc.grad.detach())
    t_targets = torch.tensor([1, 44, 23, 22, 0, 10, 30])
    # P-KL split into trainable / constant / uncovered, and moving eps (only the constant moves)
    for name, eps in (("pkl_parts", R.DEFAULT_EPS), ("pkl_parts_eps", R.DEFAULT_EPS * 1e4)):
        s_loc = _shard_cols(c["s"], rank, ws).requires_grad_(True)
        parts = P.pkl_loss_parallel_parts(
            s_loc, t_loc, c["W"], VS, VT, eps=eps, group=group, block_size=BLOCK, reduction="none"
        )
        (parts.trainable * c["weights"]).sum().backward()
        out[name] = (torch.stack([parts.trainable, parts.constant, parts.uncovered]).detach(), s_loc.grad.detach())
    # chain merge + P-KL as the trainer composes them; chunk 0 is a one-token student side against
    # a three-token teacher side (c_S = 1 exactly: its rest bucket goes to the constant)
    s_loc = _shard_cols(c["s"], rank, ws).requires_grad_(True)
    s_mass = P.chunk_log_mass_parallel(s_loc, CHAIN_S, VS, targets, group=group)
    t_mass = P.chunk_log_mass_parallel(t_loc, CHAIN_T, VT, t_targets, group=group)
    shape = P.pkl_loss_parallel_parts(
        s_loc[[k[0] for k in CHAIN_S]],
        t_loc[[k[0] for k in CHAIN_T]],
        c["W"],
        VS,
        VT,
        group=group,
        block_size=BLOCK,
        reduction="none",
    )
    parts = R.chunk_mass_kl_parts(s_mass, t_mass, shape, reduction="none")
    (parts.trainable * c["weights"][: len(CHAIN_S)]).sum().backward()
    out["chain_pkl"] = (torch.stack([parts.trainable, parts.constant, parts.uncovered]).detach(), s_loc.grad.detach())
    for kind in ("ce", "entropy", "maxprob"):
        out[f"conf_{kind}"] = P.teacher_confidence_parallel(t_loc, kind, VT, targets=t_targets, group=group)
    # bad input seen by one rank only: every rank must raise the same clear error
    s_loc = _shard_cols(c["s"], rank, ws).clone()
    if rank == ws - 1:
        s_loc[2, 0] = float("nan")
    try:
        P.pkl_loss_parallel(s_loc, t_loc, c["W"], VS, VT, group=group)
        out["nan_error"] = None
    except LossInputError as exc:
        out["nan_error"] = str(exc)
    # bf16 input: fp32 accumulation, gradient in bf16
    s_bf = _shard_cols(c["s"], rank, ws).to(torch.bfloat16).requires_grad_(True)
    loss = P.pkl_loss_parallel(s_bf, t_loc.to(torch.bfloat16), c["W"], VS, VT, group=group, block_size=BLOCK)
    loss.backward()
    out["pkl_bf16"] = (loss.detach(), s_bf.grad.detach())
    return out


def _tp2_worker(rank: int, world_size: int, seed: int) -> dict:
    from megatron.core import parallel_state

    from xtoken_nemo.losses import hybrid, uld_hist

    # TP=2 runs GOLD/H-KL/ULD with 2-row passes (common-pair slots, ULD keys), TP=1 with the defaults:
    # the comparison below also checks that the pass size does not change the result
    hybrid.COMMON_ROWS, uld_hist.KEY_ROWS = 2, 2
    c = make_case(seed)
    group = parallel_state.get_tensor_model_parallel_group()
    return run_cases(c, parallel_state.get_tensor_model_parallel_rank(), world_size, group=None) | {
        "_group_ok": group is not None
    }


@pytest.fixture(scope="module")
def case() -> dict:
    return make_case(0)


@pytest.fixture(scope="module")
def tp1(case) -> dict:
    return run_cases(case, 0, 1)


@pytest.fixture(scope="module")
def tp2() -> list[dict]:
    from distributed_utils import run_distributed

    return run_distributed(_tp2_worker, world_size=2, tp=TP, args=(0,))


def _reference(case: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = case["s"][:, :VS].clone().requires_grad_(True)
    per_chunk = reference_cases(case)[name](x)
    (per_chunk * case["weights"]).sum().backward()
    return per_chunk.detach(), x.grad


LOSS_NAMES = list(reference_cases(make_case(0)))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_tp1_equals_reference(case, tp1, name):
    ref_loss, ref_grad = _reference(case, name)
    loss, grad = tp1[name]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad[:, :VS], ref_grad, rtol=1e-8, atol=1e-10)
    assert bool((grad[:, VS:] == 0).all()), "padded vocab columns must get zero gradient"


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_tp2_equals_tp1_and_reference(case, tp1, tp2, name):
    ref_loss, ref_grad = _reference(case, name)
    (l0, g0), (l1, g1) = tp2[0][name], tp2[1][name]
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)  # replicated on both ranks
    torch.testing.assert_close(l0, tp1[name][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(l0, ref_loss, rtol=1e-9, atol=1e-10)
    grad = torch.cat([g0, g1], dim=1)  # [N, VS_PAD]
    torch.testing.assert_close(grad, tp1[name][1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grad[:, :VS], ref_grad, rtol=1e-8, atol=1e-10)
    assert bool((grad[:, VS:] == 0).all())


@pytest.mark.distributed
@pytest.mark.parametrize("mode", R.MERGE_MODES)
def test_tp2_chunk_merge_equals_reference(case, tp1, tp2, mode):
    chunks = [[0], [1, 2], [3, 4, 5], [6]]
    targets = torch.tensor([3, 7, 36, 0, 20, 19, 5])
    x = case["s"].clone().requires_grad_(True)
    ref = R.merge_chunks(x[:, :VS], chunks, targets, mode=mode)
    merge_objective(ref.logits, ref.log_mass, case["weights"], 0, 1).backward()
    for res in ([tp1], tp2):
        logits = torch.cat([r[f"merge_{mode}"][0] for r in res], dim=1)[:, :VS]
        torch.testing.assert_close(logits, ref.logits.detach(), rtol=1e-9, atol=1e-9)
        for r in res:
            torch.testing.assert_close(r[f"merge_{mode}"][1], ref.log_mass.detach(), rtol=1e-9, atol=1e-10)
        grad = torch.cat([r[f"merge_{mode}"][2] for r in res], dim=1)
        torch.testing.assert_close(grad, x.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.distributed
def test_tp2_teacher_confidence_and_errors(case, tp1, tp2):
    from xtoken_nemo.losses.weighting import teacher_confidence

    t = case["t"][:, :VT]
    targets = torch.tensor([1, 44, 23, 22, 0, 10, 30])
    for kind in ("ce", "entropy", "maxprob"):
        want = teacher_confidence(t, kind, targets=targets).to(torch.float64)
        for res in (tp1, *tp2):
            torch.testing.assert_close(res[f"conf_{kind}"].to(torch.float64), want, rtol=1e-5, atol=1e-6)
    for res in (tp1, *tp2):
        assert res["nan_error"] is not None and "NaN/inf" in res["nan_error"]
    assert all(r["_group_ok"] for r in tp2)


@pytest.mark.distributed
def test_tp2_bf16_close_to_reference(case, tp2):
    s = case["s"][:, :VS].to(torch.bfloat16).to(torch.float64).requires_grad_(True)
    t = case["t"][:, :VT].to(torch.bfloat16).to(torch.float64)
    ref = R.pkl_loss(s, t, case["W"])
    ref.backward()
    l0, g0 = tp2[0]["pkl_bf16"]
    l1, g1 = tp2[1]["pkl_bf16"]
    assert l0.dtype == torch.float32 and g0.dtype == torch.bfloat16
    torch.testing.assert_close(l0.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.cat([g0, g1], dim=1).double()[:, :VS]
    torch.testing.assert_close(grad, s.grad, rtol=2e-2, atol=2e-3)


def test_block_size_does_not_change_result(case):
    s = case["s"].clone().requires_grad_(True)
    grads, losses = [], []
    for block in (1, 3, N, 1000):
        s.grad = None
        loss = P.pkl_loss_parallel(s, case["t"], case["W"], VS, VT, block_size=block)
        loss.backward()
        losses.append(loss.detach())
        grads.append(s.grad.clone())
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0])
        torch.testing.assert_close(grad, grads[0])


def test_prepared_projection_reused(case):
    proj = P.prepare_projection(case["W"], VS_PAD, VT_PAD)
    a = P.pkl_loss_parallel(case["s"], case["t"], proj, VS, VT)
    b = P.pkl_loss_parallel(case["s"], case["t"], case["W"], VS, VT)
    torch.testing.assert_close(a, b)
    with pytest.raises(LossInputError, match="prepared for other shards"):
        P.pkl_loss_parallel(case["s"], case["t"], proj, VS, VT - 1)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, c: P.kl_loss_parallel(x, c["t_same"], VS, block_size=BLOCK),
        lambda x, c: P.pkl_loss_parallel(x, c["t"], c["W"], VS, VT, block_size=BLOCK),
        lambda x, c: P.gold_loss_parallel(x, c["t"], c["pairs"], VS, VT, block_size=BLOCK),
        lambda x, c: P.hkl_loss_parallel(x, c["t"], c["W"], VS, VT, block_size=BLOCK),
        lambda x, c: P.uld_loss_parallel(x, c["t"], VS, VT, block_size=BLOCK),
        lambda x, c: P.gold_loss_parallel(x, c["t"], c["pairs"], VS, VT, block_size=BLOCK, uld_method="sort"),
    ],
    ids=["kl", "pkl", "gold", "hkl", "uld", "gold_sort"],
)
def test_gradcheck_parallel_tp1(case, fn):
    x = case["s"][:4].clone().requires_grad_(True)
    c = dict(case, s=case["s"][:4], t=case["t"][:4], t_same=case["t_same"][:4])
    assert torch.autograd.gradcheck(lambda y: fn(y, c), (x,), eps=1e-6, atol=1e-5)


def test_parallel_bad_input(case):
    s, t, W = case["s"], case["t"], case["W"]
    with pytest.raises(LossInputError, match="W has shape"):
        P.pkl_loss_parallel(s, t, W, VS, VT - 1)
    with pytest.raises(LossInputError, match="does not fit"):
        P.pkl_loss_parallel(s, t, W, VS_PAD + 1, VT)
    bad = t.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(LossInputError, match="NaN/inf"):
        P.pkl_loss_parallel(s, bad, W, VS, VT)
    with pytest.raises(LossInputError, match="no chunks"):
        P.kl_loss_parallel(s[:0], s[:0], VS)
    with pytest.raises(LossInputError, match="one vocabulary"):
        P.kl_loss_parallel(s, t, VS)
    with pytest.raises(LossInputError, match="empty chunk list"):
        P.merge_chunks_parallel(s, [], VS, mode="first")


def _reference_chain_pkl(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = case["s"][:, :VS].clone().requires_grad_(True)
    t = case["t"][:, :VT]
    s_targets = torch.tensor([3, 7, 36, 0, 20, 19, 5])
    t_targets = torch.tensor([1, 44, 23, 22, 0, 10, 30])
    sm = R.merge_chunks(x, CHAIN_S, s_targets, mode="chain")
    tm = R.merge_chunks(t, CHAIN_T, t_targets, mode="chain")
    shape = R.pkl_loss_parts(sm.logits, tm.logits, case["W"], reduction="none")
    parts = R.chunk_mass_kl_parts(sm.log_mass, tm.log_mass, shape, reduction="none")
    (parts.trainable * case["weights"][: len(CHAIN_S)]).sum().backward()
    assert sm.log_mass[0] == 0 and tm.log_mass[0] < 0 and parts.constant[0] > 0 and parts.uncovered[0] > 0
    return torch.stack([parts.trainable, parts.constant, parts.uncovered]).detach(), x.grad


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["pkl_parts", "chain_pkl"])
def test_tp2_loss_parts_equal_tp1_and_reference(case, tp1, tp2, name):
    """Trainable part, constant and uncovered mass: TP=2 == TP=1 == reference, values and gradients."""
    if name == "pkl_parts":
        x = case["s"][:, :VS].clone().requires_grad_(True)
        parts = R.pkl_loss_parts(x, case["t"][:, :VT], case["W"], reduction="none")
        (parts.trainable * case["weights"]).sum().backward()
        ref, ref_grad = torch.stack([parts.trainable, parts.constant, parts.uncovered]).detach(), x.grad
    else:
        ref, ref_grad = _reference_chain_pkl(case)
    assert bool((ref[2] > 0).all()), "every chunk has teacher mass on columns no W row reaches"
    for res in ([tp1], tp2):
        for r in res:
            torch.testing.assert_close(r[name][0], ref, rtol=1e-9, atol=1e-10)
        grad = torch.cat([r[name][1] for r in res], dim=1)
        torch.testing.assert_close(grad[:, :VS], ref_grad, rtol=1e-8, atol=1e-10)
        assert bool((grad[:, VS:] == 0).all())


@pytest.mark.distributed
def test_tp2_eps_moves_only_the_constant(tp1, tp2):
    for res in (tp1, *tp2):
        (base, g0), (moved, g1) = res["pkl_parts"], res["pkl_parts_eps"]
        torch.testing.assert_close(moved[0], base[0], rtol=0, atol=0)  # trainable: bit-identical
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)
        torch.testing.assert_close(moved[2], base[2], rtol=0, atol=0)  # uncovered mass: no eps in it
        torch.testing.assert_close(moved[1] - base[1], -base[2] * math.log(1e4))  # constant: -U log(10^4)
