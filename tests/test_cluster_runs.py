"""The cpu-tiny recipe for real: a direct run, the same recipe submitted with `xtoken launch` to
a one-node SLURM cluster started here (completion; USR1 preemption -> checkpoint -> requeue ->
resume; `scontrol requeue` -> resume), and `xtoken eval` / `xtoken report` on the result with
lm-eval and a local task file."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtoken_nemo.cli import main

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "launcher" / "tests" / "setup_slurm.sh"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from xtoken_nemo.recipes.prepare import prepare_cpu_tiny

    root = tmp_path_factory.mktemp("xtoken_root")
    prepare_cpu_tiny(root)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_root):
    """`xtoken train --recipe cpu-tiny` to completion (the checkpoint the eval test scores)."""
    os.environ["XTOKEN_ROOT"] = str(tiny_root)
    try:
        assert main(["train", "--recipe", "cpu-tiny", "--quiet"]) == 0
    finally:
        del os.environ["XTOKEN_ROOT"]
    return tiny_root / "runs" / "cpu-tiny"


@pytest.mark.slow
def test_cpu_tiny_recipe_runs_to_completion(tiny_run, capsys):
    assert (tiny_run / "checkpoints" / "latest.txt").read_text().strip() == "4"
    record = json.loads((tiny_run / "checkpoints" / "iter_0000004" / "run_config.json").read_text())
    assert record["name"] == "cpu-tiny" and [t["mode"] for t in record["teachers"]] == ["pkl", "kl"]
    assert main(["recipes"]) == 0 and "cpu-tiny" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# SLURM on localhost
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster (launcher/tests/setup_slurm.sh); skips only when SLURM cannot run here."""
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(
        ["bash", str(SETUP), "start", str(state), str(_free_port()), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"setup_slurm.sh failed: {proc.stdout}\n{proc.stderr}"
    env = dict(os.environ, SLURM_CONF=proc.stdout.strip().split("=", 1)[1])
    env.pop("XTOKEN_ROOT", None)
    jobs: list[str] = []
    yield {"env": env, "jobs": jobs, "state": state}
    for job in jobs:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    deadline = time.time() + 60
    while (
        jobs and time.time() < deadline and any(_job(env, j).get("JobState") in ("RUNNING", "COMPLETING") for j in jobs)
    ):
        time.sleep(1)
    subprocess.run(["bash", str(SETUP), "stop", str(state)], capture_output=True, timeout=60)


def _job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _launch(slurm, root: Path, run: str, *overrides: str) -> tuple[str, Path]:
    ckpt = root / "runs" / run / "checkpoints"
    cmd = [
        sys.executable,
        "-m",
        "xtoken_nemo.cli",
        "launch",
        "--recipe",
        "cpu-tiny",
        "--bare-metal",
        "--venv",
        sys.prefix,
        "--root",
        str(root),
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--time",
        "00:15:00",
        f"checkpoint.dir={ckpt}",
        f"log_dir={root / 'runs' / run / 'tb'}",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=slurm["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    slurm["jobs"].append(job_id)
    return job_id, ckpt


def _wait(what: str, predicate, timeout: float, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _latest(ckpt: Path) -> int:
    try:
        return int((ckpt / "latest.txt").read_text().strip())
    except (OSError, ValueError):
        return 0


def _output(ckpt: Path, job_id: str) -> str:
    path = ckpt.parent / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.mark.slow
def test_slurm_job_completes_and_requeued_job_resumes(slurm, tiny_root):
    env = slurm["env"]
    # 1. the rendered script, submitted as is, runs the recipe to completion
    job, ckpt = _launch(slurm, tiny_root, "slurm-complete")
    state = _wait(
        "job 1 to finish",
        lambda: _job(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and _job(env, job),
        240,
    )
    log = _output(ckpt, job)
    assert state["JobState"] == "COMPLETED", log
    assert "cpu-tiny: completed at step 4/4" in log and _latest(ckpt) == 4
    assert f"job {job} (restart 0)" in log and "training finished with exit code 0" in log
    assert state["JobName"] == "xtoken-cpu-tiny"
    # the job log shows progress: one line per step (log_interval 1) from rank 0, no bar redraws
    step_lines = re.findall(r"INFO xtoken_nemo\.distill\.trainer: (step \d+/4 .*)", log)
    assert [line.split()[1] for line in step_lines] == ["1/4", "2/4", "3/4", "4/4"], log
    assert all("tok/s" in line and "ETA" in line and "ce " in line for line in step_lines), step_lines
    assert "\r" not in log and "it/s]" not in log and "step/s]" not in log

    # 2. preemption warning (the USR1 that --signal=B:USR1@120 sends), then an external requeue
    steps = 12
    job, ckpt = _launch(slurm, tiny_root, "slurm-requeue", f"train.train_steps={steps}", "checkpoint.save_interval=1")
    _wait("the first checkpoint", lambda: _latest(ckpt) >= 1, 240)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    _wait("the preempted job to restart and resume", lambda: "resumed from" in _output(ckpt, job), 240)
    first = int(re.search(r"resumed from \S+ at step (\d+)", _output(ckpt, job)).group(1))
    assert 1 <= first < steps
    _wait("a checkpoint after the resume", lambda: _latest(ckpt) > first, 240)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    _wait("the requeued job to resume", lambda: len(re.findall(r"resumed from", _output(ckpt, job))) >= 2, 240)
    state = _wait(
        "job 2 to finish",
        lambda: _job(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and _job(env, job),
        240,
    )
    log = _output(ckpt, job)
    assert state["JobState"] == "COMPLETED", log
    assert int(state["Restarts"]) == 2
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed[0] == first and resumed[1] > first, resumed
    assert "received USR1: asking the training processes to checkpoint and stop" in log
    assert re.search(rf"training stopped at checkpoint {first} of {steps} \(exit 0\): requeueing job {job}", log), log
    assert f"job {job} (restart 1)" in log and f"job {job} (restart 2)" in log
    assert f"cpu-tiny: completed at step {steps}/{steps}" in log and _latest(ckpt) == steps
    # every step ran once per life of the job: the resumed runs did not start over
    assert f"latest checkpoint: {first}" in log


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval_installed():
    """lm-eval (with its `hf` extra) in this venv: installed here when missing, but only if pip
    says it would keep the installed torch."""
    try:
        import accelerate  # noqa: F401
        import lm_eval  # noqa: F401

        return
    except ImportError:
        pass
    pip = [sys.executable, "-m", "pip", "install", "-q", "lm-eval[hf]>=0.4.8"]
    dry = subprocess.run(pip + ["--dry-run"], capture_output=True, text=True, timeout=600)
    would = " ".join(line for line in dry.stdout.splitlines() if line.startswith("Would install"))
    if dry.returncode != 0 or re.search(r"\btorch-\d", would):
        pytest.skip(f"lm-eval cannot be installed without changing torch here: {would or dry.stderr[-300:]}")
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"pip install lm-eval failed: {proc.stderr[-300:]}")


TASK_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "three"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "red"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Kelvin", "Fahrenheit", "Celsius"], "answer": 2},
    {"question": "A cat says", "choices": ["meow", "moo", "quack"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["warm", "cold", "big"], "answer": 1},
    {"question": "In 2024, 201 people", "choices": ["came", "went", "42"], "answer": 2},
]


def _task_dir(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in TASK_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
    test: {data}
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return tmp_path


def _reference_accuracy(hf_dir: Path) -> float:
    """0-shot multiple choice by hand: sum of log p(continuation | question), argmax vs answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    correct = 0
    for doc in TASK_DOCS:
        ctx = tok(doc["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(TASK_DOCS)


@pytest.mark.slow
def test_eval_exports_and_runs_lm_eval_and_report_prints_the_paper_layout(
    tiny_run, lm_eval_installed, tmp_path, capsys
):
    tasks = _task_dir(tmp_path / "tasks")
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tiny_run / "checkpoints"),
                "--tasks",
                "tiny_mc",
                "--include-path",
                str(tasks),
                "--num-fewshot",
                "0",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "cpu-tiny" and summary["checkpoint"].endswith("iter_0000004")
    result = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert result["lm_eval"]["n-shot"]["tiny_mc"] == 0
    acc = summary["tasks"]["tiny_mc"]
    assert acc["metric"] == "acc,none"
    assert acc["value"] == pytest.approx(_reference_accuracy(tiny_run / "eval" / "hf"))

    # the report: our scores in the paper's layout, the paper's figures beside them
    fake = tmp_path / "runs" / "multi-phi-llama" / "eval"
    fake.mkdir(parents=True)
    fake_tasks = {"mmlu": 0.3101, "gsm8k": 0.2039, "hendrycks_math": 0.05, "winogrande": 0.6, "hellaswag": 0.61}
    (fake / "results.json").write_text(
        json.dumps(
            {"name": "multi-phi-llama", "tasks": {t: {"metric": "acc", "value": v} for t, v in fake_tasks.items()}}
        )
    )
    assert main(["report", str(fake.parent), str(tiny_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0]
        == "| setting | method | run | MMLU | GSM8k | MATH | Wino | HS | avg | paper GSM8k | paper avg | other |"
    )
    assert lines[2] == (
        "| Phi-mini 0.8 + Llama-3B 0.2 | X-Token multi-teacher | multi-phi-llama "
        "| 31.01 | 20.39 | 5.00 | 60.00 | 61.00 | 35.48 | 20.39 | 40.48 |  |"
    )
    assert lines[3].startswith("|  |  | cpu-tiny |") and f"tiny_mc {100 * acc['value']:.2f}" in lines[3]
