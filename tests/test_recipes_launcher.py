"""Recipes (every run of docs/method.md, "The paper's runs"), the derived parallel layout, and the rendered
sbatch scripts (bash -n, directives, embedded config). Fast: no training, no SLURM."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest

from xtoken_nemo.cli import main
from xtoken_nemo.distill.config import ConfigError
from xtoken_nemo.launcher import LayoutError, derive_layout
from xtoken_nemo.recipes import all_recipes, get_recipe, paper_recipes, resolve_sweep

PAPER_NAMES = [
    "cpt",
    "llama3b-kl",
    "qwen3-uld",
    "qwen3-gold",
    "qwen3-pkl",
    "phi4mini-uld",
    "phi4mini-gold",
    "phi4mini-hkl",
    "phi4mini-pkl",
    "multi-phi-llama",
    "multi-phi-qwen",
    "multi-phi-qwen-llama",
    "multi-phi-llama-adaptive",
]


def test_every_paper_row_has_a_recipe_with_the_paper_settings(tmp_path):
    assert [r.name for r in paper_recipes()] == PAPER_NAMES
    assert [r.name for r in all_recipes()] == PAPER_NAMES + ["qwen3-jkl", "debug-1gpu", "cpu-tiny"]
    for r in paper_recipes():
        cfg = r.config(tmp_path)
        assert (r.nodes, r.gpus_per_node) == (16, 8)
        assert (cfg.train.train_steps, cfg.train.global_batch_size, cfg.data.seq_length) == (30000, 768, 4096)
        o = cfg.optim
        assert (o.lr, o.warmup_fraction, o.weight_decay, o.clip_grad) == (5e-5, 0.05, 0.1, 1.0)
        assert cfg.student.checkpoint == str(tmp_path / "ckpt" / "llama-3.2-1b") and cfg.student.tokenizer == "llama3"
        assert cfg.data.paths == [str(tmp_path / "data" / "climbmix")]
        assert cfg.checkpoint.dir == str(tmp_path / "runs" / r.name / "checkpoints")
        cfg.validate(world_size=128)
        assert r.paper is not None
    modes = {
        r.name: [(t.model.tokenizer, t.mode, t.alpha) for t in r.config(tmp_path).teachers] for r in paper_recipes()
    }
    assert modes["cpt"] == [] and get_recipe("cpt").config(tmp_path).train.kd_scaling == "ce_only"
    assert modes["llama3b-kl"] == [("llama3", "kl", 1.0)]
    assert [m[1] for k, v in modes.items() if k.startswith("qwen3-") for m in v] == ["uld", "gold", "pkl"]
    assert [m[1] for k, v in modes.items() if k.startswith("phi4mini-") for m in v] == ["uld", "gold", "hkl", "pkl"]
    assert modes["multi-phi-llama"] == [("phi4mini", "hkl", 0.8), ("llama3", "kl", 0.2)]
    assert [m[:2] for m in modes["multi-phi-qwen-llama"]] == [("phi4mini", "hkl"), ("qwen3", "pkl"), ("llama3", "kl")]
    assert get_recipe("multi-phi-llama-adaptive").config(tmp_path).train.alpha_mode == "ce"
    qwen = get_recipe("qwen3-pkl").config(tmp_path).teachers[0]
    assert qwen.projection == str(tmp_path / "w" / "W_llama3_qwen3.safetensors") and qwen.merge == "chain"
    assert get_recipe("qwen3-gold").config(tmp_path).teachers[0].projection is None
    # the paper's figures travel with the recipes (for `xtoken report`)
    assert (get_recipe("multi-phi-llama").paper.gsm8k, get_recipe("multi-phi-llama").paper.avg) == (20.39, 40.48)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    assert [r.name for r in resolve_sweep("paper")] == PAPER_NAMES
    assert [r.name for r in resolve_sweep("qwen3-pkl, phi4mini-hkl")] == ["qwen3-pkl", "phi4mini-hkl"]


def test_recipes_command_lists_them(capsys, tmp_path):
    assert main(["recipes", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "student", "teachers", "steps", "batch", "context", "nodes"]
    assert re.search(
        r"multi-phi-llama\s+llama-3\.2-1b\s+phi4_mini:hkl@0\.8 \+ llama_3b:kl@0\.2\s+30000\s+768\s+4096\s+16x8", out
    )
    assert re.search(r"cpu-tiny\s+.*\s+4\s+2\s+64\s+1xcpu", out)
    assert all(name in out for name in PAPER_NAMES)


def test_paper_layout_is_derived_and_impossible_ones_are_refused(tmp_path):
    cfg = get_recipe("qwen3-pkl").config(tmp_path)
    layout = derive_layout(cfg, 16, 8)
    assert (layout.world, layout.tp, layout.dp, layout.micro_batch, layout.accumulation) == (128, 1, 128, 1, 6)
    assert (
        "16 node(s) x 8 GPUs = 128 ranks: TP 1, DP 128, micro-batch 1, 6 accumulation step(s) -> global batch 768"
        in layout.describe()
    )
    cfg.train.tensor_parallel = 2
    cfg.train.micro_batch_size = 2
    layout = derive_layout(cfg, 16, 8)
    assert (layout.dp, layout.accumulation) == (64, 6)
    assert derive_layout(get_recipe("debug-1gpu").config(tmp_path), 1, 1).accumulation == 8
    cfg = get_recipe("qwen3-pkl").config(tmp_path)
    with pytest.raises(
        LayoutError,
        match=(
            r"global batch 768 is not divisible by micro-batch 1 x DP 40 "
            r".*node counts that fit: \[1, 2, 3, 4, 6, 8, 12, 16\]"
        ),
    ):
        derive_layout(cfg, 5, 8)
    cfg.train.tensor_parallel = 16
    with pytest.raises(LayoutError, match="must divide the 8 ranks of a node"):
        derive_layout(cfg, 16, 8)
    # a checkpoint whose vocabulary was padded for TP<=2 cannot run at TP 4
    ckpt = tmp_path / "ckpt" / "llama-3.2-1b"
    ckpt.mkdir(parents=True)
    (ckpt / "xtoken_model.json").write_text(json.dumps({"padded_for_tp": 2, "arch": {"num_attention_heads": 32}}))
    cfg.train.tensor_parallel = 4
    with pytest.raises(LayoutError, match="padded for TP sizes dividing 2, not TP 4"):
        derive_layout(cfg, 16, 8)


def _dry_run(capsys, *args) -> tuple[str, str]:
    assert main(["launch", *args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _bash_n(script: str, path: Path) -> None:
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_container_script_for_the_paper_run(capsys, tmp_path):
    out, err = _dry_run(
        capsys,
        "--recipe",
        "qwen3-pkl",
        "--container",
        "/shared/xtoken-nemo.sqsh",
        "--container-mounts",
        "/lustre:/lustre",
        "--root",
        str(tmp_path),
        "--partition",
        "batch",
        "data.paths=[/lustre/climbmix,/lustre/more]",
        "data.weights=[0.7,0.3]",
    )
    _bash_n(out, tmp_path / "job.sbatch")
    assert "TP 1, DP 128, micro-batch 1, 6 accumulation step(s)" in err
    assert "would refuse" in err and "W file" in err and "xtoken build-w --student llama3 --teacher qwen3" in err
    directives = re.findall(r"^#SBATCH (\S+)$", out, flags=re.M)
    run = tmp_path / "runs" / "qwen3-pkl"
    for expected in (
        "--job-name=xtoken-qwen3-pkl",
        "--nodes=16",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--requeue",
        f"--output={run}/slurm-%j.out",
        "--exclusive",
        "--partition=batch",
    ):
        assert expected in directives, expected
    assert "--container-image=/shared/xtoken-nemo.sqsh --container-mounts=/lustre:/lustre" in out
    assert 'python -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID"' in out
    assert "export NPROC_PER_NODE=8" in out and 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in out
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in out and 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert f"export XTOKEN_ROOT={tmp_path}" in out
    config = json.loads(out.split("<<'XTOKEN_CONFIG_EOF'\n", 1)[1].split("\nXTOKEN_CONFIG_EOF", 1)[0])
    assert config["data"]["paths"] == ["/lustre/climbmix", "/lustre/more"] and config["data"]["weights"] == [0.7, 0.3]
    assert config["teachers"][0]["mode"] == "pkl" and config["checkpoint"]["dir"] == str(run / "checkpoints")


def test_bare_metal_script_and_refusals(capsys, tmp_path):
    out, err = _dry_run(
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
        "train.train_steps=7",
    )
    _bash_n(out, tmp_path / "job.sbatch")
    assert "--gpus-per-node" not in out and "--exclusive" not in out and "--container-image" not in out
    assert "source /opt/venv/bin/activate" in out and "exec /opt/venv/bin/python -m torch.distributed.run" in out
    assert "export NPROC_PER_NODE=1" in out and '[ "$latest" != "7" ]' in out
    assert "1 node(s) x 1 CPU process(es) = 1 ranks" in err
    assert main(["launch", "--recipe", "qwen3-pkl", "--bare-metal", "--nodes", "5", "--dry-run"]) == 2
    assert "not divisible by micro-batch 1 x DP 40" in capsys.readouterr().err
    assert main(["launch", "--recipe", "qwen3-pkl", "--dry-run"]) == 2
    assert "--container IMAGE (pyxis/enroot) or --bare-metal" in capsys.readouterr().err
    assert main(["launch", "--recipe", "qwen3-pkl", "--bare-metal", "train.global_batch_size=100", "--dry-run"]) == 2
    assert "global batch 100 is not divisible" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ready_root(tmp_path_factory):
    """A root with every file the paper recipes check: stub checkpoint records and data manifest,
    real W files built from the built-in tokenizers."""
    from xtoken_nemo.recipes.common import MODELS
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    root = tmp_path_factory.mktemp("root")
    for directory, _, _ in MODELS.values():
        (root / "ckpt" / directory).mkdir(parents=True)
        (root / "ckpt" / directory / "xtoken_model.json").write_text(
            json.dumps({"padded_for_tp": 8, "arch": {"num_attention_heads": 32}})
        )
    (root / "data" / "climbmix").mkdir(parents=True)
    (root / "data" / "climbmix" / "manifest.json").write_text("{}")
    (root / "w").mkdir()
    student = load_tokenizer("llama3")
    for teacher in ("qwen3", "phi4mini"):
        build_projection_matrix(student, load_tokenizer(teacher), progress=False).save(
            root / "w" / f"W_llama3_{teacher}.safetensors"
        )
    return root


def test_sweep_submits_one_job_per_run_and_prints_ids(capsys, tmp_path, ready_root):
    fake = tmp_path / "sbatch"
    calls = tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho $((1000 + $(wc -l < {calls})))\n')
    fake.chmod(0o755)
    assert (
        main(
            [
                "launch",
                "--sweep",
                "paper",
                "--container",
                "img.sqsh",
                "--root",
                str(ready_root),
                "--sbatch-command",
                str(fake),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    ids = re.findall(r"^(\S+): submitted job (\d+)", out, flags=re.M)
    assert [name for name, _ in ids] == PAPER_NAMES and [int(i) for _, i in ids] == list(range(1001, 1014))
    scripts = [line.split()[-1] for line in calls.read_text().splitlines()]
    assert all(Path(s).is_file() and Path(s).parent == ready_root / "runs" / n for s, n in zip(scripts, PAPER_NAMES))
    assert calls.read_text().splitlines()[0].startswith("--parsable ")


def test_submission_refuses_a_w_of_other_tokenizers_and_missing_files(capsys, tmp_path, ready_root):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(ready_root, root)
    shutil.copy(root / "w" / "W_llama3_qwen3.safetensors", root / "w" / "W_llama3_phi4mini.safetensors")
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/bash\necho 1\n")
    fake.chmod(0o755)
    assert (
        main(
            [
                "launch",
                "--recipe",
                "phi4mini-hkl",
                "--container",
                "img",
                "--root",
                str(root),
                "--sbatch-command",
                str(fake),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "cannot submit: teachers.0 (phi4_mini): W file" in err and "does not fit tokenizers llama3 -> phi4mini" in err
    )
    assert (
        main(
            [
                "launch",
                "--recipe",
                "multi-phi-llama",
                "--container",
                "img",
                "--root",
                str(root),
                "--sbatch-command",
                str(fake),
                "data.paths=[/nowhere]",
            ]
        )
        == 2
    )
    assert "/nowhere is not a preprocessed dataset" in capsys.readouterr().err
    # a same-tokenizer/ULD/GOLD recipe needs no W
    assert (
        main(
            [
                "launch",
                "--recipe",
                "qwen3-gold",
                "--container",
                "img",
                "--root",
                str(root),
                "--sbatch-command",
                str(fake),
            ]
        )
        == 0
    )
    assert "qwen3-gold: submitted job 1" in capsys.readouterr().out


def test_train_recipe_print_config(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XTOKEN_ROOT", str(tmp_path))
    assert (
        main(
            [
                "train",
                "--recipe",
                "multi-phi-llama",
                "--print-config",
                "data.paths=[/a,/b]",
                "teachers.0.alpha=0.7",
                "teachers.1.alpha=0.3",
            ]
        )
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"]["paths"] == ["/a", "/b"] and [t["alpha"] for t in cfg["teachers"]] == [0.7, 0.3]
    assert cfg["student"]["checkpoint"] == str(tmp_path / "ckpt" / "llama-3.2-1b")
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "cpt", "--config", "x.json"])


def test_qwen3_jkl_recipe_is_qwen3_pkl_plus_the_support_and_checks_it(tmp_path):
    from xtoken_nemo.recipes.validate import check_files
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.prefix_support import build_prefix_support

    jkl, pkl = get_recipe("qwen3-jkl"), get_recipe("qwen3-pkl")
    cfg, base = jkl.config(tmp_path), pkl.config(tmp_path)
    cfg.validate(world_size=128)
    assert (jkl.nodes, jkl.gpus_per_node, jkl.paper) == (16, 8, None)
    assert (cfg.optim, cfg.data.seq_length) == (base.optim, base.data.seq_length)
    assert cfg.train == dataclasses.replace(base.train, kd_scale_value="trainable")
    (t,) = cfg.teachers
    assert (t.mode, t.projection, t.joint_weight) == ("jkl", base.teachers[0].projection, 1.0)
    assert t.support == str(tmp_path / "w" / "S_llama3_qwen3.safetensors")
    missing = [p for p in check_files(cfg) if "prefix-support" in p]
    assert len(missing) == 1 and "`xtoken build-support --student llama3 --teacher qwen3" in missing[0]
    student, phi = load_tokenizer("llama3"), load_tokenizer("phi4mini")
    build_prefix_support(student, phi, progress=False).save(t.support)  # the wrong teacher
    (wrong,) = [p for p in check_files(cfg) if "prefix-support" in p]
    assert "does not fit tokenizers llama3 -> qwen3" in wrong
