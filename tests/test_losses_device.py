"""The vocab-parallel losses create their temporaries on the logits' device (a GPU run must not
mix in CPU tensors). No GPU here: the "meta" device stands in for CUDA; any CPU tensor mixed into
the computation fails there as it would on CUDA. Finiteness checks read values (.item()), which
meta tensors do not have, so they are switched off for this test only."""

import pytest
import torch

import xtoken_nemo.losses as P
import xtoken_nemo.losses.checks as checks
from xtoken_nemo.vocab import ProjectionMatrix

VS, VT, N = 37, 45, 6


@pytest.fixture
def no_value_checks():
    with checks.nonfinite_checks_deferred():  # the trainer's switch: no NaN/inf check reads a value
        yield


def _W():
    idx = torch.tensor([[i % VT, (i * 7) % VT, -1, -1] for i in range(VS)])
    return ProjectionMatrix(idx, torch.where(idx >= 0, 0.5, 0.0), VT)


@pytest.mark.parametrize("name", ["kl", "gold", "hkl", "uld", "chain", "first", "log_mass", "confidence"])
def test_losses_stay_on_the_logits_device(no_value_checks, name):
    dev = "meta"
    s = torch.randn(N, 40, device=dev).requires_grad_(True)
    t = torch.randn(N, 48, device=dev)
    chunks = [range(0, 2), range(2, 3), range(3, 6)]
    targets = torch.randint(0, VS, (N,), device=dev)
    pairs = torch.tensor([[i, i] for i in range(0, 30, 3)])
    fn = {
        "kl": lambda: P.kl_loss_parallel(s, torch.randn(N, 40, device=dev), VS),
        # the sort path: the histogram path's bincount has no meta kernel (its device use is
        # checked on CUDA by bench/gpu_check.sh part 1)
        "gold": lambda: P.gold_loss_parallel(s, t, pairs, VS, VT, uld_method="sort"),
        "hkl": lambda: P.hkl_loss_parallel(s, t, _W(), VS, VT, uld_method="sort"),
        "uld": lambda: P.uld_loss_parallel(s, t, VS, VT, uld_method="sort"),
        "chain": lambda: P.merge_chunks_parallel(s, chunks, VS, targets=targets, mode="chain").log_mass.sum(),
        "first": lambda: P.merge_chunks_parallel(s, chunks, VS, mode="first").logits.sum(),
        "log_mass": lambda: P.chunk_log_mass_parallel(s, chunks, VS, targets).sum(),
        "confidence": lambda: P.teacher_confidence_parallel(
            t, "ce", VT, targets=torch.randint(0, VT, (N,), device=dev)
        ),
    }[name]
    out = fn()
    assert out.device.type == dev
    if out.requires_grad:
        out.backward()
        assert s.grad.device.type == dev


def test_projection_rows_follow_the_device():
    proj = P.prepare_projection(_W(), 40, 48)
    assert proj.rows_t(torch.float32, "meta").device.type == "meta"
    assert proj.rows(torch.float64).dtype == torch.float64
