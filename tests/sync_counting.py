"""What the host-sync tests count: a tensor -> host conversion by our code (each one a device-to-host
synchronization on a GPU), and which file made a call (shared by test_cluster_job and
test_step_host_work)."""

from __future__ import annotations

import os
import sys

import torch

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def calling_file(test_file: str) -> str:
    """The file of the code that called the tensor function: the first frame past torch, this module,
    ``test_file`` (the test's own counter) and the CPU shims."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (
            f"{os.sep}torch{os.sep}" in name
            or name in (test_file, __file__)
            or name.endswith(f"compat{os.sep}cuda_redirect.py")
        ):
            return name
        frame = frame.f_back
    return ""


def is_host_read(func, args: tuple) -> bool:
    """A float or bool tensor read on the host. Integer tensors in these tests are host-side batch
    data (chunk tables, ids): reading them costs no device sync; computed values (losses, logits,
    flags) are floating point or bool."""
    return (
        getattr(func, "__name__", "") in SYNC_METHODS
        and bool(args)
        and isinstance(args[0], torch.Tensor)
        and (args[0].is_floating_point() or args[0].dtype == torch.bool)
    )
