"""The CPU runs' CUDA->CPU redirect and the code that runs outside it (CPU only)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from xtoken_nemo.compat.cpu import install_cpu_shims
from xtoken_nemo.compat.cuda_redirect import CudaToCpuMode, cuda_to_cpu, outside_cuda_redirect

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirect is for machines without CUDA")


class _Counter(TorchFunctionMode):
    """Another mode below the redirect (as the tests' host-sync counter is)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_outside_the_redirect_ops_skip_its_hook_and_other_modes_stay():
    counter = _Counter()
    with counter, cuda_to_cpu():
        assert torch.empty(2, device="cuda").device.type == "cpu"  # redirected
        with outside_cuda_redirect():
            assert not isinstance(torch.overrides._get_current_function_mode(), CudaToCpuMode)
            before = counter.calls
            torch.ones(3).sum()
            assert counter.calls > before  # the counter below still sees the ops
        assert isinstance(torch.overrides._get_current_function_mode(), CudaToCpuMode)  # restored
    with outside_cuda_redirect():  # no redirect active: nothing to suspend
        torch.ones(1)


def test_megatron_memory_buffer_allocates_on_cpu_without_the_redirect():
    """The one allocation of the model forward that asks for device=cuda (unfused attention's score
    buffer); the forward runs outside the redirect, so the shim redirects this call alone."""
    from megatron.core.utils import GlobalMemoryBuffer

    install_cpu_shims()
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"
