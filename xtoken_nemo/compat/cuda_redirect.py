"""Run megatron-core code that allocates on "cuda" (DDP grad buffers, the optimizer, grad
clipping, the forward-backward schedule) on the CPU.

``cuda_to_cpu()`` is a TorchFunctionMode: ``device="cuda"``/``device=0`` becomes CPU,
``tensor.cuda()`` a no-op, ``tensor.to("cuda")`` a CPU ``to``, and ``tensor.type()`` reports
"torch.cuda.*" names (megatron asserts them). Only for CPU runs and tests;
on a GPU it is never entered (see :func:`maybe_cuda_to_cpu`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    return str(device).startswith("cuda")


class CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        result = func(*args, **kwargs)
        # megatron asserts tensor.type() == "torch.cuda.FloatTensor" (grad clipping, optimizer)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str) and not result.startswith("torch.cuda."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


def cuda_to_cpu() -> CudaToCpu:
    return CudaToCpu()


def maybe_cuda_to_cpu():
    """The redirect on a machine without CUDA, a null context on a GPU."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from xtoken_nemo.compat.cpu import install_cpu_shims

    install_cpu_shims()
    return CudaToCpu()
