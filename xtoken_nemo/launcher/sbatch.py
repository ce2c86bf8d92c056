"""Render the sbatch script of a run.

One ``srun`` task per node runs one ``torchrun`` (``python -m torch.distributed.run``) that
starts one worker per GPU (or ``cpu_procs_per_node`` CPU workers). We chose torchrun per node
over one SLURM task per GPU because it is the same launcher as a single-node run, works
identically inside pyxis containers and on bare metal, and gives every worker LOCAL_RANK /
RANK / WORLD_SIZE / MASTER_ADDR the way the trainer already reads them. Rendezvous is static
(c10d) at the first node of ``$SLURM_JOB_NODELIST``, port derived from the job id.

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
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from xtoken_nemo.distill.config import DistillConfig
from xtoken_nemo.launcher.layout import Layout


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
    env: dict[str, str] = field(default_factory=dict)  # exported before srun


HEADER = """#!/bin/bash
# xtoken launch --recipe @@RECIPE@@ (rendered @@DATE@@)
# @@LAYOUT@@
@@SBATCH@@

# ---- paths ------------------------------------------------------------------------------------
RUN_DIR=@@RUN_DIR@@
CKPT_DIR=@@CKPT_DIR@@
CONFIG="$RUN_DIR/config.json"
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
    --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 -m xtoken_nemo.cli train --config "$CONFIG" --quiet) &
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

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 @@SRUN_ARGS@@bash -c "$NODE_SCRIPT" &
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


def render(recipe: str, cfg: DistillConfig, layout: Layout, run_dir: Path, opts: JobOptions, root: Path | None = None) -> str:
    """The sbatch script (text) for one run."""
    q = shlex.quote
    sbatch = [
        f"--job-name={job_name(recipe)}",
        f"--nodes={layout.nodes}",
        "--ntasks-per-node=1",
        f"--time={opts.time_limit}",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        f"--signal=B:USR1@{opts.signal_seconds}",
        "--requeue",
    ]
    if layout.gpus_per_node:
        sbatch.insert(3, f"--gpus-per-node={layout.gpus_per_node}")
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
    env = dict(opts.env)
    if root is not None:
        env.setdefault("XTOKEN_ROOT", str(root))
    exports = "\n".join(f"export {k}={q(v)}" for k, v in env.items())
    replacements = {
        "RECIPE": recipe,
        "DATE": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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
