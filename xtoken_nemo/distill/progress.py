"""Progress lines for the job log: one line every ``train.log_interval`` steps on rank 0.

A SLURM job's output file is not a terminal: a tqdm bar there is a stream of carriage returns
that shows nothing useful. These lines are what a researcher tails::

    step 120/30000 (0.4%) | ce 2.3141 | kd qwen3 0.5120 | kd_scale 4.52 | total 4.6282 | lr 4.90e-05
    | grad_norm 0.830 | 12,345 tok/s | mem 34.2 GiB | ETA 3h12m

(one line; wrapped here). Throughput and ETA are averaged over the steps since the last line.
"""

from __future__ import annotations

import math
import time


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.3g}"


class ProgressLog:
    """Collects step times; ``line(metrics)`` formats the progress line of the latest step."""

    def __init__(self, total_steps: int, tokens_per_step: int, teacher_names: list[str]) -> None:
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.teacher_names = teacher_names
        self._since = time.perf_counter()
        self._steps_since = 0

    def step_done(self) -> None:
        self._steps_since += 1

    def line(self, metrics: dict, step: int) -> str:
        now = time.perf_counter()
        per_step = (now - self._since) / max(1, self._steps_since)
        self._since, self._steps_since = now, 0
        parts = [
            f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
            f"ce {_num(metrics['ce'])}",
        ]
        if "kd" in metrics:
            parts.append("kd " + " ".join(f"{name} {_num(metrics[f'kd/{name}'])}" for name in self.teacher_names))
            parts.append(f"kd_scale {_num(metrics['kd_scale'], 3)}")
        parts += [
            f"total {_num(metrics['total'])}",
            f"lr {metrics['lr']:.2e}",
            f"grad_norm {_num(metrics['grad_norm'], 3)}",
        ]
        parts.append(f"{self.tokens_per_step / per_step:,.0f} tok/s")
        parts.append(f"mem {metrics['memory_gb']:.1f} GiB")
        if metrics.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        parts.append(f"ETA {format_duration(per_step * (self.total_steps - step))}")
        return " | ".join(parts)
