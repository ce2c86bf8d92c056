"""The parallel layout of a run on a SLURM allocation: tensor-parallel size (TP), data-parallel
size (DP), micro-batch and gradient-accumulation steps, derived from the recipe's global batch,
or refused with the reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from xtoken_nemo.distill.config import ConfigError, DistillConfig


class LayoutError(ConfigError):
    """The run cannot be laid out on the requested nodes/GPUs; the message says why and what fits."""


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int  # 0: CPU processes
    procs_per_node: int  # torchrun --nproc-per-node: one per GPU, or CPU processes
    tp: int
    dp: int
    micro_batch: int
    accumulation: int
    global_batch: int

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        devices = f"{self.gpus_per_node} GPUs" if self.gpus_per_node else f"{self.procs_per_node} CPU process(es)"
        return (
            f"{self.nodes} node(s) x {devices} = {self.world} ranks: TP {self.tp}, DP {self.dp}, "
            f"micro-batch {self.micro_batch}, "
            f"{self.accumulation} accumulation step(s) -> global batch {self.global_batch} "
            f"({self.micro_batch} x {self.accumulation} x {self.dp})"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def derive_layout(cfg: DistillConfig, nodes: int, gpus_per_node: int, cpu_procs_per_node: int = 1) -> Layout:
    """TP from the config (kept inside a node); DP = ranks / TP; accumulation = global batch /
    (micro-batch x DP). Raises LayoutError naming the rule that fails and layouts that would fit."""
    t = cfg.train
    if nodes < 1:
        raise LayoutError(f"--nodes={nodes}: need at least one node")
    if gpus_per_node < 0:
        raise LayoutError(f"--gpus-per-node={gpus_per_node} is negative")
    procs = gpus_per_node or cpu_procs_per_node
    world = nodes * procs
    if t.tensor_parallel < 1 or procs % t.tensor_parallel:
        raise LayoutError(
            f"train.tensor_parallel={t.tensor_parallel} must divide the {procs} ranks of a node "
            "(tensor parallelism stays "
            f"inside a node, on NVLink); choose one of {_divisors(procs)}"
        )
    dp = world // t.tensor_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        fits = [
            n
            for n in range(1, 4 * nodes + 1)
            if t.global_batch_size % (t.micro_batch_size * n * procs // t.tensor_parallel) == 0
        ]
        raise LayoutError(
            f"global batch {t.global_batch_size} is not divisible by micro-batch {t.micro_batch_size} x DP {dp} "
            f"({nodes} node(s) x {procs} ranks / TP {t.tensor_parallel}); node counts that fit: {fits[:8]}, "
            f"or change train.micro_batch_size / train.global_batch_size"
        )
    for where, mc in [("student", cfg.student)] + [(f"teacher {tc.name}", tc.model) for tc in cfg.teachers]:
        meta_file = Path(mc.checkpoint) / "xtoken_model.json" if mc.checkpoint else None
        if meta_file is None or not meta_file.is_file():
            continue  # a missing checkpoint is reported by the file checks
        meta = json.loads(meta_file.read_text())
        heads = meta.get("arch", {}).get("num_attention_heads")
        if heads and heads % t.tensor_parallel:
            raise LayoutError(f"{where}: {heads} attention heads are not divisible by TP {t.tensor_parallel}")
        padded_for = meta.get("padded_for_tp")
        if padded_for and padded_for % t.tensor_parallel:
            raise LayoutError(
                f"{where}: checkpoint {mc.checkpoint} has its vocabulary padded for TP sizes dividing {padded_for}, "
                "not "
                f"TP {t.tensor_parallel}: reconvert with `xtoken convert hf-to-mcore ... --tp {t.tensor_parallel}`"
            )
    cfg.validate(world_size=world)
    return Layout(
        nodes,
        gpus_per_node,
        procs,
        t.tensor_parallel,
        dp,
        t.micro_batch_size,
        t.global_batch_size // (t.micro_batch_size * dp),
        t.global_batch_size,
    )
