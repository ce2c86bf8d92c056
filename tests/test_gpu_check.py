"""bench/gpu_check.sh, the parts a CPU machine can check: arguments, the no-CUDA exit, --wheels,
the report (JSON line, output files), the time box, and a tiny CPU run of the same code paths
(``--allow-cpu --tiny``) that the one GPU call will run at paper shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

HAS_CUDA_DEVICE = any(Path("/dev").glob("nvidia[0-9]*"))


def run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def json_of(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(gpu_check.JSON_PREFIX)]
    assert len(lines) == 1, stdout[-2000:]
    assert stdout.rstrip().splitlines()[-1] == lines[0], "the JSON line is the last line"
    return json.loads(lines[0][len(gpu_check.JSON_PREFIX) :])


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--budget-s", "-3"],
        ["--budget-s", "x"],
        ["--parts", "nope"],
        ["--parts", ""],
        ["--steps", "0"],
        ["--tiny"],
    ],
)
def test_bad_arguments_are_a_usage_error(args):
    res = run(*args, timeout=60)
    assert res.returncode == gpu_check.EXIT_USAGE, res.stderr
    assert res.stderr.startswith("usage: bench/gpu_check.sh")
    assert "gpu_check: error:" in res.stderr


def test_help_hides_developer_flags():
    res = run("--help", timeout=60)
    assert res.returncode == 0
    assert "--wheels" in res.stdout and "--budget-s" in res.stdout and "--out" in res.stdout
    assert "--allow-cpu" not in res.stdout and "--child" not in res.stdout


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="this machine has a GPU")
@pytest.mark.parametrize("probe_torch", [False, True])
def test_without_cuda_it_exits_at_once_with_one_line(probe_torch):
    env = {"XTOKEN_GPU_CHECK_PROBE_TORCH": "1"} if probe_torch else {}
    t0 = time.perf_counter()
    res = run("--out", "/nonexistent/never-created", timeout=60, env=env)
    elapsed = time.perf_counter() - t0
    assert res.returncode == gpu_check.EXIT_NO_CUDA
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA device" in res.stderr
    assert elapsed < (30 if probe_torch else 10)  # the torch probe imports torch on a loaded 2-core box
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="this machine has a GPU")
def test_no_cuda_check_does_not_import_megatron():
    code = (
        "import sys; sys.path.insert(0, 'bench'); import gpu_check; rc = gpu_check.main([]); "
        "print(rc, any(m.split('.')[0] in ('megatron', 'xtoken_nemo') for m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, XTOKEN_GPU_CHECK_PROBE_TORCH="1"),
    )
    assert res.stdout.split() == [str(gpu_check.EXIT_NO_CUDA), "False"], res.stderr


def _wheel(folder: Path, name: str = "xtoken_gpu_probe", version: str = "0.0.1") -> Path:
    """A minimal pure-Python wheel holding one module."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in files) + f"{info}/RECORD,,\n")
    return path


def test_missing_or_empty_wheels_folder_is_a_one_line_error(tmp_path):
    res = run("--allow-cpu", "--wheels", str(tmp_path / "absent"), timeout=60)
    assert res.returncode == gpu_check.EXIT_WHEELS
    assert (
        len(res.stderr.strip().splitlines()) == 1 and "no such folder" in res.stderr and "gpu_wheels.sh" in res.stderr
    )
    res = run("--allow-cpu", "--wheels", str(tmp_path), timeout=60)
    assert res.returncode == gpu_check.EXIT_WHEELS and "holds no .whl" in res.stderr


def test_a_broken_wheel_is_a_one_line_error(tmp_path):
    (tmp_path / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    res = run(
        "--allow-cpu", "--wheels", str(tmp_path), timeout=120, env={"XTOKEN_GPU_CHECK_SITE": str(tmp_path / "site")}
    )
    assert res.returncode == gpu_check.EXIT_WHEELS
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("gpu_check: pip install")


def test_wheels_are_installed_and_importable_and_reported(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp_path / "out"
    res = run(
        "--allow-cpu",
        "--env-only",
        "--wheels",
        str(wheels),
        "--out",
        str(out),
        timeout=120,
        env={"XTOKEN_GPU_CHECK_SITE": str(tmp_path / "site")},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json_of(res.stdout)
    env = data["env"]
    assert env["wheels_installed"] == ["xtoken_gpu_probe==0.0.1"]
    assert env["wheels_site"] == str(tmp_path / "site")
    assert (tmp_path / "site" / "xtoken_gpu_probe.py").is_file()
    assert {c["name"] for c in data["checks"]} == {"env.packages_present"}
    # the output files hold the same report
    assert json.loads((out / "gpu_check.json").read_text()) == data
    log = (out / "gpu_check.log").read_text()
    assert "[gpu_check] ENV" in log and log.rstrip().splitlines()[-1].startswith(gpu_check.JSON_PREFIX)


def test_parts_that_do_not_fit_the_budget_are_skipped(tmp_path):
    res = run("--allow-cpu", "--tiny", "--budget-s", "1", "--out", str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json_of(res.stdout)
    assert [s["name"] for s in data["skipped"]] == list(gpu_check.PARTS)
    assert all(s["why"] == "budget" for s in data["skipped"])
    assert "SKIPPED (budget) paper_pkl" in res.stdout


def test_report_records_prints_and_writes(tmp_path):
    lines = []
    rep = gpu_check.Report(str(tmp_path), echo=lines.append)
    rep.check("a.pass", True, 1e-7, 1e-5, "fine")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        rep.error("b.raises", exc)
    rep.measure("m.tokens_per_s", 1234.5, "tokens/s")
    rep.aim("m.aim", 0.2, "<= 0.15", False)
    rep.skip("c", "budget")
    data = rep.summary()
    rep.close()
    assert (data["passed"], data["failed"]) == (1, 1)
    assert data["checks"][1]["status"] == "FAIL" and "ValueError: boom" in data["checks"][1]["traceback"]
    assert lines[0] == "[gpu_check] PASS a.pass max_err=1e-07 (tol 1e-05) fine"
    assert any(ln.startswith("[gpu_check] AIM m.aim: 0.2 (aim <= 0.15) -> MISSED") for ln in lines)
    assert "[gpu_check] SKIPPED (budget) c" in lines
    line = gpu_check.json_line(data)
    assert line.startswith("GPU_CHECK_JSON {") and "\n" not in line
    assert json.loads(line[len("GPU_CHECK_JSON ") :])["measurements"]["m.tokens_per_s"] == 1234.5
    assert json.loads((tmp_path / "gpu_check.json").read_text())["aims"][0]["met"] is False


@pytest.mark.slow
def test_tiny_cpu_run_of_part1_and_a_paper_step(tmp_path):
    """The same code paths as the GPU run (real tokenizers and W, the real Trainer, taps and
    wrappers, checkpoint round trip, CPU-written checkpoint) at tiny shapes on CPU."""
    out = tmp_path / "out"
    res = run(
        "--allow-cpu",
        "--tiny",
        "--parts",
        "correct,paper_pkl",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        timeout=600,
    )
    data = json_of(res.stdout)
    failed = [c for c in data["checks"] if c["status"] != "PASS"]
    assert res.returncode == 0 and not failed, json.dumps(failed, indent=1)[-4000:]
    names = {c["name"] for c in data["checks"]}
    for name in (
        "losses.pkl.float32",
        "losses.pkl_prepared_on_cpu.bfloat16",
        "losses.gold.bfloat16",
        "losses.hkl.float32",
        "losses.uld.float32",
        "losses.merge_chain.float32",
        "train.float32_step_pkl_plus_kl",
        "train.teachers_frozen",
        "ckpt.load_weights_exact",
        "ckpt.exact_resume_steps_3_4",
        "convert.load_on_cpu.float32",
        "paper_pkl.steps_finite",
    ):
        assert name in names, name
    m = data["measurements"]
    assert m["paper_pkl.tokens_per_s"] > 0
    share = m["paper_pkl.split_share"]
    assert set(share) == {"student_fwd_bwd", "teacher_forward", "kd_loss_fwd_bwd", "optimizer", "ce_forward", "other"}
    assert share["kd_loss_fwd_bwd"] > 0 and share["teacher_forward"] > 0 and share["optimizer"] > 0
    assert 0.9 < sum(share.values()) < 1.1
    assert {a["name"] for a in data["aims"]} == {"paper_pkl.kd_loss_share", "paper_pkl.tokens_per_s"}
    assert json.loads((out / "gpu_check.json").read_text()) == data
