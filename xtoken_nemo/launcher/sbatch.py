"""Render the sbatch script of a run.

One ``srun`` task per node runs one ``torchrun`` (``python -m torch.distributed.run``) that
starts one worker per GPU (or ``cpu_procs_per_node`` CPU workers). We chose torchrun per node
over one SLURM task per GPU because it is the same launcher as a single-node run, works
identically inside pyxis containers and on bare metal, and gives every worker LOCAL_RANK /
RANK / WORLD_SIZE / MASTER_ADDR the way the trainer already reads them. Rendezvous is static
(c10d) at the first node of ``$SLURM_JOB_NODELIST``, port derived from the job id.

The task asks for CPUs twice, ``#SBATCH --cpus-per-task`` and ``srun --cpus-per-task`` (a step
gets only what it asks for since SLURM 20.11, and srun stops inheriting the sbatch value in
22.05); see :func:`default_cpus_per_task`. Environment variables (``DEFAULT_ENV`` and
``xtoken launch --env``) are exported in the batch shell and reach every rank through
``srun --export=ALL``. The node script runs ``xtoken train`` without ``--quiet``: with output to
a file, rank 0 logs a progress line every ``train.log_interval`` steps into the job's output.

Preemption: ``#SBATCH --signal=B:USR1@120`` warns the batch shell 120 s before the time limit
(or a preemption). Its trap runs ``scancel --signal=URG $SLURM_JOB_ID``, which reaches every
process of the job step; SIGURG is ignored by default, so only each node's wrapper (which traps
it) acts: it sends USR1 to its torchrun's worker processes alone, and the trainer saves a
checkpoint at the next step boundary and exits 0. (Forwarding USR1 itself step-wide would also
kill helper processes such as the spawned manager that megatron's checkpoint writer uses, and
the save would fail.) The batch shell then runs ``scontrol requeue``; the requeued job (same id,
``--open-mode=append`` on the same output file) runs the same command and the trainer resumes
from ``latest.txt``. A job killed without warning (``scancel``, node failure) resumes from the
last periodic checkpoint when requeued.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from xtoken_nemo.distill.config import ConfigError, DistillConfig
from xtoken_nemo.launcher.layout import Layout

#: CPUs the job step asks for per GPU by default: each GPU's worker process with its NCCL and
#: pin-memory threads, plus the data reading and torchrun itself. 8 GPUs -> 96, what torchtitan's
#: multinode script asks for an 8-GPU node (the 96 vCPUs of a p4d); it fits every common 8-GPU node
#: (a DGX H100 has 112 cores, 224 hardware threads) whether SLURM counts cores or threads.
CPUS_PER_GPU = 12

#: exported into every rank unless --env sets the same variable
DEFAULT_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JobOptions:
    container: str | None = None  # pyxis/enroot image (a .sqsh file or a registry reference)
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST[:ro]
    container_workdir: str | None = None
    venv: str | None = None  # bare metal: the virtualenv whose python runs torchrun
    partition: str | None = None
    account: str | None = None
    time_limit: str = "04:00:00"
    signal_seconds: int = 120
    exclusive: bool = True
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. --qos=high
    env: dict[str, str] = field(default_factory=dict)  # exported before srun (over DEFAULT_ENV)
    cpus_per_task: int | None = None  # CPUs of the one task per node; None: default_cpus_per_task(layout)


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--env``) -> dict; KEY must be a shell variable name."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise ConfigError(
                f"--env {item!r}: expected KEY=VALUE with KEY a shell variable name (letters, digits, _; not starting "
                "with a digit)"
            )
        env[key] = value
    return env


def default_cpus_per_task(layout: Layout) -> int:
    """CPUs the one task per node asks for when --cpus-per-task is not given: CPUS_PER_GPU per
    GPU; for CPU jobs one per worker (fits any node, e.g. the 2-CPU localhost test node)."""
    if layout.gpus_per_node:
        return CPUS_PER_GPU * layout.gpus_per_node
    return layout.procs_per_node


def _cpus(layout: Layout, opts: JobOptions) -> tuple[int, str]:
    """The step's CPUs and why (comment lines for the script)."""
    if opts.cpus_per_task is not None:
        if opts.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task={opts.cpus_per_task}: need at least 1")
        return opts.cpus_per_task, f"# {opts.cpus_per_task}: set with --cpus-per-task."
    n = default_cpus_per_task(layout)
    if layout.gpus_per_node:
        return n, (
            f"# {n} = the default, {CPUS_PER_GPU} per GPU x {layout.gpus_per_node} GPUs: "
            "each GPU's worker with its NCCL and\n"
            "# pin-memory threads, plus data reading and torchrun (torchtitan's multinode script asks for 96 on\n"
            f"# an 8-GPU node). Needs nodes with >= {n} CPUs; --cpus-per-task N asks for another count, e.g. the\n"
            f"# node's (an --exclusive job holds the whole node, but its step uses only what srun asks for)."
        )
    return n, (
        f"# {n} = the default for CPU jobs, one per worker: fits small nodes (the localhost test node has 2 CPUs);\n"
        "# --cpus-per-task N gives each worker's intra-op threads cores of their own."
    )


HEADER = """#!/bin/bash
# xtoken launch --recipe @@RECIPE@@ (@@DATE@@)
# @@LAYOUT@@
# CPUs: the one task per node asks for @@CPUS@@ CPUs, in #SBATCH --cpus-per-task (the allocation)
# and again in srun --cpus-per-task (the job step): since SLURM 20.11 a step gets only the CPUs it
# asks for (default 1 per task), and since 22.05 srun does not inherit --cpus-per-task from sbatch
# (exporting SRUN_CPUS_PER_TASK is the other way). Without them torchrun, its workers, their NCCL
# threads and the data reading would share one core under cgroup core confinement.
@@CPUS_WHY@@
@@SBATCH@@

# ---- paths ------------------------------------------------------------------------------------
RUN_DIR=@@RUN_DIR@@
CKPT_DIR=@@CKPT_DIR@@
CONFIG="$RUN_DIR/config.json"

# ---- environment of every rank: srun --export=ALL passes it to each node's torchrun and workers
# (and into pyxis containers). PYTHONUNBUFFERED=1: output reaches the job's output file line by line
# (rank 0 logs a progress line every train.log_interval steps). PYTORCH_CUDA_ALLOC_CONF: expandable
# segments keep the caching allocator from fragmenting. CUDA_DEVICE_MAX_CONNECTIONS is not set:
# megatron needs =1 only for tensor/sequence-parallel communication overlap, which these runs do
# not turn on. More with xtoken launch --env KEY=VALUE (which also overrides these).
@@EXPORTS@@

mkdir -p "$RUN_DIR" "$CKPT_DIR"
# the resolved run config (recipe + overrides), validated at submission
cat > "$CONFIG" <<'XTOKEN_CONFIG_EOF'
@@CONFIG@@
XTOKEN_CONFIG_EOF

log() { echo "[xtoken $(date '+%F %T')] $*"; }
log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: recipe @@RECIPE@@," \\
    "latest checkpoint: $(cat "$CKPT_DIR/latest.txt" 2>/dev/null || echo none)"

# ---- rendezvous from the SLURM environment ---------------------------------------------------
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export NPROC_PER_NODE=@@NPROC@@ CONFIG

# ---- one torchrun per node; on SIGURG the wrapper sends USR1 to its torchrun's workers only ----
read -r -d '' NODE_SCRIPT <<'XTOKEN_NODE_EOF'
@@ACTIVATE@@
(trap '' USR1; exec @@PYTHON@@ -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \\
    --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\
    --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 -m xtoken_nemo.cli train --config "$CONFIG") &
TORCHRUN=$!
forward() { for pid in $(pgrep -P "$TORCHRUN"); do kill -USR1 "$pid" 2>/dev/null; done; }
trap forward URG TERM
wait "$TORCHRUN"; rc=$?
while kill -0 "$TORCHRUN" 2>/dev/null; do wait "$TORCHRUN"; rc=$?; done
exit $rc
XTOKEN_NODE_EOF

PREEMPTED=0
on_signal() {
    log "received $1: asking the training processes to checkpoint and stop (then requeue)"
    PREEMPTED=1
    # SIGURG reaches every process of the step but only the node wrappers act on it
    scancel --signal=URG "$SLURM_JOB_ID" || log "scancel --signal=URG failed"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=@@CPUS@@ --export=ALL \
--kill-on-bad-exit=1 @@SRUN_ARGS@@bash -c "$NODE_SCRIPT" &
SRUN_PID=$!
# wait returns early when a trapped signal arrives: keep waiting for srun (children must not outlive us)
wait "$SRUN_PID"; rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; rc=$?; done

latest=$(cat "$CKPT_DIR/latest.txt" 2>/dev/null || echo none)
if [ "$PREEMPTED" = 1 ] && [ "$latest" != "@@STEPS@@" ]; then
    log "training stopped at checkpoint $latest of @@STEPS@@ (exit $rc): requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
log "training finished with exit code $rc, latest checkpoint $latest of @@STEPS@@"
exit $rc
"""


def job_name(recipe: str) -> str:
    return f"xtoken-{recipe}"


def render(
    recipe: str,
    cfg: DistillConfig,
    layout: Layout,
    run_dir: Path,
    opts: JobOptions,
    root: Path | None = None,
    note: str | None = None,
) -> str:
    """The sbatch script (text) for one run. ``note`` replaces the render date in the first
    comment line (deterministic scripts, e.g. the examples under launcher/scripts)."""
    q = shlex.quote
    cpus, cpus_why = _cpus(layout, opts)
    sbatch = [
        f"--job-name={job_name(recipe)}",
        f"--nodes={layout.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus}",
        f"--time={opts.time_limit}",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        f"--signal=B:USR1@{opts.signal_seconds}",
        "--requeue",
    ]
    if layout.gpus_per_node:
        sbatch.insert(4, f"--gpus-per-node={layout.gpus_per_node}")
    if opts.exclusive and layout.gpus_per_node:
        sbatch.append("--exclusive")
    if opts.partition:
        sbatch.append(f"--partition={opts.partition}")
    if opts.account:
        sbatch.append(f"--account={opts.account}")
    sbatch += opts.extra_sbatch
    srun_args = ""
    if opts.container:
        parts = [f"--container-image={q(opts.container)}"]
        if opts.container_mounts:
            parts.append(f"--container-mounts={q(','.join(opts.container_mounts))}")
        parts.append(f"--container-workdir={q(opts.container_workdir or str(run_dir))}")
        srun_args = " ".join(parts) + " "
    if opts.venv:
        activate = f"source {q(str(Path(opts.venv) / 'bin' / 'activate'))}"
        python = q(str(Path(opts.venv) / "bin" / "python"))
    else:
        activate = "# container: python is the image's"
        python = "python"
    env = {"XTOKEN_ROOT": str(root)} if root is not None else {}
    env.update(DEFAULT_ENV)
    for key, value in opts.env.items():
        if not _ENV_KEY.fullmatch(key):
            raise ConfigError(f"env {key!r}: not a shell variable name")
        env[key] = value
    exports = "\n".join(f"export {k}={q(v)}" for k, v in env.items())
    replacements = {
        "RECIPE": recipe,
        "DATE": note if note is not None else "rendered " + datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPUS_WHY": cpus_why,
        "CPUS": str(cpus),
        "LAYOUT": "layout: " + layout.describe(),
        "SBATCH": "\n".join(f"#SBATCH {s}" for s in sbatch),
        "RUN_DIR": q(str(run_dir)),
        "CKPT_DIR": q(cfg.checkpoint.dir),
        "EXPORTS": exports,
        "CONFIG": json.dumps(cfg.to_dict(), indent=1),
        "NPROC": str(layout.procs_per_node),
        "ACTIVATE": activate,
        "PYTHON": python,
        "SRUN_ARGS": srun_args,
        "STEPS": str(cfg.train.train_steps),
    }
    text = HEADER
    for key, value in replacements.items():
        text = text.replace(f"@@{key}@@", value)
    assert "@@" not in text, "unfilled placeholder in the sbatch template"
    return text
