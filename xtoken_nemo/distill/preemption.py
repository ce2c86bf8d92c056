"""SIGTERM/SIGUSR1 (SLURM's warning before a time limit or preemption) -> save and stop.

Installed by ``xtoken train`` before anything heavy is imported, so a signal that arrives while
megatron is imported or the student and teachers are loaded (minutes at the paper's sizes) is
remembered and honoured at the first step boundary. The job script's node wrapper starts torchrun
with USR1 ignored (``trap '' USR1``: torchrun itself must not die of it) and the workers inherit
that disposition: until a handler is installed a USR1 is discarded, not queued. No torch import
here: this module must be cheap.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the trainer saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}
        self._pid: int | None = None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> PreemptionFlag:
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a forked child (DataLoader or multiprocessing worker) inherited this handler: it must
            # react as it would have without it, or SIGTERM no longer stops it and whoever
            # terminates it (Pool.terminate, SLURM) waits forever
            self._act_as_before(signum, frame)
            return
        self.signal = signum
        log.warning(
            "received signal %s: will save a checkpoint and exit at the next step boundary", signal.Signals(signum).name
        )

    def _act_as_before(self, signum, frame) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def raised(self) -> bool:
        return self.signal is not None
