"""A TorchFunctionMode that runs CUDA-assuming megatron code on CPU (CPU runs and tests only).

megatron-core creates tensors with ``device=torch.cuda.current_device()`` / ``device="cuda"`` and
calls ``.cuda()`` in places that are otherwise device-agnostic (dist_checkpointing's save
finalisation and load validation, DDP buffers, the optimizer, grad clipping). Inside
:func:`cuda_to_cpu` every such device argument becomes CPU, ``Tensor.cuda()`` returns the tensor
itself and ``Tensor.type()`` reports "torch.cuda.*" names (megatron asserts them). It is a no-op
context when CUDA is available, so callers may use it unconditionally::

    with cuda_to_cpu():
        dist_checkpointing.save(model.sharded_state_dict(), path)

:func:`outside_cuda_redirect` suspends it around code that needs no redirect and runs many ops (the
model forward and the losses): the Python hook of a mode is paid on every op. Modes are per thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; ``Tensor.cuda()`` becomes the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        result = func(*args, **kwargs)
        # megatron asserts tensor.type() == "torch.cuda.FloatTensor" (grad clipping, the
        # distributed optimizer): report CPU tensors under their CUDA type names
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(result, str)
            and not result.startswith("torch.cuda.")
        ):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Redirect CUDA device arguments to CPU inside the block (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        yield
        return
    with CudaToCpuMode():
        yield


@contextlib.contextmanager
def outside_cuda_redirect() -> Iterator[None]:
    """Suspend the innermost :func:`cuda_to_cpu` inside the block, for device-agnostic code that
    runs many ops (the model forward, the losses): the mode's Python hook costs microseconds per
    op (docs/demo.md, "Cost of the demo"). Other torch-function modes (a test's sync counter)
    stay active. No-op when no redirect is the innermost mode (always so on CUDA)."""
    if not isinstance(torch.overrides._get_current_function_mode(), CudaToCpuMode):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield
