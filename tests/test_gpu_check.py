"""bench/gpu_check.sh, the parts a CPU machine can check: arguments, the no-CUDA exit, --wheels,
the report (JSON line, output files), the time boxes (process groups, TIMEOUT, the hard limit's
partial results), the budget table, the environment's import check (psutil), the fusions kept
out of the timed parts, and a tiny CPU run of the same code paths (``--allow-cpu --tiny``) that
the one GPU call will run at paper shapes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
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
        timeout=300,
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
        timeout=2400,
    )
    data = json_of(res.stdout)
    failed = [c for c in data["checks"] if c["status"] != "PASS"]
    walls = {k: v for k, v in data["measurements"].items() if k.startswith("part.") or k == "setup_s"}
    assert res.returncode == 0 and not failed and not data["timeouts"], json.dumps(
        {"failed": failed, "timeouts": data["timeouts"], "walls": walls}, indent=1
    )[-4000:]
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
        "ckpt.same_weights_at_start",
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
    # the core attention is timed inside the student and teacher parts (hooks on core_attention)
    split = m["paper_pkl.split_s"]
    assert 0 < split["attention_student_s"] < split["student_forward_s"] + split["student_backward_s"]
    assert 0 < split["attention_teachers_s"] < split["teacher_forward_s"]
    assert m["paper_pkl.kd_loss_share"] < [a for a in data["aims"] if a["name"].endswith("excl_attention")][0]["value"]
    assert {a["name"] for a in data["aims"]} == {"paper_pkl.kd_loss_share_excl_attention", "paper_pkl.tokens_per_s"}
    assert json.loads((out / "gpu_check.json").read_text()) == data


# ----------------------------------------------------------------------------------------------
# time boxes: process groups, TIMEOUT, the hard limit's partial results (issue 21, finding 1)
# ----------------------------------------------------------------------------------------------
def _part_like(tmp_path: Path, then: str) -> list[str]:
    """A part-like child: starts a grandchild (``sleep 300``) that inherits its stdout, writes the
    grandchild's pid, prints a report line, then ``then`` ("exit": exits 0; "hang": sleeps)."""
    script = tmp_path / "part_like.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys, time
            grandchild = subprocess.Popen(["sleep", "300"])  # inherits stdout: holds the pipe
            open({str(tmp_path / "grandchild.pid")!r}, "w").write(str(grandchild.pid))
            print("[gpu_check] PASS part_like.started", flush=True)
            if {then!r} == "hang":
                time.sleep(300)
            """
        )
    )
    return [sys.executable, str(script)]


def _gone(pid: int) -> bool:
    """The process is dead (absent, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return _gone(pid)


def test_a_grandchild_holding_the_pipe_does_not_block_a_finished_part(tmp_path):
    lines: list[str] = []
    t0 = time.monotonic()
    outcome = gpu_check.run_boxed(_part_like(tmp_path, "exit"), 200, lines.append)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"the reader waited for the grandchild ({elapsed:.0f} s of its 300)"
    assert outcome.rc == 0 and not outcome.timed_out
    assert lines == ["[gpu_check] PASS part_like.started"]
    assert _wait_gone(int((tmp_path / "grandchild.pid").read_text())), "the part's group was not killed"


def test_a_hanging_part_is_killed_with_its_group_at_its_time_box(tmp_path):
    lines: list[str] = []
    t0 = time.monotonic()
    # a box long enough for the child to start on a loaded machine, far shorter than its sleeps
    outcome = gpu_check.run_boxed(_part_like(tmp_path, "hang"), 15, lines.append)
    elapsed = time.monotonic() - t0
    assert outcome.timed_out and outcome.rc == -9
    assert 15 <= elapsed < 45, elapsed
    assert lines == ["[gpu_check] PASS part_like.started"]
    assert _wait_gone(int((tmp_path / "grandchild.pid").read_text()))


def test_a_timed_out_part_is_a_timeout_not_a_fail_and_keeps_its_results(tmp_path):
    # the part recorded two checks before it hung: its result file has them
    result = tmp_path / "result_correct.json"
    child = gpu_check.Report(result_file=str(result), echo=lambda line: None)
    child.check("losses.kl.float32", True, 1e-7, 1e-4)
    child.check("losses.pkl.float32", True, 2e-7, 1e-4)
    lines: list[str] = []
    report = gpu_check.Report(str(tmp_path / "out"), echo=lines.append)
    report.check("env.packages_present", True)
    outcome = gpu_check.run_boxed(_part_like(tmp_path, "hang"), 3, lambda line: None)
    gpu_check.record_part(report, "correct", outcome, 3, result)
    data = report.summary()
    assert (data["passed"], data["failed"], data["timed_out"]) == (3, 0, 1)
    assert data["timeouts"][0]["name"] == "correct" and "time box of 3 s" in data["timeouts"][0]["detail"]
    assert gpu_check.exit_code(data) == gpu_check.EXIT_TIMEOUT
    assert report.summary_line().startswith("3 passed, 0 failed, 1 timed out")
    assert any(line.startswith("[gpu_check] TIMEOUT correct stopped by its time box") for line in lines)
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["timeouts"] == data["timeouts"]


def test_the_hard_limit_merges_the_running_part_and_kills_its_group(tmp_path):
    """A parent whose part is still running when the hard limit strikes: the JSON holds the
    part's checks (its result file is rewritten after each), counts them, calls the part a
    TIMEOUT, and the part's process group is killed; exit 5."""
    code = textwrap.dedent(
        f"""
        import subprocess, sys
        sys.path.insert(0, {str(REPO / "bench")!r})
        import gpu_check
        from pathlib import Path
        work = Path({str(tmp_path)!r})
        report = gpu_check.Report(str(work / "out"))
        report.check("env.packages_present", True)
        child = gpu_check.Report(result_file=str(work / "result_correct.json"), echo=lambda line: None)
        for i in range(24):
            child.check(f"losses.case{{i}}", True)
        child.check("ckpt.save", False, detail="broken")
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        part = subprocess.Popen(["sleep", "300"], start_new_session=True, **quiet)
        (work / "part.pid").write_text(str(part.pid))
        report.running = gpu_check.RunningPart("correct", work / "result_correct.json", part.pid)
        gpu_check._hard_exit(report)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == gpu_check.EXIT_HARD_LIMIT, res.stderr[-2000:]
    data = json_of(res.stdout)
    assert (data["passed"], data["failed"], data["timed_out"]) == (25, 1, 1)
    assert data["hard_limit"] is True and data["timeouts"][0]["name"] == "correct"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == data
    assert "25 passed, 1 failed, 1 timed out" in res.stdout
    assert _wait_gone(int((tmp_path / "part.pid").read_text()))


def test_report_file_is_rewritten_after_every_check(tmp_path):
    result = tmp_path / "result.json"
    rep = gpu_check.Report(result_file=str(result), echo=lambda line: None)
    for i in range(3):
        rep.check(f"c{i}", True)
        assert [c["name"] for c in json.loads(result.read_text())["checks"]] == [f"c{j}" for j in range(i + 1)]


# ----------------------------------------------------------------------------------------------
# the environment and psutil (finding 1b)
# ----------------------------------------------------------------------------------------------
def _without_psutil(tmp_path: Path) -> dict:
    """An environment whose Python cannot import psutil (its metadata stays installed)."""
    site = tmp_path / "no_psutil"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['psutil'] = None\n")
    return {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_env_step_fails_clearly_when_psutil_cannot_be_imported(tmp_path):
    res = run("--allow-cpu", "--env-only", "--out", str(tmp_path), timeout=300, env=_without_psutil(tmp_path))
    assert res.returncode == gpu_check.EXIT_FAILED, res.stdout[-3000:] + res.stderr[-2000:]
    data = json_of(res.stdout)
    assert data["env"]["pkg:psutil"] is not None, "the metadata is there; only the import fails"
    (check,) = data["checks"]
    assert check["name"] == "env.packages_present" and check["status"] == "FAIL"
    fail_line = [ln for ln in res.stdout.splitlines() if ln.startswith("[gpu_check] FAIL env.packages_present")]
    assert len(fail_line) == 1
    assert "psutil" in fail_line[0] and "checkpoint" in fail_line[0] and "wheel" in fail_line[0]
    assert "megatron-core" not in check["detail"].split(". Carry")[0], "only the missing package is named"


def test_checkpoint_subchecks_fail_or_skip_without_psutil_instead_of_hanging(tmp_path):
    code = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(REPO / "bench")!r})
        import gpu_check, gpu_check_correct
        from pathlib import Path
        report = gpu_check.Report(echo=lambda line: None)
        gpu_check_correct.check_resume(report, {{}}, Path({str(tmp_path)!r}), {{}})
        deadline = time.time() + 60
        helper = gpu_check_correct.start_cpu_checkpoint(Path({str(tmp_path)!r}), deadline)
        gpu_check_correct.check_cpu_checkpoint_on_cuda(report, Path({str(tmp_path)!r}), deadline, helper)
        print("helper", helper)
        print(json.dumps(report.summary()))
        """
    )
    env = dict(os.environ, **_without_psutil(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert "helper None" in res.stdout, "no CPU checkpoint process is started without psutil"
    (check,) = data["checks"]
    assert check["name"] == "ckpt.save" and check["status"] == "FAIL"
    assert "psutil cannot be imported" in check["detail"] and "wheel" in check["detail"]
    assert [s["name"] for s in data["skipped"]] == ["ckpt.load_and_resume", "convert"]
    assert all("psutil" in s["why"] for s in data["skipped"])


# ----------------------------------------------------------------------------------------------
# the budget table (finding 2)
# ----------------------------------------------------------------------------------------------
def test_the_budget_table_adds_up():
    g = gpu_check
    assert set(g.PART_CAP_S) == set(g.PARTS) == set(g.MIN_START_S)
    # a run where every part uses its whole cap still ends inside the budget
    assert g.SETUP_ALLOWANCE_S + sum(g.PART_CAP_S.values()) <= g.DEFAULT_BUDGET_S
    assert all(g.MIN_START_S[p] <= g.PART_CAP_S[p] for p in g.PARTS)
    # the whole device call: wheel install + budget + the hard stop's margin inside its timeout
    assert g.WHEEL_INSTALL_S + g.DEFAULT_BUDGET_S + g.HARD_MARGIN_S <= g.RUN_TIMEOUT_S
    # a machine start + the call, twice (the run and one rerun), inside the device time
    assert 2 * (g.MACHINE_START_S + g.RUN_TIMEOUT_S) <= g.DEVICE_TIME_S
    assert g.RUN_TIMEOUT_S <= 6 * 60


def test_the_emulated_environment_waits_longer_than_the_tiny_check_s_own_hard_stop():
    """bench/gpu_env_check.sh's default --timeout-s is a safety net: it must not kill a --tiny
    check that its own hard stop (budget + margin, times TINY_MULT) would still let finish. It did:
    3,600 s against a 6,600 s hard stop after TINY_MULT went from 10 to 20."""
    g = gpu_check
    text = (REPO / "bench" / "gpu_env_check.sh").read_text()
    default = int(re.search(r"\bTIMEOUT_S=(\d+)", text).group(1))
    hard_stop = (g.DEFAULT_BUDGET_S + g.HARD_MARGIN_S) * g.time_scale(tiny=True)
    assert default > hard_stop
    assert f"{hard_stop:,.0f} s under --tiny" in text  # the help text says the same number


def test_the_tiny_multiplier_scales_every_figure_alike():
    g = gpu_check
    tiny = g.parse_args(["--allow-cpu", "--tiny"])
    assert tiny.budget_s == g.DEFAULT_BUDGET_S * g.TINY_MULT
    assert g.parse_args([]).budget_s == g.DEFAULT_BUDGET_S
    for part in g.PARTS:
        assert g.part_cap_s(part, True) == g.PART_CAP_S[part] * g.TINY_MULT
        assert g.part_cap_s(part, False) == g.PART_CAP_S[part]
    assert (g.SETUP_ALLOWANCE_S + sum(g.PART_CAP_S.values())) * g.time_scale(True) <= tiny.budget_s


def test_the_docs_state_the_budget_table():
    """docs/gpu_check.md's budget table names every part with its cap, and the call's timeout."""
    doc = (REPO / "docs" / "gpu_check.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+) s \|", doc, flags=re.M))
    assert {p: int(v) for p, v in rows.items()} == {p: int(c) for p, c in gpu_check.PART_CAP_S.items()}
    assert re.search(rf"^\| \(parent\) set-up \| {gpu_check.SETUP_ALLOWANCE_S:.0f} s \|", doc, flags=re.M)
    assert f"timeout_s: {gpu_check.RUN_TIMEOUT_S}" in doc
    assert f"budget is {gpu_check.DEFAULT_BUDGET_S:.0f} s" in doc


# ----------------------------------------------------------------------------------------------
# fusions (finding 3)
# ----------------------------------------------------------------------------------------------
def test_every_timed_part_builds_its_models_unfused(tmp_path):
    import gpu_check_correct
    import gpu_check_paper

    prep = {"W_qwen3": "W_q", "W_phi4mini": "W_p", "data_paper": "d", "data_small": "d", "small_seq": 64}
    configs = [gpu_check_paper.distill_config(k, prep, tmp_path, True, 3) for k in ("paper_pkl", "paper_hkl", "three")]
    configs += [gpu_check_paper.distill_config("paper_ce", prep, tmp_path, True, 3)]
    configs += [gpu_check_correct._tiny_cfg(prep, tmp_path, 4)]
    for cfg in configs:
        requested = cfg.parallel.kernel_options()
        assert not any(getattr(requested, f) for f in type(requested).__dataclass_fields__), cfg.name
    assert "fused" in gpu_check.PARTS and "fused" in gpu_check.PART_CAP_S


@pytest.mark.slow
def test_the_fused_part_runs_on_cpu_and_says_what_it_compared(tmp_path):
    """On CPU no fusion can run (resolve_kernel_options turns them off: no CUDA): the part still
    builds both models through the trainer's path and says that the comparison was trivial."""
    (tmp_path / "prep.json").write_text("{}")
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--child", "fused", "--allow-cpu", "--tiny"]
        + ["--work", str(tmp_path), "--result", str(tmp_path / "result.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "result.json").read_text())
    (check,) = data["checks"]
    assert check["name"] == "fused.float32.loss_and_grads_vs_unfused" and check["status"] == "PASS", check
    assert "no fused kernel can run here" in check["detail"]
    assert data["measurements"]["fused.float32.kernels_on"] == "none"
