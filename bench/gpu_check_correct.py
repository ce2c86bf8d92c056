"""Part 1 of the GPU check: correctness on CUDA. Every sub-check prints PASS/FAIL with its max
error and never stops the run (a sub-check that raises is a FAIL with its traceback's tail).

- losses: KL, P-KL (W's sparse CSR product on CUDA; W given as is and as a CPU-prepared
  LocalProjection, as the trainer does), GOLD, H-KL, ULD, the chunk merges and the chain log-mass,
  on CUDA in fp32 and bf16, against the plain-PyTorch reference on CPU in fp64 (values and grads)
- a bf16 training step of a tiny student (real Llama-3.2 tokenizer) with one P-KL teacher (Qwen3
  tokenizer, head_dim != hidden/heads, untied) and one same-tokenizer KL teacher through ``Trainer``
- checkpoint save, load (bit-exact weights) and resume (steps 3-4 of a run saved at step 2 equal
  those of a straight run) on CUDA
- a random checkpoint written on CPU (a process with ``CUDA_VISIBLE_DEVICES=""``) loaded on CUDA:
  logits equal the CPU load's
- part ``fused`` (:func:`run_fused`): a tiny model with megatron's torch.compile'd fusions, as
  the library builds it by default, against the same weights unfused

Every model here is built with the fused kernels off (``unfused_parallel``) except in ``fused``:
megatron's fusions are torch.compile'd, and their compilation would land inside each part's time
box. A checkpoint is written only when psutil imports (:func:`checkpoint_writer_problem`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from gpu_check import run_boxed
from gpu_check_paper import model_config, shapes, sync, unfused_parallel

N, VS, VT = 48, 1000, 1300
VS_PAD, VT_PAD = 1024, 1408


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def _case(seed: int = 0) -> dict:
    from xtoken_nemo.vocab import ProjectionMatrix

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, VS_PAD, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, VT_PAD, generator=g, dtype=torch.float64) * 2
    t_same = torch.randn(N, VS_PAD, generator=g, dtype=torch.float64) * 2
    s[:, VS:] = 50.0  # padded columns: garbage that must be masked
    t[:, VT:] = 50.0
    t_same[:, VS:] = 50.0
    idx = torch.full((VS, 4), -1, dtype=torch.int64)
    val = torch.zeros(VS, 4)
    for r in range(VS):
        k = r % 5
        if k:
            idx[r, :k] = torch.randperm(VT, generator=g)[:k]
            v = torch.rand(k, generator=g) + 0.05
            val[r, :k] = v / v.sum()
    W = ProjectionMatrix(idx, val, VT)
    seen, pairs = set(), []
    for r in range(VS):
        if r % 5 == 1 and int(idx[r, 0]) not in seen:
            seen.add(int(idx[r, 0]))
            pairs.append((r, int(idx[r, 0])))
    weights = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    sizes, chunks, pos = [1, 2, 3], [], 0
    while pos < N:
        k = min(sizes[len(chunks) % 3], N - pos)
        chunks.append(list(range(pos, pos + k)))
        pos += k
    targets = torch.randint(0, VS, (N,), generator=g)
    return {
        "s": s,
        "t": t,
        "t_same": t_same,
        "W": W,
        "pairs": torch.tensor(pairs, dtype=torch.int64),
        "weights": weights,
        "chunks": chunks,
        "targets": targets,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def check_losses(report) -> None:
    from xtoken_nemo import losses as P
    from xtoken_nemo.losses import reference as R

    c = _case()
    dev = _device()
    proj = P.prepare_projection(c["W"], VS_PAD, VT_PAD)  # on CPU, as Trainer._build does
    rounded = {}  # the teacher logits exactly as the device sees them, for the reference

    def t_real():
        return rounded["t"][:, :VT]

    def ts_real():
        return rounded["ts"][:, :VS]

    cases = {
        "kl": (
            lambda s, t, ts: P.kl_loss_parallel(s, ts, VS, reduction="none", block_size=16),
            lambda x: R.kl_loss(x, ts_real(), reduction="none"),
        ),
        "pkl": (
            lambda s, t, ts: P.pkl_loss_parallel(s, t, c["W"], VS, VT, reduction="none", block_size=16),
            lambda x: R.pkl_loss(x, t_real(), c["W"], reduction="none"),
        ),
        "pkl_prepared_on_cpu": (
            lambda s, t, ts: P.pkl_loss_parallel(s, t, proj, VS, VT, reduction="none", block_size=16),
            lambda x: R.pkl_loss(x, t_real(), c["W"], reduction="none"),
        ),
        "gold": (
            lambda s, t, ts: P.gold_loss_parallel(s, t, c["pairs"], VS, VT, reduction="none", block_size=16),
            lambda x: R.gold_loss(x, t_real(), c["pairs"], reduction="none"),
        ),
        "hkl": (
            lambda s, t, ts: P.hkl_loss_parallel(s, t, c["W"], VS, VT, reduction="none", block_size=16),
            lambda x: R.hkl_loss(x, t_real(), c["W"], reduction="none"),
        ),
        "uld": (
            lambda s, t, ts: P.uld_loss_parallel(s, t, VS, VT, reduction="none", block_size=16),
            lambda x: R.uld_loss(x, t_real(), reduction="none"),
        ),
    }
    for dtype, tol_val, tol_grad in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-3, 2e-2)):
        dname = str(dtype).split(".")[-1]
        # the reference sees exactly the inputs the device sees (rounded to dtype), in fp64
        s_in, t_in, ts_in = (x.to(dtype) for x in (c["s"], c["t"], c["t_same"]))
        rounded.update(t=t_in.double(), ts=ts_in.double())
        for name, (par, ref) in cases.items():
            try:
                x = s_in.double().clone().requires_grad_(True)
                r = ref(x[:, :VS])
                (r * c["weights"]).sum().backward()
                s_dev = s_in.to(dev).detach().clone().requires_grad_(True)
                out = par(s_dev, t_in.to(dev), ts_in.to(dev))
                (out * c["weights"].to(dev, out.dtype)).sum().backward()
                on_dev = out.device.type == dev and s_dev.grad.device.type == dev
                err_v, err_g = _rel(out, r), _rel(s_dev.grad, x.grad)
                how = ""
                if dtype == torch.bfloat16 and name in ("gold", "uld"):
                    # bf16 probabilities tie; the sorted-L1 (ULD) term then gives the gradient to
                    # either of two tied entries: compare what ties cannot change (per-row sum, norm)
                    g, gr = s_dev.grad.double().cpu(), x.grad
                    err_sum = float((g.sum(1) - gr.sum(1)).abs().max() / gr.abs().max().clamp_min(1e-12))
                    err_g = max(err_sum, _rel(g.norm(dim=1), gr.norm(dim=1)))
                    how = " (grad per-row sum/norm: bf16 ties in the sort)"
                report.check(
                    f"losses.{name}.{dname}",
                    on_dev and err_v <= tol_val and err_g <= tol_grad,
                    max(err_v, err_g),
                    max(tol_val, tol_grad),
                    f"value {err_v:.2g} grad {err_g:.2g} on {out.device.type}{how}",
                )
            except Exception as exc:  # noqa: BLE001
                report.error(f"losses.{name}.{dname}", exc)
        # chunk merges (per-position logits) and the chain log-mass
        cols = torch.arange(VS_PAD)
        col_w = torch.where(cols < VS, cols.double().sin(), torch.zeros((), dtype=torch.float64))
        for mode in R.MERGE_MODES:
            try:
                x = s_in.double().clone().requires_grad_(True)
                m = R.merge_chunks(x[:, :VS], c["chunks"], c["targets"], mode=mode)
                ((m.logits * col_w[:VS]).sum() + (m.log_mass * c["weights"][: m.log_mass.shape[0]]).sum()).backward()
                s_dev = s_in.to(dev).detach().clone().requires_grad_(True)
                mp = P.merge_chunks_parallel(s_dev, c["chunks"], VS, c["targets"].to(dev), mode=mode)
                obj = (mp.logits.float() * col_w.to(dev, torch.float32)).sum() + (
                    mp.log_mass.float() * c["weights"][: mp.log_mass.shape[0]].to(dev, torch.float32)
                ).sum()
                obj.backward()
                err_l = _rel(mp.logits[:, :VS], m.logits)
                err_m = _rel(mp.log_mass, m.log_mass)
                err_g = _rel(s_dev.grad, x.grad)
                err = max(err_l, err_m, err_g)
                report.check(
                    f"losses.merge_{mode}.{dname}",
                    err <= max(tol_val, tol_grad) * 5,
                    err,
                    max(tol_val, tol_grad) * 5,
                    f"logits {err_l:.2g} log_mass {err_m:.2g} grad {err_g:.2g}",
                )
            except Exception as exc:  # noqa: BLE001
                report.error(f"losses.merge_{mode}.{dname}", exc)
        try:
            ref_mass = R.merge_chunks(s_in.double()[:, :VS], c["chunks"], c["targets"], mode="chain").log_mass
            mass = P.chunk_log_mass_parallel(
                s_in.to(dev), [range(ch[0], ch[-1] + 1) for ch in c["chunks"]], VS, c["targets"].to(dev)
            )
            err = _rel(mass, ref_mass)
            report.check(f"losses.chain_log_mass.{dname}", err <= tol_grad, err, tol_grad)
        except Exception as exc:  # noqa: BLE001
            report.error(f"losses.chain_log_mass.{dname}", exc)


# ----------------------------------------------------------------------------------------------
# trainer: one bf16 step, save/load/resume
# ----------------------------------------------------------------------------------------------
def _tiny_cfg(prep: dict, run_dir: Path, steps: int):
    from xtoken_nemo.distill.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        OptimConfig,
        TeacherConfig,
        TrainConfig,
    )

    # every model of the straight and the resumed runs is built by the trainer's own path
    # (model_setup.build_model) with these init seeds: same seeds, same weights at start
    m = shapes(True)["models"]  # tiny shapes, real tokenizers (real vocabularies)
    return DistillConfig(
        name="gpu-check-correct",
        student=model_config(m["student"]),
        teachers=[
            TeacherConfig(
                name="qwen3", model=model_config(m["qwen3"]), mode="pkl", alpha=0.7, projection=prep["W_qwen3"]
            ),
            TeacherConfig(name="llama3", model=model_config(m["llama3b"]), mode="kl", alpha=0.3),
        ],
        data=DataConfig(paths=[prep["data_small"]], seq_length=prep["small_seq"]),
        optim=OptimConfig(lr=1e-3, warmup_fraction=0.0),  # step 1 must move the weights (lr 0 at a warm-up start)
        train=TrainConfig(
            train_steps=steps,
            global_batch_size=2,
            micro_batch_size=1,
            precision="bf16" if torch.cuda.is_available() else "auto",
            loss_block_size=32,
        ),
        checkpoint=CheckpointConfig(dir=str(run_dir / "ckpt"), save_interval=10**9, resume=True),
        parallel=unfused_parallel(),
        log_dir=str(run_dir / "logs"),
    )


def _snapshot(module) -> dict:
    return {
        k: v.detach().float().cpu().clone()
        for k, v in module.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max((float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0) for k in a)


def _models_snapshot(trainer) -> dict:
    """{model: its weights} of the student and every teacher of ``trainer``, on CPU."""
    out = {"student": _snapshot(trainer.student)}
    for spec, teacher in zip(trainer.teacher_specs, trainer.teachers):
        out[f"teacher {spec.config.name}"] = _snapshot(teacher)
    return out


def checkpoint_writer_problem() -> str | None:
    """Why no checkpoint can be written in this process, or None.

    megatron-core 0.16.1 writes every checkpoint (sync or async) through
    ``FileSystemWriterAsync.write_preloaded_data_multiproc``: forked writer processes that call
    ``_process_memory()`` (psutil) before their try block. Without psutil each one raises there,
    never marks its task done, ``count_queue.join()`` waits forever and the part hangs until its
    time box (seen in the GPU-machine emulation). So: no psutil, no save.
    """
    try:
        import psutil  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (
            f"psutil cannot be imported ({type(exc).__name__}: {exc}); megatron's checkpoint writer calls it in "
            "every writer process (dist_checkpointing/strategies/filesystem_async.py, _process_memory) and the "
            "save would hang; carry psutil as a wheel in the --wheels folder"
        )
    return None


def check_train_step(report, prep: dict, work: Path, keep: dict) -> None:
    from xtoken_nemo.distill.trainer import Trainer

    cfg = _tiny_cfg(prep, work / "straight", steps=4)
    trainer = Trainer(cfg, progress=False)
    dev = _device()
    p = next(trainer.student.parameters())
    want = torch.bfloat16 if dev == "cuda" else torch.float32
    report.check("train.student_on_device", p.device.type == dev and p.dtype == want, detail=f"{p.device} {p.dtype}")
    start = _models_snapshot(trainer)
    sync()
    t0 = time.perf_counter()
    metrics = trainer.train_step(0)
    trainer.state.step += 1
    sync()
    dt = time.perf_counter() - t0
    keys = ("total", "ce", "kd", "grad_norm", "kd/qwen3", "kd/llama3")
    vals = {k: metrics.get(k) for k in keys}
    finite = all(v is not None and math.isfinite(v) for v in vals.values()) and metrics.get("skipped") == 0.0
    report.check(
        f"train.{str(want).split('.')[-1]}_step_pkl_plus_kl",
        finite,
        detail=f"{dt:.2f} s " + json.dumps({k: None if v is None else round(v, 5) for k, v in vals.items()}),
    )
    after = _models_snapshot(trainer)
    moved = _max_diff(start["student"], after["student"])
    report.check("train.student_updated", 0 < moved < math.inf, moved, detail="max |delta weight| after one step")
    frozen = max(_max_diff(start[k], after[k]) for k in start if k != "student")
    report.check("train.teachers_frozen", frozen == 0.0, frozen, 0.0)
    if torch.cuda.is_available():
        report.measure("train.tiny_peak_allocated_gib", round(torch.cuda.max_memory_allocated() / 2**30, 3), "GiB")
    # the straight run of the resume check goes on from here; its weights at start are kept
    keep.update(trainer=trainer, first=metrics, start=start)


def _start_weights_diff(a: dict, b: dict) -> dict[str, float]:
    """{model: max |a - b|} over the models of two runs' weights at start."""
    return {k: (_max_diff(a[k], b[k]) if k in b else math.inf) for k in a}


def check_resume(report, prep: dict, work: Path, keep: dict) -> None:
    """Straight 4 steps vs 2 steps + save + a new Trainer that resumes and runs steps 3-4.

    Both runs build every model through the trainer's own path with the same init seeds, so their
    weights at start are compared first (bitwise): on CUDA megatron draws random weights from its
    CUDA RNG tracker, which ``torch.manual_seed`` does not reset, and different weights at start
    would fail the resume comparison for a reason that has nothing to do with resuming."""
    from xtoken_nemo.distill.trainer import Trainer

    problem = checkpoint_writer_problem()
    if problem is not None:
        report.check("ckpt.save", False, detail=problem)
        report.skip("ckpt.load_and_resume", "no checkpoint written: psutil missing")
        return

    def steps(trainer, upto: int) -> list[dict]:
        out = []
        while trainer.state.step < upto:
            metrics = trainer.train_step(trainer.state.step)
            trainer.state.step += 1
            out.append(metrics)
        return out

    if keep.get("trainer") is not None:  # the train check's trainer, one step in
        straight_start = keep["start"]
        straight = [keep["first"]] + steps(keep.pop("trainer"), 4)
    else:
        trainer = Trainer(_tiny_cfg(prep, work / "straight", 4), progress=False)
        straight_start = _models_snapshot(trainer)
        straight = steps(trainer, 4)
    first = Trainer(_tiny_cfg(prep, work / "resumed", 4), progress=False)
    start_diff = _start_weights_diff(straight_start, _models_snapshot(first))
    start_differs = {k: v for k, v in start_diff.items() if v != 0.0}
    report.check(
        "ckpt.same_weights_at_start",
        not start_differs,
        max(start_diff.values()),
        0.0,
        "straight and resumed runs, same init seeds: "
        + (f"differ in {start_differs}" if start_differs else f"bitwise equal ({len(start_diff)} models)"),
    )
    steps(first, 2)
    saved = _snapshot(first.student)
    path = first.save()
    report.check("ckpt.save", Path(path).is_dir(), detail=str(path))
    del first
    second = Trainer(_tiny_cfg(prep, work / "resumed", 4), progress=False)
    resumed = second.resume()
    diff = _max_diff(saved, _snapshot(second.student))
    report.check(
        "ckpt.load_weights_exact",
        resumed and second.state.step == 2 and diff == 0.0,
        diff,
        0.0,
        f"resumed={resumed} at step {second.state.step}",
    )
    after = steps(second, 4)
    worst, bitwise = 0.0, True
    for key in ("total", "ce", "kd", "grad_norm", "lr"):
        for a, b in zip(after, straight[2:]):
            if a.get(key) != b.get(key):
                bitwise = False
            if a.get(key) is not None and b.get(key) is not None:
                worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-12))
    ok = len(after) == 2 and worst <= 1e-3 and not start_differs
    if start_differs:
        which = f"the weights at start differ ({', '.join(start_differs)}): the two builds were not seeded alike"
    elif not ok:
        which = f"the weights at start are equal; steps 3-4 differ (rel. {worst:.3g})"
    else:
        which = "weights at start equal, steps 3-4 within tolerance"
    report.check(
        "ckpt.exact_resume_steps_3_4",
        ok,
        worst,
        1e-3,
        f"{which}; bitwise equal: {bitwise} (total {[round(m['total'], 6) for m in after]} "
        f"vs {[round(m['total'], 6) for m in straight[2:]]})",
    )
    report.measure("ckpt.resume_bitwise_equal", bitwise)


# ----------------------------------------------------------------------------------------------
# a checkpoint written on CPU, loaded on CUDA
# ----------------------------------------------------------------------------------------------
def _convert_mc():
    return model_config(shapes(True)["models"]["qwen3"])  # head_dim != hidden/heads, untied


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def cpu_checkpoint_child(work: Path) -> None:
    """In a process without CUDA: write a random checkpoint and the CPU load's logits."""
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.models.build import forward_logits
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel
    from xtoken_nemo.tokenizers import load_tokenizer

    assert not torch.cuda.is_available(), "the CPU checkpoint must be written without CUDA"
    ensure_model_parallel(1)
    out = work / "convert"
    vocab = load_tokenizer("qwen3").vocab_size
    save_random_checkpoint(_convert_mc(), vocab, str(out / "ckpt"))
    model, arch, _ = load_mcore_checkpoint(str(out / "ckpt"), params_dtype=torch.float32)
    with torch.no_grad():
        logits = forward_logits(model, _ids(vocab), arch)
    torch.save({"logits": logits[..., :vocab].float(), "vocab": vocab}, out / "cpu_logits.pt")
    print("[cpu_ckpt] wrote", out, flush=True)


class CpuCheckpointRun:
    """The helper process that writes the random checkpoint on CPU (``CUDA_VISIBLE_DEVICES=""``),
    started when part ``correct`` starts so that it runs on the CPU while the part uses the GPU.
    It stays in the part's process group (``run_boxed(own_group=False)``): it dies with the part."""

    def __init__(self, work: Path, timeout_s: float) -> None:
        self.lines: list[str] = []
        self.outcome = None
        cmd = [sys.executable, str(Path(__file__).with_name("gpu_check.py")), "--child", "cpu_ckpt"]
        cmd += ["--work", str(work)]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        self._thread = threading.Thread(target=self._run, args=(cmd, timeout_s, env), daemon=True)
        self._thread.start()

    def _run(self, cmd: list[str], timeout_s: float, env: dict) -> None:
        self.outcome = run_boxed(cmd, timeout_s, self.lines.append, env=env, own_group=False)

    def wait(self, timeout_s: float):
        """The helper's BoxedOutcome, or None if it has not ended within ``timeout_s``."""
        self._thread.join(max(0.0, timeout_s))
        return self.outcome


def start_cpu_checkpoint(work: Path, deadline: float) -> CpuCheckpointRun | None:
    """The helper, or None when no checkpoint can be written here (psutil missing)."""
    if checkpoint_writer_problem() is not None:
        return None
    return CpuCheckpointRun(work, max(5.0, deadline - time.time() - 15))


def check_cpu_checkpoint_on_cuda(report, work: Path, deadline: float, helper: CpuCheckpointRun | None) -> None:
    from xtoken_nemo.models.build import forward_logits
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel

    if helper is None:
        report.skip("convert", f"no checkpoint can be written: {(checkpoint_writer_problem() or '').split(';')[0]}")
        return
    outcome = helper.wait(deadline - time.time() - 10)
    if outcome is None:
        report.skip("convert", "budget: the CPU checkpoint process had not finished")
        return
    report.measure("convert.cpu_process_s", round(outcome.elapsed_s, 1), "s", "ran beside the other sub-checks")
    saved = work / "convert" / "cpu_logits.pt"
    if outcome.timed_out or outcome.rc != 0 or not saved.is_file():
        tail = "\n".join(helper.lines[-12:])
        why = "timed out" if outcome.timed_out else f"rc {outcome.rc}"
        report.check("convert.cpu_write", False, detail=f"the CPU process: {why}", tb=tail)
        return
    report.check(
        "convert.cpu_write", True, detail="random qwen3-family checkpoint written with CUDA_VISIBLE_DEVICES=''"
    )
    ref = torch.load(saved)
    vocab = ref["vocab"]
    ensure_model_parallel(1)
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        name = str(dtype).split(".")[-1]
        try:
            model, arch, _ = load_mcore_checkpoint(str(work / "convert" / "ckpt"), params_dtype=dtype)
            dev = next(model.parameters()).device.type
            with torch.no_grad():
                logits = forward_logits(model, _ids(vocab), arch)[..., :vocab].float().cpu()
            err = _rel(logits, ref["logits"])
            report.check(
                f"convert.load_on_{_device()}.{name}",
                dev == _device() and err <= tol,
                err,
                tol,
                f"logits vs the CPU load, relative to max |logit| {float(ref['logits'].abs().max()):.3g}",
            )
            del model
        except Exception as exc:  # noqa: BLE001
            report.error(f"convert.load_on_{_device()}.{name}", exc)


def run_correct(args, report, prep: dict, deadline: float) -> None:
    work = Path(args.work) / "correct"
    work.mkdir(parents=True, exist_ok=True)
    keep: dict = {}
    helper = start_cpu_checkpoint(work, deadline)  # on the CPU, beside the GPU sub-checks
    for name, fn in (
        ("losses", lambda: check_losses(report)),
        ("train", lambda: check_train_step(report, prep, work, keep)),
        ("ckpt", lambda: check_resume(report, prep, work, keep)),
        ("convert", lambda: check_cpu_checkpoint_on_cuda(report, work, deadline, helper)),
    ):
        if time.time() > deadline - 10:
            report.skip(f"correct.{name}", "budget")
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            report.error(f"{name}.unexpected", exc)
        report.measure(f"correct.{name}_s", round(time.perf_counter() - t0, 2), "s")


# ----------------------------------------------------------------------------------------------
# part `fused`: megatron's torch.compile'd fusions against the unfused build, once
# ----------------------------------------------------------------------------------------------
#: the TransformerConfig flags KernelOptions can turn on (what "fused" means here)
FUSION_FLAGS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
)
#: max relative error of the loss and of every gradient, fused vs unfused (relative to max |value|)
FUSED_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _loss_and_grads(model, arch, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy of ``ids`` [b, s] (fp32) and every parameter's gradient."""
    import torch.nn.functional as F

    from xtoken_nemo.models.build import forward_logits

    model.zero_grad(set_to_none=True)
    logits = forward_logits(model, ids, arch)[..., :vocab].float()
    targets = ids[:, 1:].reshape(-1).to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), grads


def _grads_rel(a: dict, b: dict) -> float:
    """max over parameters of max |a - b| / max |b| (inf when the gradients' names differ)."""
    if a.keys() != b.keys() or not b:
        return math.inf
    return max(_rel(a[k], b[k]) for k in b)


def check_fused(report, dtype: torch.dtype) -> None:
    """The student's tiny shape built twice by the trainer's path (model_setup.build_model): with
    the trainer's default kernel request (``ParallelConfig()``: megatron's fusions, resolved against
    this machine) and with everything unfused; the fused model gets the unfused one's weights; one
    forward/backward of each on the same ids."""
    from xtoken_nemo.distill.config import ParallelConfig
    from xtoken_nemo.distill.model_setup import build_model
    from xtoken_nemo.models.build import resolve_kernel_options, te_available
    from xtoken_nemo.tokenizers import load_tokenizer

    name = str(dtype).split(".")[-1]
    mc = model_config(shapes(True)["models"]["student"])
    vocab = load_tokenizer(mc.tokenizer).vocab_size
    request = ParallelConfig().kernel_options()  # what Trainer asks for by default
    unfused, arch, _ = build_model(mc, vocab, 1, dtype, trainable=True, kernels=None)
    fused, _, _ = build_model(mc, vocab, 1, dtype, trainable=True, kernels=request)
    fused.load_state_dict(unfused.state_dict())  # same weights, whatever the RNGs did
    on = [f for f in FUSION_FLAGS if getattr(fused.config, f, False)]
    off = resolve_kernel_options(request, arch, 1, te_available()).summary()
    report.measure(f"fused.{name}.kernels_on", on or "none", note=f"turned off: {off}" if off else "")
    ids = _ids(vocab)
    loss_u, grads_u = _loss_and_grads(unfused, arch, ids, vocab)
    sync()
    t0 = time.perf_counter()
    loss_f, grads_f = _loss_and_grads(fused, arch, ids, vocab)  # the first call compiles
    sync()
    report.measure(f"fused.{name}.first_step_s", round(time.perf_counter() - t0, 2), "s", "forward+backward")
    t0 = time.perf_counter()
    _loss_and_grads(fused, arch, ids, vocab)
    sync()
    report.measure(f"fused.{name}.second_step_s", round(time.perf_counter() - t0, 3), "s", "forward+backward")
    err_l, err_g = _rel(loss_f, loss_u), _grads_rel(grads_f, grads_u)
    tol = FUSED_TOL[dtype]
    what = (
        f"fused ({', '.join(on)}) vs unfused"
        if on
        else "no fused kernel can run here, so this compared two unfused builds (the comparison is trivial)"
    )
    report.check(
        f"fused.{name}.loss_and_grads_vs_unfused",
        err_l <= tol and err_g <= tol,
        max(err_l, err_g),
        tol,
        f"loss {err_l:.2g} grads {err_g:.2g}; {what}",
    )


def run_fused(args, report, prep: dict, deadline: float) -> None:
    """fp32 (a tight tolerance) and, on CUDA, bf16 (the trainer's precision there)."""
    from xtoken_nemo.models.runtime import ensure_model_parallel

    ensure_model_parallel(1)
    dtypes = (torch.float32, torch.bfloat16) if torch.cuda.is_available() else (torch.float32,)
    for dtype in dtypes:
        name = str(dtype).split(".")[-1]
        if time.time() > deadline - 5:
            report.skip(f"fused.{name}", "budget")
            continue
        try:
            check_fused(report, dtype)
        except Exception as exc:  # noqa: BLE001
            report.error(f"fused.{name}.loss_and_grads_vs_unfused", exc)
