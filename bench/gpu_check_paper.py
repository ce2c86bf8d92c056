"""Part 2 of the GPU check: the paper-shape distillation step through the real ``Trainer``.

Every figure comes from the trainer's own code: ``Trainer.train_step`` runs unchanged. Clean steps
give tokens/s; profiled steps after them (``torch.profiler``, CPU and, where there is one, CUDA
activity) give the split, read from the profiler ranges the trainer and ``distill/kd.py`` mark:
``xtoken/student_forward``, ``xtoken/teacher_forward/<teacher>``, ``xtoken/ce_forward``,
``xtoken/kd/<teacher>``, ``xtoken/grad_sync`` and ``xtoken/optimizer_step`` (kernel time on CUDA,
wall time on CPU). The backward of the student and of the KD losses is the time of the autograd
nodes created inside the student-forward and KD ranges (matched by the autograd sequence number).
The core attention of every model (megatron's ``core_attention`` modules: the unfused
[b, heads, s, s] attention of the local spec) is timed the same way, through module hooks that
open a profiler range around it during the profiled steps only.

Every model is built unfused (``unfused_parallel``): megatron's fusions are torch.compile'd and
would compile inside the time box; part ``fused`` checks them once.

Shapes (random weights; real tokenizers, so real vocabularies):

- student: Llama-3.2-1B (vocab 128,256, hidden 2048, 16 layers, 32 heads, 8 KV groups, FFN 8192,
  tied embeddings)
- Qwen3-4B (151,936; 2560, 36 layers, 32 heads, 8 groups, FFN 9728, head_dim 128, untied) under P-KL
- Phi-4-mini (200,064; 3072, 32 layers, 24 heads, 8 groups, FFN 8192, partial rotary 0.75) under H-KL
- Llama-3.2-3B (128,256; 3072, 28 layers, 24 heads, 8 groups, FFN 8192): same-tokenizer KL teacher
  of the three-teacher recipe
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

H100_USABLE_GIB = 79.0  # an 80 GB H100 shows 81,559 MiB; keep ~0.6 GiB for the CUDA context
#: added to (peak allocated - the unfused attention estimate) before comparing with H100_USABLE_GIB:
#: the caching allocator's fragmentation (reserved - allocated, printed beside), flash attention's
#: own buffers and the last layer's transient [heads, s, s] scores, which the estimate leaves out
H100_MARGIN_GIB = 5.0

PAPER = {
    "student": dict(
        tokenizer="llama3",
        family="llama",
        num_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=8192,
        tie_embeddings=True,
        init_seed=1,
    ),
    "qwen3": dict(
        tokenizer="qwen3",
        family="qwen3",
        num_layers=36,
        hidden_size=2560,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=9728,
        tie_embeddings=False,
        init_seed=2,
        head_dim=128,
    ),
    "phi4mini": dict(
        tokenizer="phi4mini",
        family="phi3",
        num_layers=32,
        hidden_size=3072,
        num_attention_heads=24,
        num_query_groups=8,
        ffn_hidden_size=8192,
        tie_embeddings=True,
        init_seed=3,
    ),
    "llama3b": dict(
        tokenizer="llama3",
        family="llama",
        num_layers=28,
        hidden_size=3072,
        num_attention_heads=24,
        num_query_groups=8,
        ffn_hidden_size=8192,
        tie_embeddings=True,
        init_seed=4,
    ),
}
TINY = {
    "student": dict(
        PAPER["student"], num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128
    ),
    # head_dim 32 != hidden/heads (16), as in Qwen3-4B (128 != 80)
    "qwen3": dict(
        PAPER["qwen3"],
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        head_dim=32,
    ),
    "phi4mini": dict(
        PAPER["phi4mini"], num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128
    ),
    "llama3b": dict(
        PAPER["llama3b"], num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128
    ),
}


def shapes(tiny: bool) -> dict:
    return {"seq": 64 if tiny else 4096, "small_seq": 64 if tiny else 128, "models": TINY if tiny else PAPER}


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def unfused_parallel():
    """The run's ParallelConfig with every fused kernel off (overlap options as by default): what
    every part but ``fused`` builds, so that no part compiles megatron's torch.compile'd fusions
    (bias-SwiGLU, bias-dropout-add; on by default wherever Triton and a C compiler exist) inside its
    time box."""
    from xtoken_nemo.distill.config import ParallelConfig
    from xtoken_nemo.models.config import KernelOptions

    return ParallelConfig(**{name: False for name in KernelOptions.__dataclass_fields__})


def model_config(shape: dict):
    """A random-model ModelConfig for ``shape`` (its ModelConfig fields; the rest are ours)."""
    from xtoken_nemo.distill.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in shape.items() if k in fields})


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


#: the profiler ranges of the trainer and distill/kd.py (a name, or a prefix ending in "/") -> part
RANGES = {
    "xtoken/student_forward": "student_forward",
    "xtoken/teacher_forward/": "teacher_forward",
    "xtoken/ce_forward": "ce_forward",
    "xtoken/kd/": "kd_forward",
    "xtoken/grad_sync": "optimizer",
    "xtoken/optimizer_step": "optimizer",
}
#: forward parts whose autograd nodes' backward is timed, and the part that time goes to
BACKWARD_OF = {"student_forward": "student_backward", "kd_forward": "kd_backward"}
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
#: the ranges AttentionRanges opens around each core attention: + "student" or "teacher"
ATTENTION_RANGE = "xtoken_check/attention/"


def _part(name: str) -> str | None:
    for prefix, part in RANGES.items():
        if name == prefix or (prefix.endswith("/") and name.startswith(prefix)):
            return part
    return None


class AttentionRanges:
    """A context manager: while open, every ``core_attention`` module of the student and the
    teachers runs inside a profiler range (``ATTENTION_RANGE`` + "student"/"teacher"), through
    forward pre/post hooks; the hooks are removed on exit. Nothing of the trainer is patched."""

    def __init__(self, student, teachers) -> None:
        self.models = [("student", student)] + [("teacher", t) for t in teachers]
        self.handles: list = []

    def __enter__(self) -> AttentionRanges:
        for label, model in self.models:
            for name, module in model.named_modules():
                if name.split(".")[-1] == "core_attention":
                    self._hook(module, ATTENTION_RANGE + label)
        return self

    def _hook(self, module, range_name: str) -> None:
        open_ranges: list = []

        def pre(_module, _args):
            rf = torch.profiler.record_function(range_name)
            rf.__enter__()
            open_ranges.append(rf)

        def post(_module, _args, _out):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class StepProfile:
    """A ``torch.profiler.profile`` around one step (a context manager); ``split()`` turns its
    ranges into the step's parts in seconds, and the core attention's time beside them."""

    def __init__(self, trainer=None) -> None:
        from torch.profiler import ProfilerActivity

        self.cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = torch.profiler.profile(activities=activities)
        self.attention = AttentionRanges(trainer.student, trainer.teachers) if trainer is not None else None

    def __enter__(self) -> StepProfile:
        self.profiler.__enter__()
        if self.attention is not None:
            self.attention.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.attention is not None:
            self.attention.__exit__(*exc)
        self.profiler.__exit__(*exc)

    def _seconds(self, event) -> float:
        return (event.device_time_total if self.cuda else event.cpu_time_total) / 1e6

    def split(self, total: float) -> dict:
        """{part_s: seconds} of the step (``other_s`` = total - the parts), plus
        ``attention_student_s`` (forward + backward) and ``attention_teachers_s`` (forward): the
        core attention, already inside the student and teacher parts, not added again."""
        events = self.profiler.events()
        acc: dict[str, float] = {}
        timed_ranges = []  # (thread, start, end, backward part) of the ranges whose backward is timed
        attention = []  # (thread, start, end) of the student's attention ranges: their backward too
        for e in events:
            if e.name.startswith(ATTENTION_RANGE):
                who = "attention_student" if e.name == ATTENTION_RANGE + "student" else "attention_teachers"
                acc[who] = acc.get(who, 0.0) + self._seconds(e)
                if who == "attention_student":
                    attention.append((e.thread, e.time_range.start, e.time_range.end))
                continue
            part = _part(e.name)
            if part is None:
                continue
            acc[part] = acc.get(part, 0.0) + self._seconds(e)
            if part in BACKWARD_OF:
                timed_ranges.append((e.thread, e.time_range.start, e.time_range.end, BACKWARD_OF[part]))
        # the autograd nodes created inside those ranges, by (forward thread, sequence number)
        owner: dict[tuple[int, int], str] = {}
        in_attention: set[tuple[int, int]] = set()
        attention.sort(key=lambda r: r[1])  # one layer after the other: disjoint, found by bisection
        starts = [r[1] for r in attention]
        for e in events:
            if e.sequence_nr < 0 or e.name.startswith(_BACKWARD_NODE):
                continue
            begin, finish = e.time_range.start, e.time_range.end
            for thread, start, end, part in timed_ranges:
                if e.thread == thread and start <= begin and finish <= end:
                    owner[(e.thread, e.sequence_nr)] = part
                    break
            i = bisect.bisect_right(starts, begin) - 1
            if i >= 0 and attention[i][0] == e.thread and finish <= attention[i][2]:
                in_attention.add((e.thread, e.sequence_nr))
        for e in events:
            if e.name.startswith(_BACKWARD_NODE) and e.sequence_nr >= 0:
                key = (e.fwd_thread, e.sequence_nr)
                part = owner.get(key)
                if part is not None:
                    acc[part] = acc.get(part, 0.0) + self._seconds(e)
                if key in in_attention:
                    acc["attention_student"] = acc.get("attention_student", 0.0) + self._seconds(e)
        parts = {
            "student_forward_s": acc.get("student_forward", 0.0),
            "student_backward_s": acc.get("student_backward", 0.0),
            "teacher_forward_s": acc.get("teacher_forward", 0.0),
            "kd_forward_s": acc.get("kd_forward", 0.0),
            "kd_backward_s": acc.get("kd_backward", 0.0),
            "ce_forward_s": acc.get("ce_forward", 0.0),
            "optimizer_s": acc.get("optimizer", 0.0),
        }
        parts["other_s"] = max(0.0, total - sum(parts.values()))
        parts["total_s"] = total
        parts["attention_student_s"] = acc.get("attention_student", 0.0)
        parts["attention_teachers_s"] = acc.get("attention_teachers", 0.0)
        return parts


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
def distill_config(
    kind: str, prep: dict, run_dir: Path, tiny: bool, total_steps: int, seq: int | None = None, data: str = "data_paper"
):
    from xtoken_nemo.distill.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        OptimConfig,
        TeacherConfig,
        TrainConfig,
    )

    m = shapes(tiny)["models"]
    seq = seq or prep.get("seq") or shapes(tiny)["seq"]
    qwen = lambda alpha: TeacherConfig(
        name="qwen3", model=model_config(m["qwen3"]), mode="pkl", alpha=alpha, projection=prep["W_qwen3"]
    )  # noqa: E731
    phi = lambda alpha: TeacherConfig(
        name="phi4mini", model=model_config(m["phi4mini"]), mode="hkl", alpha=alpha, projection=prep["W_phi4mini"]
    )  # noqa: E731
    llama3b = lambda alpha: TeacherConfig(name="llama3b", model=model_config(m["llama3b"]), mode="kl", alpha=alpha)  # noqa: E731
    teachers = {
        "paper_pkl": lambda: [qwen(1.0)],
        "paper_hkl": lambda: [phi(1.0)],
        "paper_ce": lambda: [],
        "three": lambda: [qwen(0.4), phi(0.3), llama3b(0.3)],
    }[kind]()
    return DistillConfig(
        name=f"gpu-check-{kind}",
        student=model_config(m["student"]),
        teachers=teachers,
        data=DataConfig(paths=[prep[data]], seq_length=seq),
        optim=OptimConfig(lr=1e-5, warmup_fraction=0.0),
        train=TrainConfig(
            train_steps=total_steps,
            global_batch_size=1,
            micro_batch_size=1,
            precision="bf16" if torch.cuda.is_available() else "auto",
            kd_scaling="ce_only" if kind == "paper_ce" else "dynamic",
        ),
        checkpoint=CheckpointConfig(dir=str(run_dir / "ckpt"), save_interval=10**9, resume=False),
        parallel=unfused_parallel(),
        log_dir=str(run_dir / "logs"),
    )


def _peak_memory() -> dict:
    """Peak allocated and reserved GiB since the process started (CUDA); on CPU the RSS."""
    if torch.cuda.is_available():
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**30
    except Exception:  # noqa: BLE001 - only informative on CPU
        rss = None
    return {"peak_allocated_gib": None, "peak_reserved_gib": None, "cpu_rss_gib": rss}


def unfused_attention_gib(num_layers: int, num_heads: int, seq: int, micro_batch: int) -> float:
    """What megatron's local-spec attention keeps for backward and flash attention (TE) does not:
    per layer the fp32 softmax output (4 B) and the bf16 probabilities (2 B), [b, heads, s, s]."""
    return num_layers * num_heads * seq * seq * micro_batch * 6 / 2**30


def te_like_peak_gib(peak_allocated: float, est_unfused: float) -> float:
    """The peak a flash-attention (TE) run would need: allocated - the unfused attention + margin."""
    return peak_allocated - est_unfused + H100_MARGIN_GIB


def report_memory(report, kind: str, mem: dict, est_unfused: float) -> None:
    """Peak allocated (the headline) with the unfused-attention estimate beside it, reserved, and
    the 80 GB H100 verdict from allocated - estimate + H100_MARGIN_GIB."""
    alloc, reserved = mem["peak_allocated_gib"], mem["peak_reserved_gib"]
    if alloc is None:
        rss = mem.get("cpu_rss_gib")
        report.measure(f"{kind}.cpu_rss_gib", None if rss is None else round(rss, 3), "GiB", "no CUDA")
        if kind == "three":
            report.aim("three.peak_memory_gib", None, f"< {H100_USABLE_GIB} GiB (an 80 GB H100)", None, "no CUDA")
        return
    report.measure(
        f"{kind}.peak_allocated_gib",
        round(alloc, 3),
        "GiB",
        f"of which ~{est_unfused:.1f} GiB the unfused attention keeps (est_unfused_attention_gib)",
    )
    report.measure(
        f"{kind}.peak_reserved_gib", round(reserved, 3), "GiB", f"allocator overhead {reserved - alloc:.2f} GiB"
    )
    te_like = te_like_peak_gib(alloc, est_unfused)
    fits = te_like < H100_USABLE_GIB
    report.measure(
        f"{kind}.te_like_peak_gib", round(te_like, 2), "GiB", f"allocated - estimate + {H100_MARGIN_GIB:.0f} margin"
    )
    report.measure(
        f"{kind}.fits_h100_80gb",
        fits,
        note=f"{alloc:.1f} - {est_unfused:.1f} + {H100_MARGIN_GIB:.0f} = {te_like:.1f} GiB vs {H100_USABLE_GIB} usable",
    )
    if kind == "three":
        report.aim(
            "three.peak_memory_gib",
            round(te_like, 2),
            f"< {H100_USABLE_GIB} GiB (an 80 GB H100) at micro-batch 1, with flash attention",
            fits,
            note=f"peak allocated {alloc:.1f} GiB here, unfused attention ~{est_unfused:.1f} GiB of it",
        )


def _record_split(report, kind: str, instrumented: list[dict]) -> None:
    """The median split of the profiled steps and its shares; the KD-share aim is taken without
    the core attention's time (a TE/flash-attention step is shorter, its KD share larger)."""
    split = {k: statistics.median(s[k] for s in instrumented) for k in instrumented[0]}
    total = split["total_s"]
    shares = {
        "student_fwd_bwd": (split["student_forward_s"] + split["student_backward_s"]) / total,
        "teacher_forward": split["teacher_forward_s"] / total,
        "kd_loss_fwd_bwd": (split["kd_forward_s"] + split["kd_backward_s"]) / total,
        "optimizer": split["optimizer_s"] / total,
        "ce_forward": split["ce_forward_s"] / total,
        "other": split["other_s"] / total,
    }
    attention = split["attention_student_s"] + split["attention_teachers_s"]
    kd = split["kd_forward_s"] + split["kd_backward_s"]
    share_wo = kd / max(total - attention, 1e-12)
    report.measure(
        f"{kind}.split_s", {k: round(v, 4) for k, v in split.items()}, note="profiled step (torch.profiler ranges)"
    )
    report.measure(f"{kind}.split_share", {k: round(v, 3) for k, v in shares.items()})
    report.say(
        f"[gpu_check] {kind} split: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) + f" of {total:.3f} s"
    )
    report.measure(
        f"{kind}.attention_share",
        round(attention / total, 3),
        note="core attention (student fwd+bwd, teachers fwd), inside the parts above; unfused without TE",
    )
    if kind in ("paper_pkl", "paper_hkl"):
        report.measure(
            f"{kind}.kd_loss_share",
            round(shares["kd_loss_fwd_bwd"], 4),
            note="of the step as measured: unfused attention included",
        )
        report.aim(
            f"{kind}.kd_loss_share_excl_attention",
            round(share_wo, 4),
            "<= 0.15 of a one-teacher step",
            share_wo <= 0.15,
            note="KD / (step - core attention): flash attention's own time not added back, so an upper bound",
        )


def run_paper(kind: str, args, report, prep: dict, deadline: float) -> None:
    from xtoken_nemo.distill.trainer import Trainer

    warm, steps = args.warmup, args.steps
    if kind == "three":
        steps = min(steps, 2)
    instr_steps = 0 if kind == "three" else 1  # one profiled step gives the split
    seq = prep.get("seq") or shapes(args.tiny)["seq"]
    run_dir = Path(args.work) / kind
    cfg = distill_config(kind, prep, run_dir, args.tiny, warm + steps + instr_steps + 1)
    if torch.cuda.is_available():
        try:
            torch.cuda.reset_peak_memory_stats()
        except Exception:  # noqa: BLE001 - a fresh process has no peak to reset
            pass
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, progress=False)
    except Exception as exc:  # noqa: BLE001
        report.error(f"{kind}.build", exc)
        return
    report.measure(f"{kind}.build_s", round(time.perf_counter() - t0, 2), "s", "student + teachers + optimizer + data")
    n_params = sum(p.numel() for p in trainer.student.parameters())
    report.measure(f"{kind}.student_params_M", round(n_params / 1e6, 1))
    for spec, teacher in zip(trainer.teacher_specs, trainer.teachers):
        report.measure(
            f"{kind}.teacher.{spec.config.name}.params_M",
            round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
            note=f"mode {spec.config.mode}, head_dim {trainer.teacher_archs[trainer.teachers.index(teacher)].head_dim}",
        )
    step = 0
    clean, instrumented, metrics = [], [], {}
    try:
        for phase, count in (("warmup", warm), ("clean", steps), ("instrumented", instr_steps)):
            for _ in range(count):
                if time.time() > deadline - 5:
                    report.skip(f"{kind}.{phase}_step{step}", "budget")
                    break
                profile = StepProfile(trainer) if phase == "instrumented" else contextlib.nullcontext()
                with profile:
                    sync()
                    t = time.perf_counter()
                    metrics = trainer.train_step(step)
                    sync()
                    dt = time.perf_counter() - t
                step += 1
                if phase == "clean":
                    clean.append(dt)
                elif phase == "instrumented":
                    instrumented.append(profile.split(dt))
                report.say(
                    f"[gpu_check] {kind} {phase} step {step}: {dt:.3f} s  "
                    f"total={metrics.get('total', float('nan')):.4g} "
                    f"ce={metrics.get('ce', float('nan')):.4g} kd={metrics.get('kd', float('nan')):.4g} "
                    f"grad_norm={metrics.get('grad_norm', float('nan')):.3g}"
                )
    except Exception as exc:  # noqa: BLE001
        report.error(f"{kind}.step{step}", exc)
    finite = bool(metrics) and all(math.isfinite(metrics.get(k, 0.0)) for k in ("total", "ce", "kd"))
    report.check(
        f"{kind}.steps_finite",
        finite and step == warm + steps + instr_steps,
        detail=f"{step} steps ran; last total={metrics.get('total')} skipped={metrics.get('skipped')}",
    )
    # megatron's local spec (no TE) runs unfused attention; flash attention (TE) keeps none of what
    # it saves for backward. An estimate, to read the peak against a TE run.
    arch = trainer.student_arch
    est = 0.0 if _te() else unfused_attention_gib(arch.num_layers, arch.num_attention_heads, seq, 1)
    report.measure(
        f"{kind}.est_unfused_attention_gib",
        round(est, 2),
        "GiB",
        "student layers x heads x s^2 x 6 B: kept for backward by the local spec's attention, not by TE's",
    )
    report_memory(report, kind, _peak_memory(), est)
    tokens = seq * cfg.train.global_batch_size
    tps = None
    if clean:
        step_s = statistics.median(clean)
        tps = tokens / step_s
        report.measure(
            f"{kind}.step_s", round(step_s, 4), "s", f"median of {len(clean)} clean steps after {warm} warm-up"
        )
        report.measure(f"{kind}.tokens_per_s", round(tps, 1), "tokens/s/GPU")
    if instrumented:
        _record_split(report, kind, instrumented)
    if kind in ("paper_pkl", "paper_hkl") and tps is not None:
        report.aim(
            f"{kind}.tokens_per_s",
            round(tps, 1),
            ">= 3700 tokens/s per GPU (2x NeMo-RL's ~1.84k)",
            tps >= 3700,
            note="local megatron spec (no TE): unfused attention" if not _te() else "",
        )


def _te() -> bool:
    from xtoken_nemo.models.build import te_available

    return te_available()


# ----------------------------------------------------------------------------------------------
# P-KL vs KL on [4096, V] logits
# ----------------------------------------------------------------------------------------------
def run_pkl_vs_kl(args, report, prep: dict, deadline: float) -> None:
    """P-KL (student [n, V_S], teacher [n, V_T], the real W) against KL at EQUAL teacher width
    (both [n, V_T]: P-KL is a KL at the teacher's width plus W's product), the pair the aim
    compares; KL at the student's width (both [n, V_S]) is measured beside it."""
    from xtoken_nemo import losses as P
    from xtoken_nemo.vocab import ProjectionMatrix

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n = shapes(args.tiny)["seq"]
    block = 1024  # TrainConfig.loss_block_size's default, what the trainer uses
    W = ProjectionMatrix.load(prep["W_qwen3"])
    v_s, v_t = W.shape
    pad = lambda v: -(-v // 128) * 128  # noqa: E731
    vs_pad, vt_pad = pad(v_s), pad(v_t)
    g = torch.Generator(device=dev).manual_seed(0)

    def logits(width: int) -> torch.Tensor:
        return (torch.randn(n, width, generator=g, device=dev) * 3).to(dtype)

    student_s, teacher_s = logits(vs_pad), logits(vs_pad)  # student width (V_S)
    student_t, teacher_t = logits(vt_pad), logits(vt_pad)  # teacher width (V_T)
    proj = P.prepare_projection(W, vs_pad, vt_pad)
    fns = {  # name -> (the student logits it differentiates, the loss)
        "kl_teacher_width": (student_t, lambda s: P.kl_loss_parallel(s, teacher_t, v_t, block_size=block)),
        "pkl": (student_s, lambda s: P.pkl_loss_parallel(s, teacher_t, proj, v_s, v_t, block_size=block)),
        "kl_student_width": (student_s, lambda s: P.kl_loss_parallel(s, teacher_s, v_s, block_size=block)),
    }
    reps = 1 if args.tiny else 3
    times = {}
    for name, (student, fn) in fns.items():
        samples = []
        for i in range(reps + 1):  # the first call warms up (CSR transfer, kernels)
            if time.time() > deadline - 3:
                report.skip(f"pkl_vs_kl.{name}.rep{i}", "budget")
                break
            s = student.detach().clone().requires_grad_(True)
            sync()
            t0 = time.perf_counter()
            fn(s).backward()
            sync()
            if i > 0:
                samples.append(time.perf_counter() - t0)
        if samples:
            times[name] = statistics.median(samples)
            report.measure(
                f"pkl_vs_kl.{name}_fwd_bwd_s",
                round(times[name], 5),
                "s",
                f"student [{n}, {student.shape[1]}] {str(dtype).split('.')[-1]}, block {block}",
            )
    if "pkl" in times and "kl_student_width" in times:
        report.measure("pkl_vs_kl.ratio_to_student_width_kl", round(times["pkl"] / times["kl_student_width"], 3))
    if "pkl" in times and "kl_teacher_width" in times:
        ratio = times["pkl"] / times["kl_teacher_width"]
        report.aim(
            "pkl_vs_kl.time_ratio",
            round(ratio, 3),
            f"<= 1.3x plain KL at equal teacher width ({v_t:,})",
            ratio <= 1.3,
        )
