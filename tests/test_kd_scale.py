"""The dynamic KD/CE scale and adaptive alphas from the previous step's global batch
(``train.kd_scale_source``, docs/losses.md "Dynamic scale: per micro-batch or global").

- under DP=2 every micro-batch on both ranks applies the same scale, equal to the previous step's
  global ratio mean(ce) / mean(|kd|) computed from the logged metrics; DP=2 equals one process
  with the same global batch; the same for adaptive alphas;
- the logged ``kd_scale`` is the factor applied (total == ce + kd_scale * kd);
- an interrupted and resumed run gives the same metrics as an uninterrupted one (the state is in
  the checkpoint);
- ``kd_scale_source=micro_batch`` keeps the old per-micro-batch form.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_utils import run_distributed
from test_distill import _run, _run_until, sp_config, sp_pair  # noqa: F401  (module-scoped fixture, rebuilt here)


def _recording():
    """Wrap kd.distillation_loss: per call, the applied scale, ce, |kd| and alphas (floats)."""
    import xtoken_nemo.distill.kd as kd

    calls: list[dict] = []
    real = kd.distillation_loss

    def recording(*a, **k):
        out = real(*a, **k)
        calls.append(
            {
                "scale": float(out.kd_scale),
                "ce": float(out.ce.detach()),
                "kd_abs": float(out.kd.detach().abs()),
                "alphas": {n: float(v) for n, v in out.alphas.items()},
            }
        )
        return out

    kd.distillation_loss = recording
    return calls, lambda: setattr(kd, "distillation_loss", real)


def _recorded_run(cfg) -> tuple[list[dict], list[list[dict]]]:
    """(history, per step the recorded micro-batch calls)."""
    from xtoken_nemo.distill.trainer import Trainer

    calls, restore = _recording()
    try:
        trainer = Trainer(cfg, progress=False)
        read_step = trainer.batches.iterator
        starts: list[int] = []

        def tracking(step):
            starts.append(len(calls))
            return read_step(step)

        trainer.batches.iterator = tracking
        hist = trainer.run()["history"]
    finally:
        restore()
    bounds = starts + [len(calls)]
    return hist, [calls[bounds[i] : bounds[i + 1]] for i in range(len(starts))]


def _dp_config(pair, run_dir: Path, steps: int, alpha_mode: str = "static"):
    cfg = sp_config(pair, run_dir, mode="pkl", steps=steps)  # P-KL + KL teachers, global batch 4
    cfg.train.micro_batch_size = 1  # 4 micro-batches per step: 2 per rank at DP=2
    cfg.train.alpha_mode = alpha_mode
    return cfg


def _dp2_worker(rank, world_size, pair, run_dir):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    static = _recorded_run(_dp_config(pair, Path(run_dir) / "static", steps=3))
    adaptive = _recorded_run(_dp_config(pair, Path(run_dir) / "adaptive", steps=2, alpha_mode="entropy"))
    return {"static": static, "adaptive": adaptive}


def test_dp2_applies_the_previous_steps_global_ratio_on_every_rank(sp_pair, tmp_path):  # noqa: F811
    res = run_distributed(_dp2_worker, world_size=2, tp=1, args=(sp_pair, str(tmp_path / "dp2")))
    (hist0, calls0), (hist1, calls1) = res[0]["static"], res[1]["static"]
    assert [len(c) for c in calls0] == [2, 2, 2] and [len(c) for c in calls1] == [2, 2, 2]
    # step 1 (no previous step): each micro-batch its own ratio
    for call in calls0[0] + calls1[0]:
        assert call["scale"] == pytest.approx(call["ce"] / call["kd_abs"], rel=1e-6)
    for n in (1, 2):
        prev = hist0[n - 1]
        global_ratio = prev["ce"] / abs(prev["kd"])  # from the logged metrics of the previous step
        applied = [c["scale"] for c in calls0[n] + calls1[n]]
        assert len(set(applied)) == 1, applied  # the same on every micro-batch of both ranks
        assert applied[0] == pytest.approx(global_ratio, rel=1e-6)
        assert prev["kd_ratio"] == pytest.approx(global_ratio, rel=1e-6)
        # ... and not what the micro-batches' own ratios would have been
        assert any(abs(c["ce"] / c["kd_abs"] - applied[0]) > 1e-4 * applied[0] for c in calls0[n] + calls1[n])
        for h in (hist0[n], hist1[n]):
            assert h["kd_scale"] == pytest.approx(applied[0], rel=1e-6)  # the logged factor is the applied one
            assert h["total"] == pytest.approx(h["ce"] + h["kd_scale"] * h["kd"], rel=1e-5)
    assert [h["total"] for h in hist0] == pytest.approx([h["total"] for h in hist1], rel=1e-6)

    # one process with the same global batch (4 micro-batches of 1) gives the same steps
    one, one_calls = _recorded_run(_dp_config(sp_pair, tmp_path / "one", steps=3))
    for key in ("total", "ce", "kd", "kd_scale", "kd_ratio", "grad_norm"):
        assert [h[key] for h in hist0] == pytest.approx([h[key] for h in one], rel=1e-5), key
    assert sorted(c["scale"] for c in one_calls[0]) == pytest.approx(
        sorted(c["scale"] for c in calls0[0] + calls1[0]), rel=1e-5
    )

    # adaptive alphas: step 2 applies one set of alphas everywhere, the softmax of step 1's mean
    # confidences; equal to the one-process run's
    (ahist0, acalls0), (ahist1, acalls1) = res[0]["adaptive"], res[1]["adaptive"]
    alphas = [tuple(sorted(c["alphas"].items())) for c in acalls0[1] + acalls1[1]]
    assert len(set(alphas)) == 1, alphas
    assert sum(v for _, v in alphas[0]) == pytest.approx(1.0, abs=1e-6)
    first = [tuple(sorted(c["alphas"].items())) for c in acalls0[0] + acalls1[0]]
    assert len(set(first)) > 1  # step 1: each micro-batch's own softmax
    aone, aone_calls = _recorded_run(_dp_config(sp_pair, tmp_path / "aone", steps=2, alpha_mode="entropy"))
    assert dict(alphas[0]) == pytest.approx(aone_calls[1][0]["alphas"], rel=1e-5)
    for key in ("total", "kd", "kd_scale", "alpha/cross", "alpha/same", "grad_norm"):
        assert [h[key] for h in ahist0] == pytest.approx([h[key] for h in aone], rel=1e-5), key
        assert [h[key] for h in ahist1] == pytest.approx([h[key] for h in aone], rel=1e-5), key
    assert ahist0[1]["alpha/cross"] == pytest.approx(dict(alphas[0])["cross"], rel=1e-6)  # logged = applied


def test_exact_resume_keeps_the_scale_and_the_alphas(sp_pair, tmp_path):  # noqa: F811
    """Interrupted during step 2 (SIGUSR1) and resumed: steps 3-4 equal the uninterrupted run's,
    scale and adaptive alphas included; the checkpoint holds them."""

    def cfg(run):
        return _dp_config(sp_pair, tmp_path / run, steps=4, alpha_mode="maxprob")

    _, straight = _run(cfg("straight"))
    interrupted = _run_until(cfg("resumed"), stop_after=2)
    assert interrupted["status"] == "preempted" and interrupted["step"] == 2
    trainer, resumed = _run(cfg("resumed"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for key in ("total", "ce", "kd", "kd_scale", "kd_ratio", "alpha/cross", "alpha/same", "grad_norm", "lr"):
        assert [h[key] for h in resumed["history"]] == pytest.approx(
            [h[key] for h in straight["history"][2:]], rel=1e-6, abs=1e-9
        ), key
    # step 3 applied the scale of step 2, which only the checkpoint could give the resumed run
    assert resumed["history"][0]["kd_scale"] == pytest.approx(interrupted["history"][1]["kd_ratio"], rel=1e-6)
    assert trainer.state.kd_scale == pytest.approx(straight["history"][3]["kd_ratio"], rel=1e-6)
    assert trainer.state.alphas is not None and sum(trainer.state.alphas) == pytest.approx(1.0)


def test_micro_batch_source_keeps_the_per_micro_batch_ratio(sp_pair, tmp_path):  # noqa: F811
    cfg = _dp_config(sp_pair, tmp_path, steps=2)
    cfg.train.kd_scale_source = "micro_batch"
    hist, calls = _recorded_run(cfg)
    for step in calls:
        assert len(step) == 4
        for call in step:
            assert call["scale"] == pytest.approx(call["ce"] / call["kd_abs"], rel=1e-6)
    for h, step in zip(hist, calls):  # logged: the mean of the factors applied
        assert h["kd_scale"] == pytest.approx(sum(c["scale"] for c in step) / len(step), rel=1e-6)


def test_kd_scale_source_is_validated(sp_pair, tmp_path):  # noqa: F811
    from xtoken_nemo.distill.config import ConfigError, apply_overrides

    cfg = apply_overrides(sp_config(sp_pair, tmp_path), ["train.kd_scale_source=micro_batch"])
    cfg.validate()
    cfg.train.kd_scale_source = "per_rank"
    with pytest.raises(ConfigError, match="kd_scale_source"):
        cfg.validate()
