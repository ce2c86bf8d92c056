"""``xtoken launch``: render a recipe's sbatch script and submit it (or print it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_launch(args: argparse.Namespace) -> int:
    from xtoken_nemo.distill.config import ConfigError
    from xtoken_nemo.launcher.sbatch import JobOptions, parse_env
    from xtoken_nemo.launcher.submit import prepare, submit
    from xtoken_nemo.recipes import default_root, resolve_sweep

    if bool(args.recipe) == bool(args.sweep):
        raise ConfigError("give exactly one of --recipe NAME or --sweep (paper | name,name,...)")
    if args.container and args.bare_metal:
        raise ConfigError("--container and --bare-metal exclude each other")
    if not args.container and not args.bare_metal:
        raise ConfigError("choose where training runs: --container IMAGE (pyxis/enroot) or --bare-metal [--venv PATH]")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task={args.cpus_per_task}: need at least 1")
    env = parse_env(args.env or [])
    root = Path(args.root).expanduser().resolve() if args.root else default_root()
    venv = None
    if args.bare_metal:
        venv = str(Path(args.venv or sys.prefix).expanduser().resolve())
    names = [args.recipe] if args.recipe else [r.name for r in resolve_sweep(args.sweep)]
    jobs = []
    for name in names:
        opts = JobOptions(
            container=args.container,
            container_mounts=args.container_mounts or [],
            container_workdir=args.container_workdir,
            venv=venv,
            partition=args.partition,
            account=args.account,
            time_limit=args.time,
            signal_seconds=args.signal_seconds,
            extra_sbatch=args.sbatch or [],
            env=dict(env),
            cpus_per_task=args.cpus_per_task,
        )
        jobs.append(prepare(name, root, args.overrides, args.nodes, args.gpus_per_node, opts, args.cpu_procs_per_node))
    for job in jobs:
        print(f"{job.recipe}: {job.layout.describe()}", file=sys.stderr if args.dry_run else sys.stdout)
        for problem in job.problems:
            print(f"{job.recipe}: {'would refuse' if args.dry_run else 'cannot submit'}: {problem}", file=sys.stderr)
    if args.dry_run:
        for job in jobs:
            if len(jobs) > 1:
                print(f"# ===== {job.script_path} =====")
            print(job.script)
        return 0
    if any(job.problems for job in jobs):
        return 2
    for job in jobs:
        job_id = submit(job, args.sbatch_command)
        print(
            f"{job.recipe}: submitted job {job_id} ({job.script_path}; "
            f"output {job.script_path.parent}/slurm-{job_id}.out)"
        )
    return 0


def add_launch_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="render a recipe's sbatch script and submit it (SLURM; pyxis container or bare metal)",
        description="Submit a recipe (or a sweep of recipes, one job each) to SLURM. "
        "Overrides key.sub=value apply to every job.",
    )
    p.add_argument("--recipe", help="a recipe name (`xtoken recipes`)")
    p.add_argument("--sweep", help="'paper' for every run of the paper's table, or name,name,...")
    p.add_argument(
        "overrides", nargs="*", help="key.sub=value, e.g. data.paths=[/lustre/climbmix] train.train_steps=100"
    )
    p.add_argument("--root", help="root of ckpt/, w/, data/, runs/ (default $XTOKEN_ROOT or .)")
    p.add_argument("--nodes", type=int, help="default: the recipe's (16 for the paper runs)")
    p.add_argument("--gpus-per-node", type=int, help="default: the recipe's (8; 0 = CPU)")
    p.add_argument("--cpu-procs-per-node", type=int, default=1, help="CPU workers per node when --gpus-per-node 0")
    p.add_argument(
        "--cpus-per-task",
        type=int,
        metavar="N",
        help="CPUs of the one task per node, asked for in #SBATCH and srun (default: 12 per GPU, 96 on 8 GPUs; "
        "CPU jobs: one per worker)",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="export into every rank; repeat (defaults PYTHONUNBUFFERED=1, "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; --env overrides them)",
    )
    p.add_argument("--container", help="pyxis/enroot image: a .sqsh from `enroot import` or a registry reference")
    p.add_argument(
        "--container-mounts", action="append", help="SRC:DST[:ro]; repeat. Mount the root at the same path inside"
    )
    p.add_argument("--container-workdir")
    p.add_argument("--bare-metal", action="store_true", help="no container: run the venv's python on the nodes")
    p.add_argument("--venv", help="with --bare-metal: the virtualenv on a shared filesystem (default: this python's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="job time limit (default: the recipe's)")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="USR1 this many seconds before the time limit (checkpoint + requeue)",
    )
    p.add_argument("--sbatch", action="append", help="an extra #SBATCH option, e.g. --sbatch=--qos=high; repeat")
    p.add_argument("--sbatch-command", default="sbatch", help=argparse.SUPPRESS)
    p.add_argument(
        "--dry-run", action="store_true", help="print the script(s) (and the layout on stderr); submit nothing"
    )
    p.set_defaults(func=cmd_launch)
