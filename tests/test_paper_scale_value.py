"""The paper-parity value of the dynamic KD/CE scale (``train.kd_scale_value="paper"``, docs/losses.md,
"Which value sets the dynamic scale").

- the reference :func:`~xtoken_nemo.losses.reference.paper_pkl_value` is NVIDIA's P-KL (NeMo-RL's
  X-Token ``_compute_p_kl``), written out here literally, without its T^2 factor: top-k teacher
  columns by their max logit over the micro-batch, teacher renormalised on them, the projected
  student renormalised by its sum + 1e-10, log(q + 1e-10), unreached columns in the sum;
- the vocab-parallel value at TP=2 (gloo) == TP=1 == the reference, ties in the top-k included;
- ``"trainable"`` (the default) leaves ``distillation_loss`` as it was and computes no paper
  value; ``"paper"`` changes only the scale (and what it logs), not the loss that trains;
- the option is validated; the paper recipes use ``"paper"``, the CPU/debug/demo runs
  ``"trainable"``; a trainer run logs ``kd_paper/<teacher>`` and its ratio uses it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_distill import sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)
from test_loss_constants import ALPHAS, CHUNKS, _case, _simple_ce, _specs
from test_losses_parallel import VS, VS_PAD, VT, VT_PAD, _shard_cols, make_case

import xtoken_nemo.distill.kd as kd
from xtoken_nemo import losses as P
from xtoken_nemo.distill.config import ConfigError, DistillConfig, ModelConfig, TrainConfig, apply_overrides
from xtoken_nemo.losses import reference as R
from xtoken_nemo.losses.common import top_columns
from xtoken_nemo.losses.paper_pkl import paper_pkl_value_parallel
from xtoken_nemo.losses.weighting import dynamic_kd_scale

TOPKS = (10, 30, 1000)  # < V_T (truncation), > one rank's columns, > V_T (all columns)
TEMPERATURES = (1.0, 2.0)


# ----------------------------------------------------------------------------------------------
# the reference is NVIDIA's formula
# ----------------------------------------------------------------------------------------------
def nvidia_pkl(student_logits, teacher_logits, W_dense, vocab_topk, T):
    """NeMo-RL's P-KL (nemo_rl/algorithms/loss/loss_functions.py, ``_compute_p_kl``, forward KL)
    on [B, L, V] logits with one position per chunk, step by step as it computes it."""
    eps = 1e-10
    student_probs = torch.softmax(student_logits / T, dim=-1)
    v_t = W_dense.shape[1]
    teacher_logits = teacher_logits[..., :v_t]
    importance = teacher_logits.reshape(-1, v_t).max(dim=0).values  # microbatch-global
    top = torch.topk(importance, k=min(vocab_topk, v_t), dim=-1).indices.sort().values
    projected_topk = (student_probs @ W_dense)[..., top]  # M.t() @ p on the top-k columns
    target_log_probs = torch.log_softmax(teacher_logits[..., top] / T, dim=-1)
    B, L = student_logits.shape[:2]
    chunk_id = torch.arange(L).expand(B, L)  # chunk c = position c
    chunk_mask = (chunk_id.unsqueeze(-1) == torch.arange(L).view(1, 1, -1)).transpose(1, 2).to(student_probs.dtype)
    sizes = chunk_mask.sum(dim=2)
    proj_chunks = torch.bmm(chunk_mask, projected_topk) / (sizes.unsqueeze(-1) + eps)
    tgt_log_chunks = torch.bmm(chunk_mask, target_log_probs) / (sizes.unsqueeze(-1) + eps)
    proj_chunks = proj_chunks / (proj_chunks.sum(dim=-1, keepdim=True) + eps)
    proj_log_chunks = (proj_chunks + eps).log()
    per_chunk_kl = F.kl_div(proj_log_chunks, tgt_log_chunks, reduction="none", log_target=True).sum(dim=-1)
    return per_chunk_kl.sum() / (B * L) * (T * T), per_chunk_kl.reshape(-1) * (T * T)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_reference_is_nvidias_formula(T):
    c = make_case(seed=1)
    s, t, W = c["s"][:, :VS], c["t"][:, :VT], c["W"]
    k = 10
    want_mean, want = nvidia_pkl(s[None], t[None], W.to_dense(torch.float64), k, T)
    got = R.paper_pkl_value(s, t, W, T, topk=k, reduction="none")
    torch.testing.assert_close(got * T * T, want, rtol=1e-6, atol=1e-9)  # theirs carries T^2, ours not
    assert float(R.paper_pkl_value(s, t, W, T, topk=k)) * T * T == pytest.approx(float(want_mean), rel=1e-6)
    # a dense W gives the same value as the sparse one
    dense = R.paper_pkl_value(s, t, W.to_dense(torch.float64), T, topk=k, reduction="none")
    torch.testing.assert_close(dense, got, rtol=1e-12, atol=1e-12)
    # the case exercises what makes the value NVIDIA's: the truncation to k < V_T columns matters ...
    full = R.paper_pkl_value(s, t, W, T, topk=VT)
    assert abs(float(full) - float(got.mean())) > 1e-2 * float(full)
    # ... and some of the k columns are reached by no W row (their term p_T (log p_T - log 1e-10) is in)
    top = torch.topk(t.max(0).values, k).indices
    assert not bool(R.reached_columns(W)[top].all())
    # ... and it is not our trainable P-KL nor its total
    ours = R.pkl_loss_parts(s, t, W, T)
    assert abs(float(ours.trainable) - float(got.mean())) > 1e-2 and abs(float(ours.total) - float(got.mean())) > 1e-2


# ----------------------------------------------------------------------------------------------
# vocab-parallel: TP=2 == TP=1 == reference
# ----------------------------------------------------------------------------------------------
def _cases() -> dict:
    """name -> (student [N, VS_PAD], teacher [N, VT_PAD], W); padded columns hold garbage (50)
    that would be picked by the top-k if not masked; "ties": teacher logits on a coarse grid, so
    the k-th largest importance is shared by several columns."""
    c64 = make_case(seed=0)
    c32 = make_case(seed=2, dtype=torch.float32)
    ties = make_case(seed=3)
    t = torch.round(ties["t"] * 2) / 2
    t[:, VT:] = 50.0
    return {
        "fp64": (c64["s"], c64["t"], c64["W"]),
        "fp32": (c32["s"], c32["t"], c32["W"]),
        "ties": (ties["s"], t, ties["W"]),
    }


def _values(rank: int, ws: int, group=None) -> dict:
    out = {}
    for name, (s, t, W) in _cases().items():
        s_loc, t_loc = _shard_cols(s, rank, ws), _shard_cols(t, rank, ws)
        proj = P.prepare_projection(W, VS_PAD // ws, VT_PAD // ws, group)
        for k in TOPKS:
            for T in TEMPERATURES:
                out[(name, k, T)] = paper_pkl_value_parallel(
                    s_loc, t_loc, proj, VS, VT, T, topk=k, group=group, block_size=3, reduction="none"
                )
    return out


def _tp2_worker(rank: int, world_size: int) -> dict:
    return _values(rank, world_size)


@pytest.fixture(scope="module")
def tp2_values():
    from distributed_utils import run_distributed

    return run_distributed(_tp2_worker, world_size=2, tp=2)


def test_parallel_value_at_tp1_equals_the_reference():
    values = _values(0, 1)
    for name, (s, t, W) in _cases().items():
        for k in TOPKS:
            for T in TEMPERATURES:
                want = R.paper_pkl_value(s[:, :VS], t[:, :VT], W, T, topk=k, reduction="none")
                tol = 1e-12 if s.dtype == torch.float64 else 1e-5
                torch.testing.assert_close(values[(name, k, T)].to(want.dtype), want, rtol=tol, atol=tol)


@pytest.mark.distributed
def test_parallel_value_at_tp2_equals_tp1(tp2_values):
    one = _values(0, 1)
    for key, want in one.items():
        for r in tp2_values:
            tol = 1e-12 if want.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(r[key], want, rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def test_ties_at_the_kth_column_are_broken_by_the_lower_id():
    s, t, W = _cases()["ties"]
    importance = t[:, :VT].max(0).values
    k = 10
    kth = importance.sort(descending=True).values[k - 1]
    assert int((importance == kth).sum()) > 1 and int((importance > kth).sum()) < k  # a tie at the cut
    cols = top_columns(importance, k)
    tied = torch.nonzero(importance == kth).squeeze(1)
    n_tied_kept = k - int((importance > kth).sum())
    assert set(cols.tolist()) == set(torch.nonzero(importance > kth).squeeze(1).tolist()) | set(
        tied[:n_tied_kept].tolist()
    )


# ----------------------------------------------------------------------------------------------
# distillation_loss: "trainable" unchanged, "paper" changes only the scale
# ----------------------------------------------------------------------------------------------
def _losses(c: dict, merge: str, value: str | None, kd_scale: float | None = None, scaling: str = "dynamic"):
    student = c["s"].clone().requires_grad_(True)
    outputs = [(c["t"], c["t_labels"], c["chunks"]), (c["t_same"], c["labels"], c["same_chunks"])]
    options = kd.KDOptions(kd_scaling=scaling, block_size=3)
    if value is not None:
        options = kd.KDOptions(kd_scaling=scaling, block_size=3, kd_scale_value=value)
    losses = kd.distillation_loss(
        student, c["labels"], torch.ones(1, c["s"].shape[1]), VS, _specs(c, merge), outputs, options, kd_scale=kd_scale
    )
    losses.total.backward()
    return losses, student.grad


def _first_rows(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk logits P-KL sees under first/chain: each chunk's first position, both sides."""
    s_first = torch.tensor([row[0] for row in CHUNKS])
    t_first = torch.tensor([row[2] for row in CHUNKS])
    return c["s"][0, s_first], c["t"][0, t_first]


@pytest.mark.parametrize("merge", ["chain", "first"])
def test_trainable_value_is_the_old_scale_and_computes_no_paper_value(monkeypatch, merge):
    monkeypatch.setattr(kd, "student_ce", _simple_ce)

    def forbidden(*a, **k):
        raise AssertionError("the paper value was computed under kd_scale_value='trainable'")

    monkeypatch.setattr(kd, "paper_pkl_value_parallel", forbidden)
    c = _case(torch.float64)
    default, g_default = _losses(c, merge, None)
    trainable, g_trainable = _losses(c, merge, "trainable")
    for a, b in ((default, trainable), (trainable, default)):
        assert torch.equal(a.total, b.total) and torch.equal(a.kd_scale, b.kd_scale) and torch.equal(a.kd, b.kd)
    assert torch.equal(g_default, g_trainable)
    # the scale is sg(L_CE / |L_KD|) of the trainable L_KD, bit for bit, and |L_KD| is what the trainer reduces
    assert torch.equal(trainable.kd_scale, dynamic_kd_scale(trainable.kd, trainable.ce))
    assert torch.equal(trainable.kd_abs, trainable.kd.detach().abs())
    assert torch.equal(trainable.total, trainable.kd_scale * trainable.kd + trainable.ce)
    assert trainable.per_teacher_paper == {}


@pytest.mark.parametrize("merge", ["chain", "first"])
def test_paper_value_changes_only_the_scale(monkeypatch, merge):
    monkeypatch.setattr(kd, "student_ce", _simple_ce)
    c = _case(torch.float64)
    trainable, g_trainable = _losses(c, merge, "trainable")
    paper, g_paper = _losses(c, merge, "paper")
    # the loss that trains and everything it reports are the same
    for name in ("ce", "kd"):
        assert torch.equal(getattr(paper, name), getattr(trainable, name)), name
    for field in ("per_teacher", "per_teacher_const", "per_teacher_uncovered"):
        a, b = getattr(paper, field), getattr(trainable, field)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), field
    # the value: NVIDIA's P-KL (the reference) on the chunk logits the P-KL sees, the pkl teacher only
    s_first, t_first = _first_rows(c)
    want = R.paper_pkl_value(s_first[:, :VS], t_first[:, :VT], c["W"])
    assert set(paper.per_teacher_paper) == {"cross"}
    assert float(paper.per_teacher_paper["cross"]) == pytest.approx(float(want), rel=1e-10)
    denom = ALPHAS["cross"] * float(want) + ALPHAS["same"] * float(trainable.per_teacher["same"].detach())
    # (L_KD and the scale are float32: the alphas are)
    assert float(paper.kd_abs) == pytest.approx(abs(denom), rel=1e-6)
    assert float(paper.kd_scale) == pytest.approx(float(paper.ce.detach()) / abs(denom), rel=1e-6)
    assert abs(float(paper.kd_scale) / float(trainable.kd_scale) - 1) > 0.05  # the scale did change
    assert torch.equal(paper.total, paper.kd_scale * paper.kd + paper.ce)
    # the gradient is the trainable loss's at that scale (the previous-step path with it as a float)
    _, g_at_scale = _losses(c, merge, "trainable", kd_scale=float(paper.kd_scale))
    torch.testing.assert_close(g_paper, g_at_scale, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g_paper, g_trainable)
    # with the previous step's scale given, the step still reports the paper denominator for the next
    given, _ = _losses(c, merge, "paper", kd_scale=1.5)
    assert float(given.kd_scale) == 1.5 and torch.equal(given.kd_abs, paper.kd_abs)


def test_paper_value_is_not_computed_for_a_fixed_weighting(monkeypatch):
    monkeypatch.setattr(kd, "student_ce", _simple_ce)
    c = _case(torch.float64)
    fixed, _ = _losses(c, "chain", "paper", scaling="balanced")
    assert fixed.per_teacher_paper == {} and float(fixed.kd_scale) == 1.0


# ----------------------------------------------------------------------------------------------
# config, recipes, trainer
# ----------------------------------------------------------------------------------------------
def _config(**train) -> DistillConfig:
    return DistillConfig(name="x", student=ModelConfig(tokenizer="llama3"), train=TrainConfig(**train))


def test_kd_scale_value_is_validated():
    cfg = _config()
    cfg.data.paths = ["/data"]
    assert cfg.train.kd_scale_value == "trainable"
    cfg.validate()
    apply_overrides(cfg, ["train.kd_scale_value=paper"])
    cfg.validate()
    assert kd.KDOptions.from_config(cfg.train).kd_scale_value == "paper"
    for bad in ("nvidia", "Paper", 1):
        cfg.train.kd_scale_value = bad
        with pytest.raises(ConfigError, match=r"^train\.kd_scale_value=.*choose one of \('trainable', 'paper'\)$"):
            cfg.validate()


def test_paper_recipes_use_the_paper_value_and_the_others_ours(tmp_path):
    from xtoken_nemo.recipes import UTILITY, all_recipes, paper_recipes

    paper = {r.name for r in paper_recipes()}
    assert len(paper) == 13
    for recipe in all_recipes():
        want = "paper" if recipe.name in paper else "trainable"
        assert recipe.config(tmp_path).train.kd_scale_value == want, recipe.name
    assert len(UTILITY) == 2 and {"debug-1gpu", "cpu-tiny"} <= {r.name for r in all_recipes()} - paper
    assert TrainConfig().kd_scale_value == "trainable"  # the demo and new runs: the default


def test_trainer_logs_the_paper_value_and_scales_with_it_without_a_host_sync(sp_pair, tmp_path, monkeypatch):  # noqa: F811
    from test_step_host_work import StepSyncCounter

    from xtoken_nemo.distill.trainer import Trainer

    cfg = sp_config(sp_pair, tmp_path, mode="pkl", steps=2)  # P-KL "cross" 0.7 + KL "same" 0.3, 2 micro-batches
    cfg.train.kd_scale_value = "paper"
    trainer = Trainer(cfg, progress=False)
    inner = trainer.optimizer.step
    counter = StepSyncCounter()

    def paused(*a, **k):  # megatron's optimizer step is not ours to count (as test_step_host_work)
        counter.active = False
        try:
            return inner(*a, **k)
        finally:
            counter.active = True

    monkeypatch.setattr(trainer.optimizer, "step", paused)
    history, counts = [], []
    with counter:
        for step in range(2):
            before = len(counter.calls)
            history.append(trainer.train_step(step))
            counts.append(len(counter.calls) - before)
    # from the second step on, the step's one metrics copy (the first also makes the per-device
    # copies of the P-KL's masks, once): the paper value adds no sync and no blocking copy
    assert counts[1] == 1 and not any("paper_pkl" in c for c in counter.calls), counter.calls
    for h in history:
        assert h["kd_paper/cross"] > 0 and "kd_paper/same" not in h
        denom = 0.7 * h["kd_paper/cross"] + 0.3 * h["kd/same"]  # the config's alphas
        assert h["kd_ratio"] == pytest.approx(h["ce"] / denom, rel=1e-5)
        assert abs(h["kd_ratio"] - h["ce"] / h["kd"]) > 1e-3 * h["kd_ratio"]
    assert history[1]["kd_scale"] == pytest.approx(history[0]["kd_ratio"], rel=1e-6)
