"""Megatron process state for single-process tools (conversion, scoring) and CPU runs.

``ensure_model_parallel(tp)`` is what every entry point that builds a GPTModel calls first:
- on a machine without CUDA it installs the CPU shims (``xtoken_nemo.compat.cpu``);
- if ``torch.distributed`` is not initialized, it starts a one-process group (gloo on CPU, nccl on
  CUDA) on a free local port, so ``xtoken convert`` / ``xtoken score`` work without ``torchrun``;
- it initializes megatron's ``parallel_state`` with the requested TP size, or checks that an
  existing initialization (a training job, a test harness) has that TP size.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket

import torch

from xtoken_nemo.compat.cpu import install_cpu_shims
from xtoken_nemo.models.errors import ModelError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_shims() -> None:
    """CPU shims for megatron-core when CUDA is absent (no-op on GPU)."""
    if not torch.cuda.is_available():
        install_cpu_shims(groups=("core", "rng", "buffers"))


def ensure_model_parallel(tp: int = 1, seed: int = 1234, timeout_minutes: float = 30.0) -> None:
    """Make sure torch.distributed and megatron ``parallel_state`` are up with TP size ``tp``
    (``timeout_minutes``: the collective timeout of the groups created here)."""
    install_shims()
    if not torch.distributed.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) != 1 and "MASTER_ADDR" in os.environ:
            raise ModelError("WORLD_SIZE > 1 but torch.distributed is not initialized: call init_process_group first")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        log.debug("started a one-process %s group", backend)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        world = torch.distributed.get_world_size()
        if world % tp:
            raise ModelError(f"tensor-parallel size {tp} does not divide the world size {world}")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, distributed_timeout_minutes=int(math.ceil(timeout_minutes))
        )
    have = parallel_state.get_tensor_model_parallel_world_size()
    if have != tp:
        raise ModelError(f"megatron is initialized with tensor-parallel size {have}, but {tp} was asked for")
    ensure_rng_tracker(seed)


def ensure_rng_tracker(seed: int = 1234) -> None:
    """Seed megatron's model-parallel RNG tracker unless a caller already did (forward needs it)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    install_shims()
    if not get_cuda_rng_tracker().get_states():
        model_parallel_cuda_manual_seed(seed)


def seed_model_init(seed: int) -> None:
    """Seed every RNG a random model build draws from (parallel_state must be up).

    ``torch.manual_seed`` alone is not enough on CUDA: with ``use_cpu_initialization`` off,
    megatron-core (0.16.1, tensor_parallel.layers._initialize_affine_weight_gpu; TE linears through
    ``get_rng_state_tracker``) draws the weights inside ``get_cuda_rng_tracker().fork()``, i.e. from
    the tracker's own stored generator states, which only ``model_parallel_cuda_manual_seed``
    resets. Without it a second build with the same seed in one process (a resumed run, the next
    seed of a sweep) starts from the states the first build advanced: other weights. This reseeds
    the tracker's streams: tensor-parallel ``seed + 2718 + tp_rank`` (each rank its own shard),
    expert ``seed + 1024 + 100 * ep_rank + etp_rank``, data-parallel ``seed``, and the default
    CUDA generator; the tracker's dropout streams stay derived from ``seed`` afterwards (dropout is
    0 in our configs). On CPU (shimmed tracker) the CPU generator ends seeded with ``seed``, as with
    ``torch.manual_seed`` alone, so CPU-initialized weights are unchanged.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    install_shims()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def collective_device() -> torch.device:
    """Where tensors for collectives live: NCCL needs CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def true_on_any_rank(flag: bool) -> bool:
    """A local flag made global (all-reduce MAX over the world): every rank takes the same decision."""
    if not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
