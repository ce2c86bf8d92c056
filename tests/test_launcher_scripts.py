"""What the rendered sbatch script asks SLURM for and hands to every rank: CPUs for the job step
(in #SBATCH and srun), exported environment (--env and its defaults), progress lines in the job's
output file, the embedded config, and the committed example scripts under launcher/scripts/.
Fast: no SLURM (the script runs once against stand-in srun/scontrol)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

from xtoken_nemo.cli import main
from xtoken_nemo.distill.config import MODEL_SHAPE_FIELDS, ModelConfig, config_from_dict
from xtoken_nemo.launcher.examples import COMMAND, CONTAINER, ROOT, render_examples, write_examples
from xtoken_nemo.recipes import get_recipe, paper_recipes

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launcher" / "scripts"


def _script(capsys, *args) -> str:
    assert main(["launch", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def _bash_n(script: str, path: Path) -> None:
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _srun_line(script: str) -> str:
    lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, lines
    return lines[0]


def _config(script: str) -> dict:
    return json.loads(script.split("<<'XTOKEN_CONFIG_EOF'\n", 1)[1].split("\nXTOKEN_CONFIG_EOF", 1)[0])


def test_job_step_asks_for_cpus_in_sbatch_and_srun(capsys, tmp_path):
    # GPU nodes: 12 per GPU by default, in the allocation and again for the step (srun does not inherit it)
    out = _script(capsys, "--recipe", "qwen3-pkl", "--container", "img.sqsh", "--root", str(tmp_path))
    _bash_n(out, tmp_path / "gpu.sbatch")
    assert re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", out, flags=re.M) == ["96"]
    assert " --cpus-per-task=96 " in _srun_line(out)
    assert "since 22.05 srun does not inherit --cpus-per-task from sbatch" in out
    assert "# 96 = the default, 12 per GPU x 8 GPUs" in out
    out = _script(
        capsys,
        "--recipe",
        "qwen3-pkl",
        "--container",
        "img.sqsh",
        "--root",
        str(tmp_path),
        "--gpus-per-node",
        "4",
        "--nodes",
        "32",
    )
    assert "#SBATCH --cpus-per-task=48" in out and " --cpus-per-task=48 " in _srun_line(out)
    # overridden: both places
    out = _script(
        capsys, "--recipe", "qwen3-pkl", "--container", "img.sqsh", "--root", str(tmp_path), "--cpus-per-task", "112"
    )
    assert re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", out, flags=re.M) == [
        "112"
    ] and " --cpus-per-task=112 " in _srun_line(out)
    assert "# 112: set with --cpus-per-task" in out
    # CPU jobs: one per worker, so the default fits the 2-CPU localhost node of tests/test_cluster_runs.py
    out = _script(
        capsys,
        "--recipe",
        "cpu-tiny",
        "--bare-metal",
        "--venv",
        "/opt/venv",
        "--root",
        str(tmp_path),
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
    )
    _bash_n(out, tmp_path / "cpu.sbatch")
    assert re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", out, flags=re.M) == [
        "1"
    ] and " --cpus-per-task=1 " in _srun_line(out)
    out = _script(
        capsys,
        "--recipe",
        "cpu-tiny",
        "--bare-metal",
        "--root",
        str(tmp_path),
        "--gpus-per-node",
        "0",
        "--cpu-procs-per-node",
        "2",
    )
    assert "#SBATCH --cpus-per-task=2" in out and " --cpus-per-task=2 " in _srun_line(out)
    assert (
        main(
            [
                "launch",
                "--recipe",
                "cpu-tiny",
                "--bare-metal",
                "--root",
                str(tmp_path),
                "--cpus-per-task",
                "0",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "--cpus-per-task=0: need at least 1" in capsys.readouterr().err


def test_env_is_exported_before_srun_with_defaults_and_overrides(capsys, tmp_path):
    out = _script(capsys, "--recipe", "qwen3-pkl", "--container", "img.sqsh", "--root", str(tmp_path))
    exports = re.findall(r"^export (\w+)=(.*)$", out, flags=re.M)
    assert exports[:3] == [
        ("XTOKEN_ROOT", str(tmp_path)),
        ("PYTHONUNBUFFERED", "1"),
        ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    ]
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in dict(exports) and "CUDA_DEVICE_MAX_CONNECTIONS is not set" in out
    assert " --export=ALL " in _srun_line(
        out
    )  # a site's SLURM_EXPORT_ENV=NONE would otherwise keep them from the ranks
    assert out.index("export PYTHONUNBUFFERED=1") < out.index(_srun_line(out))

    weird = "a b'c $HOME"
    out = _script(
        capsys,
        "--recipe",
        "qwen3-pkl",
        "--container",
        "img.sqsh",
        "--root",
        str(tmp_path),
        "--env",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False",
        "--env",
        "NCCL_DEBUG=WARN",
        "--env",
        f"MY_VAR={weird}",
        "--env",
        "EMPTY=",
    )
    _bash_n(out, tmp_path / "env.sbatch")
    exports = re.findall(r"^export (\w+)=.*$", out, flags=re.M)
    assert exports[:6] == [
        "XTOKEN_ROOT",
        "PYTHONUNBUFFERED",
        "PYTORCH_CUDA_ALLOC_CONF",
        "NCCL_DEBUG",
        "MY_VAR",
        "EMPTY",
    ]
    # the export lines, run by bash, give exactly the values asked for
    wanted = r"export (XTOKEN_ROOT|PYTHONUNBUFFERED|PYTORCH_CUDA_ALLOC_CONF|NCCL_DEBUG|MY_VAR|EMPTY)="
    block = "\n".join(line for line in out.splitlines() if re.match(wanted, line))
    env = subprocess.run(
        ["bash", "-c", block + '\nprintf "%s\\n" "$PYTORCH_CUDA_ALLOC_CONF" "$NCCL_DEBUG" "$MY_VAR" "[$EMPTY]"'],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": "/home/x"},
    ).stdout.splitlines()
    assert env == ["expandable_segments:False", "WARN", weird, "[]"]

    for bad in ("1X=1", "NO_EQUALS", "A-B=1", "=1", "A B=1"):
        assert (
            main(
                [
                    "launch",
                    "--recipe",
                    "qwen3-pkl",
                    "--container",
                    "img",
                    "--root",
                    str(tmp_path),
                    "--env",
                    bad,
                    "--dry-run",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(
            f"xtoken launch: error: --env {bad!r}: expected KEY=VALUE"
        ), err


def test_node_script_trains_without_quiet_and_unbuffered(capsys, tmp_path):
    out = _script(
        capsys,
        "--recipe",
        "cpu-tiny",
        "--bare-metal",
        "--venv",
        "/opt/venv",
        "--root",
        str(tmp_path),
        "--gpus-per-node",
        "0",
    )
    assert "--quiet" not in out
    assert '-m xtoken_nemo.cli train --config "$CONFIG") &' in out
    assert re.search(r"^export PYTHONUNBUFFERED=1$", out, flags=re.M)
    assert "rank 0 logs a progress line every train.log_interval steps" in out


def test_script_runs_srun_with_cpus_and_the_exported_env(capsys, tmp_path):
    """The rendered script run by bash with stand-in srun/scontrol: srun gets the CPU request and the
    environment holds the exports."""
    root = tmp_path / "root"
    out = _script(
        capsys,
        "--recipe",
        "cpu-tiny",
        "--bare-metal",
        "--venv",
        "/opt/venv",
        "--root",
        str(root),
        "--gpus-per-node",
        "0",
        "--cpu-procs-per-node",
        "2",
        "--env",
        "NCCL_DEBUG=INFO",
        "train.train_steps=3",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\nenv > {tmp_path}/srun.env\n'
        f'mkdir -p "$CKPT_DIR"; echo 3 > "$(dirname "$CONFIG")/checkpoints/latest.txt"\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo node1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node1",
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training finished with exit code 0, latest checkpoint 3 of 3" in proc.stdout
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:5] == ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--export=ALL", "--kill-on-bad-exit=1"]
    assert args[5:7] == ["bash", "-c"] and "xtoken_nemo.cli train" in "\n".join(args[7:])
    seen = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert seen["PYTHONUNBUFFERED"] == "1" and seen["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert seen["NCCL_DEBUG"] == "INFO" and seen["XTOKEN_ROOT"] == str(root) and seen["NPROC_PER_NODE"] == "2"
    assert seen["MASTER_ADDR"] == "node1" and seen["MASTER_PORT"] == "20007"
    written = json.loads((root / "runs" / "cpu-tiny" / "config.json").read_text())
    assert written["train"]["train_steps"] == 3


def test_embedded_config_shows_what_runs_and_parses_back(capsys, tmp_path):
    out = _script(capsys, "--recipe", "qwen3-pkl", "--container", "img.sqsh", "--root", str(tmp_path))
    config = _config(out)
    for model in [config["student"]] + [t["model"] for t in config["teachers"]]:
        assert model["checkpoint"] and "hidden_size" not in model and "num_layers" not in model, model
    assert '"hidden_size": 64' not in out and '"num_layers": 2' not in out
    _same_run(config_from_dict(config), get_recipe("qwen3-pkl").config(tmp_path))
    # and for a multi-teacher row
    out = _script(capsys, "--recipe", "multi-phi-qwen-llama", "--container", "img.sqsh", "--root", str(tmp_path))
    assert '"hidden_size"' not in out and '"num_layers"' not in out
    _same_run(config_from_dict(_config(out)), get_recipe("multi-phi-qwen-llama").config(tmp_path))


def _same_run(parsed, cfg) -> None:
    """Equal in every field that runs: the shape fields of a checkpoint model are not in the JSON
    (the checkpoint gives the architecture), so they come back as the defaults."""
    assert parsed.to_dict() == cfg.to_dict()

    def runs(model: ModelConfig) -> ModelConfig:
        return (
            dataclasses.replace(model, **{k: getattr(ModelConfig(), k) for k in MODEL_SHAPE_FIELDS})
            if model.checkpoint
            else model
        )

    assert runs(parsed.student) == runs(cfg.student)
    assert [dataclasses.replace(t, model=runs(t.model)) for t in parsed.teachers] == [
        dataclasses.replace(t, model=runs(t.model)) for t in cfg.teachers
    ]
    assert dataclasses.replace(parsed, student=cfg.student, teachers=cfg.teachers) == cfg


def test_committed_launcher_scripts_are_current(tmp_path):
    fresh = tmp_path / "scripts"
    write_examples(fresh)
    expected = sorted(f"{r.name}.sbatch" for r in paper_recipes())
    assert sorted(p.name for p in fresh.iterdir()) == expected
    update = f"regenerate them from the repository root with `{COMMAND}` and commit launcher/scripts/"
    committed = sorted(p.name for p in SCRIPTS.glob("*.sbatch")) if SCRIPTS.is_dir() else []
    assert committed == expected, f"launcher/scripts/ holds {committed}, the paper recipes make {expected}: {update}"
    stale = [name for name in expected if (SCRIPTS / name).read_text() != (fresh / name).read_text()]
    assert not stale, f"launcher/scripts/ is out of date ({', '.join(stale)}): {update}"
    # deterministic, placeholders only, valid bash
    assert render_examples() == {name: (fresh / name).read_text() for name in expected}
    for name in expected:
        text = (fresh / name).read_text()
        _bash_n(text, tmp_path / "check.sbatch")
        assert "rendered" not in text.splitlines()[1] and not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", text)
        assert f"--container-image={CONTAINER}" in text and f"export XTOKEN_ROOT={ROOT}" in text
        assert f"#SBATCH --output={ROOT}/runs/{name[: -len('.sbatch')]}/slurm-%j.out" in text
        assert str(tmp_path) not in text and str(REPO) not in text
        paths = [v for v in re.findall(r'"(/[^"]*)"', text)]
        assert paths and all(p.startswith(ROOT + "/") for p in paths), paths
