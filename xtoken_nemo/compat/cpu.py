"""CPU/gloo compatibility layer for megatron-core (CPU runs and tests only; never installed on GPU).

megatron-core assumes CUDA in a few places even for code paths that work on CPU. On a machine
without CUDA, :func:`install_cpu_shims` maps the handful of ``torch.cuda`` calls that megatron
makes to CPU equivalents, so that ``parallel_state.initialize_model_parallel`` and the tensor-
parallel helpers run on a gloo process group.

Design rules:
- Idempotent: calling it twice is harmless; it records what it installed in ``INSTALLED``.
- A no-op when CUDA is really available (``torch.cuda.is_available()``), so the model/training
  code may call it unconditionally.
- One shim per named function, grouped by what needs it (``_SHIM_GROUPS``), so the model and
  training code can add groups (CUDA RNG tracker, ``device="cuda"`` redirection, ...) here later
  without touching callers: ``install_cpu_shims(groups=("core", "rng"))``.

Measured needs (megatron-core 0.16.1, torch 2.13 CPU): see docs/architecture.md, "Megatron-core on CPU".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

INSTALLED: set[str] = set()


class _NullStream:
    """Stand-in for a CUDA stream: synchronize/wait are no-ops on CPU."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self, event: object | None = None) -> None:
        return None

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_STREAM = _NullStream()


def _shim_core() -> None:
    """Device queries and synchronization that parallel_state and the collectives touch."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # type: ignore[assignment]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    cuda.current_stream = lambda device=None: _NULL_STREAM  # type: ignore[assignment]
    cuda.default_stream = lambda device=None: _NULL_STREAM  # type: ignore[assignment]
    cuda.set_device = lambda device: None  # type: ignore[assignment]
    cuda.device_count = lambda: 0  # type: ignore[assignment]


def _shim_rng() -> None:
    """CUDA RNG state calls used by megatron's model-parallel RNG tracker, mapped to the CPU RNG."""
    cuda = torch.cuda
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment]
    # torch.manual_seed itself calls cuda.manual_seed_all: a no-op here, or it would recurse.
    cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    cuda.random.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except Exception:  # megatron not installed: nothing else to patch
        return
    # the model-parallel RNG tracker forks "CUDA" RNG states around dropout; on CPU they are
    # the CPU generator's state
    mrandom._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()  # type: ignore[assignment]
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)  # type: ignore[assignment]


def _shim_buffers() -> None:
    """megatron's global memory buffer (unfused attention's score buffer) allocates with
    ``device=torch.cuda.current_device()``: allocate inside the CUDA->CPU redirect, so that the
    model forward itself can run outside it (:func:`~xtoken_nemo.compat.cuda_redirect.outside_cuda_redirect`)."""
    try:
        from megatron.core.utils import GlobalMemoryBuffer
    except Exception:  # megatron not installed: nothing to patch
        return
    from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu  # lazy: compat modules stay independent

    get_tensor = GlobalMemoryBuffer.get_tensor

    def get_tensor_on_cpu(self, *args, **kwargs):
        with cuda_to_cpu():
            return get_tensor(self, *args, **kwargs)

    GlobalMemoryBuffer.get_tensor = get_tensor_on_cpu  # type: ignore[method-assign]


_SHIM_GROUPS: dict[str, Callable[[], None]] = {
    "core": _shim_core,
    "rng": _shim_rng,
    "buffers": _shim_buffers,
}


def install_cpu_shims(groups: Iterable[str] = ("core", "rng", "buffers"), force: bool = False) -> set[str]:
    """Install the named shim groups (idempotent); return the set of groups now installed.

    Does nothing when CUDA is available unless ``force`` is set (tests of this module).
    """
    if torch.cuda.is_available() and not force:
        return set(INSTALLED)
    for name in groups:
        if name not in _SHIM_GROUPS:
            raise ValueError(f"unknown CPU shim group {name!r}; known: {sorted(_SHIM_GROUPS)}")
        if name in INSTALLED:
            continue
        _SHIM_GROUPS[name]()
        INSTALLED.add(name)
        log.debug("installed CPU shim group %s", name)
    return set(INSTALLED)
