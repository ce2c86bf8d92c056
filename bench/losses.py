"""Benchmark: forward+backward time and peak memory of KL, GOLD, P-KL, H-KL and J-KL, side by side.

Same inputs for every loss: chunk-level student logits [chunks, V_S] and teacher logits
[chunks, V_T] (bf16 by default, as a model emits them), V_S x V_T from the real built-in
tokenizers (Llama-3.2 student x Qwen3 teacher) and the real W from the builder. Plain KL (the
same-tokenizer baseline) uses a second student-vocabulary teacher of the same shape as the
student. Each loss runs through the single-device path of the vocab-parallel implementation
(tp=1) with its default token block.

How memory is measured: each loss runs in its own fresh subprocess (so one loss's freed memory
cannot hide another's peak). The subprocess builds the inputs and W's CSR form, then a sampling
thread reads the process RSS (psutil) every 2 ms during forward+backward; "peak extra" is the
highest RSS seen minus the RSS just before the forward. It includes the gradient buffer
(one [chunks, V_S] tensor in the input dtype), which every loss must return. The figure to
compare with the aim ("at most one [block, V_T] buffer beyond KL") is `extra_vs_kl_mb` next to
`block_buffer_mb` (one fp32 [block, V_T] buffer).

J-KL (``jkl``) needs real chunks, not only chunk rows: its input is GSM8k-style text (word problems
full of numbers) tokenized by both tokenizers and aligned, repeated to ``--chunks`` chunks; the
student side is [chunks, V_S] as for every loss, the teacher side the per-position logits
[teacher tokens, V_T] (J-KL reads the positions inside a chunk), and the timed call is the whole
mode: the P-KL term on the chunks' first teacher positions plus the joint term, host index
included. Compare it with ``pkl`` (aim: at most 1.5x P-KL's time, at most one more [block, V_T]
buffer than P-KL).

Runtime on 2 CPU cores at 2048 chunks: a few minutes (the ``*_sort`` losses sort full vocabularies).

    .venv/bin/python bench/losses.py [--chunks 2048] [--block 256]
        [--losses kl,gold,gold_sort,gold_exact,pkl,jkl,hkl,hkl_sort,hkl_exact,uld,uld_sort,uld_exact]
    .venv/bin/python bench/losses.py --chunks 256      # quick run
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOSSES = (
    *("kl", "gold", "gold_sort", "gold_exact", "pkl", "jkl"),
    *("hkl", "hkl_sort", "hkl_exact", "uld", "uld_sort", "uld_exact"),
)
"""``*_sort``: the same loss with ``uld_method="sort"`` (the exact full sort, the old path); without
the suffix the default ``uld_method="hist"`` (layer-cake histogram, no sort: xtoken_nemo/losses/uld_hist.py)
with its default static contested-entry buffer; ``*_exact``: the histogram with the buffer sized
exactly (``uld_hist.CONTESTED_SHARE = None``: one host read per block)."""


def _pad(v: int, multiple: int = 128) -> int:
    return -(-v // multiple) * multiple


# ------------------------------------------------------------------------------------------
# child: one loss, one process
# ------------------------------------------------------------------------------------------
class _RssSampler:
    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_child(args: argparse.Namespace) -> dict:
    import torch

    from xtoken_nemo import losses as P
    from xtoken_nemo.losses import hkl_pairs
    from xtoken_nemo.vocab.projection import ProjectionMatrix

    torch.set_num_threads(args.threads)
    W = ProjectionMatrix.load(args.w_path)
    v_s, v_t = W.shape
    vs_pad, vt_pad = _pad(v_s), _pad(v_t)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    n = args.chunks

    def logits(v: int) -> torch.Tensor:
        return (torch.randn(n, v, generator=g) * 3.0).to(dtype)

    student = logits(vs_pad).requires_grad_(True)
    warm_fn, extra = None, {}
    if args.loss == "kl":
        teacher = logits(vs_pad)
        fn = lambda s, t: P.kl_loss_parallel(s, t, v_s, block_size=args.block)  # noqa: E731
    else:
        teacher = logits(vt_pad)
        base, _, method = args.loss.partition("_")
        if method == "exact":
            from xtoken_nemo.losses import uld_hist

            uld_hist.CONTESTED_SHARE = None
        method = "hist" if method in ("", "exact") else method
        if args.loss == "pkl":
            proj = P.prepare_projection(W, vs_pad, vt_pad)
            fn = lambda s, t: P.pkl_loss_parallel(s, t, proj, v_s, v_t, block_size=args.block)  # noqa: E731
        elif args.loss == "jkl":
            fn, teacher, warm_fn, extra = jkl_case(args, W, vs_pad, vt_pad, logits)
        elif base == "uld":
            fn = lambda s, t: P.uld_loss_parallel(s, t, v_s, v_t, block_size=args.block, uld_method=method)  # noqa: E731
        else:
            pairs = hkl_pairs(W) if base == "hkl" else exact_pairs(W)
            fn = lambda s, t: P.gold_loss_parallel(  # noqa: E731
                s, t, pairs, v_s, v_t, block_size=args.block, uld_method=method
            )
    # warm-up on a few chunks (kernel/thread-pool start-up), not timed
    warm = student[: min(n, 8)].detach().clone().requires_grad_(True)
    (warm_fn or fn)(warm, teacher[: warm.shape[0]]).backward()
    del warm
    import gc

    gc.collect()
    from xtoken_nemo.losses import uld_hist

    # the histogram ULD's contested-entry buffer, as the trainer sizes it: the default share,
    # doubled until the call fits (each try is a full call; the last one is the one reported)
    share, tries = uld_hist.CONTESTED_SHARE, 0
    while True:
        tries += 1
        student.grad = None
        with uld_hist.contested_buffer(share) as buffer, _RssSampler() as mem:
            t0 = time.perf_counter()
            loss = fn(student, teacher)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        if buffer.overflow is None or int(buffer.overflow) == 0 or share >= 1.0:
            break
        share = uld_hist.grown_share(share)
    if buffer.overflow is not None:
        extra = dict(extra, uld_share=share, uld_tries=tries)
    return {
        "loss": args.loss,
        "value": float(loss.detach()),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "time_s": t2 - t0,
        "peak_extra_mb": (mem.peak - mem.start_rss) / 2**20,
        "grad_mb": student.grad.numel() * student.grad.element_size() / 2**20,
        **extra,
    }


GSM8K_LIKE = (
    "Natalia sold clips to {a} of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? In May she sold {a} / 2 = {b} clips. "
    "Altogether she sold {a} + {b} = {c} clips. Weng earns ${d} an hour for babysitting; yesterday she "
    "did {e} minutes, so she earned {d} x {e} / 60 = {f} dollars. #### {c}\n"
)


def gsm8k_like_chunks(student, teacher, num_chunks: int, seed: int = 0):
    """(student spans, teacher spans, teacher targets [T]) of aligned GSM8k-style text, label coordinates."""
    import random

    import numpy as np
    import torch

    from xtoken_nemo.align.api import align_text
    from xtoken_nemo.losses.common import ChunkSpans

    rng = random.Random(seed)
    rows, t_ids, s_off, t_off = [], [], 0, 0
    while sum(len(r) for r in rows) < num_chunks:
        a, d, e = rng.randrange(20, 999, 2), rng.randrange(5, 60), rng.randrange(10, 600)
        text = GSM8K_LIKE.format(a=a, b=a // 2, c=a + a // 2, d=d, e=e, f=round(d * e / 60, 2))
        aligned = align_text(text, student, teacher, add_bos=False)
        chunks = aligned.alignment.chunks[1:] - 1  # label coordinates: position p predicts token p + 1
        rows.append(chunks + np.array([s_off, s_off, t_off, t_off]))
        t_ids += aligned.teacher_ids[1:] + [0]  # targets of positions 0 .. len-1 (last one unused)
        s_off += len(aligned.student_ids)
        t_off += len(aligned.teacher_ids)
    table = np.concatenate(rows)[:num_chunks]
    s_spans, t_spans = ChunkSpans(table[:, 0], table[:, 1]), ChunkSpans(table[:, 2], table[:, 3])
    return s_spans, t_spans, torch.tensor(t_ids[: int(table[-1, 3])])


def jkl_case(args, W, vs_pad: int, vt_pad: int, logits):
    """(fn(student chunks, teacher positions), teacher positions' logits) of the J-KL mode on GSM8k-style chunks."""
    import torch

    from xtoken_nemo import losses as P
    from xtoken_nemo.losses.jkl import jkl_term_parallel, joint_entries
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.prefix_support import build_prefix_support

    student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
    support = build_prefix_support(student, teacher, progress=False)
    s_spans, t_spans, targets = gsm8k_like_chunks(student, teacher, args.chunks)
    teacher_logits = torch.cat([logits(vt_pad) for _ in range(-(-targets.shape[0] // args.chunks))])
    teacher_logits = teacher_logits[: targets.shape[0]].contiguous()
    first = torch.from_numpy(t_spans.starts)
    proj = P.prepare_projection(W, vs_pad, teacher_logits.shape[1])
    v_s, v_t = W.shape

    # the chunks' first teacher positions, gathered outside the timed call: the trainer gathers
    # them for P-KL too, and the pkl child gets them as its input
    t_first = teacher_logits[first]

    def fn(s, t):
        pkl = P.pkl_loss_parallel(s, t_first, proj, v_s, v_t, block_size=args.block, reduction="none")
        entries = joint_entries(support, s_spans, t_spans, targets)
        joint = jkl_term_parallel(s, t, entries, v_s, v_t, block_size=args.block)
        return (pkl + joint).mean()

    def warm(s, t):  # the same kernels on a few rows (the full call is the timed one)
        return P.pkl_loss_parallel(s, t, proj, v_s, v_t, block_size=args.block)

    joint = (t_spans.ends - t_spans.starts >= 2) & (s_spans.ends - s_spans.starts == 1)
    entries = joint_entries(support, s_spans, t_spans, targets)
    info = {"joint_chunks": int(joint.sum()), "teacher_positions": int(targets.shape[0])}
    info["support_entries"] = entries.num_entries if entries is not None else 0
    return fn, teacher_logits, warm, info


def exact_pairs(W):
    """GOLD's common set: W's exact-match rows (a single teacher entry of weight 1), 1-to-1."""
    import torch

    one = (W.indices[:, 0] >= 0) & (W.indices[:, 1:] < 0).all(1) & (W.values[:, 0] > 0.999)
    rows = torch.nonzero(one).squeeze(1)
    teachers = W.indices[rows, 0]
    uniq, first = {}, []
    for r, t in zip(rows.tolist(), teachers.tolist()):
        if t not in uniq:
            uniq[t] = r
            first.append((r, t))
    return torch.tensor(first, dtype=torch.int64).reshape(-1, 2)


# ------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------
def build_w(student: str, teacher: str, path: Path) -> dict:
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import BuildConfig, build_projection_matrix

    t0 = time.perf_counter()
    W = build_projection_matrix(load_tokenizer(student), load_tokenizer(teacher), BuildConfig(), progress=False)
    W.save(path)
    return {"build_w_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--block", type=int, default=256, help="token block of the vocab-parallel losses")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--student", default="llama3")
    parser.add_argument("--teacher", default="qwen3")
    parser.add_argument("--w-path", default=None, help="use this saved W instead of building it")
    parser.add_argument("--child", choices=LOSSES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.loss = args.child
        print(json.dumps(run_child(args)))
        return

    losses = [x for x in args.losses.split(",") if x]
    if "kl" not in losses:
        losses.insert(0, "kl")
    info: dict = {"chunks": args.chunks, "block": args.block, "dtype": args.dtype, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="xtoken-bench-") as tmp:
        w_path = Path(args.w_path) if args.w_path else Path(tmp) / "W.safetensors"
        if not args.w_path:
            print(f"building W ({args.student} x {args.teacher}) ...", flush=True)
            info.update(build_w(args.student, args.teacher, w_path))
        from xtoken_nemo.vocab.projection import ProjectionMatrix

        W = ProjectionMatrix.load(w_path)
        info.update(v_s=W.shape[0], v_t=W.shape[1], w_nnz=W.nnz, w_zero_rows=int((W.row_nnz() == 0).sum()))
        info["hkl_pairs"] = int((W.row_nnz() > 0).sum())
        info["gold_pairs"] = int(exact_pairs(W).shape[0])
        del W
        results = {}
        for loss in losses:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                loss,
                "--w-path",
                str(w_path),
                "--chunks",
                str(args.chunks),
                "--block",
                str(args.block),
                "--dtype",
                args.dtype,
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[loss] = res
            print(
                f"{loss:5s} fwd {res['forward_s']:7.2f} s  bwd {res['backward_s']:7.2f} s  "
                f"total {res['time_s']:7.2f} s  peak extra {res['peak_extra_mb']:8.0f} MB  (loss {res['value']:.4f})",
                flush=True,
            )
    kl = results["kl"]
    block_buffer_mb = args.block * info["v_t"] * 4 / 2**20
    summary = dict(info, block_buffer_mb=block_buffer_mb)
    print(f"\nratios to plain KL (same run), one fp32 [block, V_T] buffer = {block_buffer_mb:.0f} MB")
    for loss, res in results.items():
        res["time_ratio"] = res["time_s"] / kl["time_s"]
        res["memory_ratio"] = res["peak_extra_mb"] / kl["peak_extra_mb"] if kl["peak_extra_mb"] > 0 else None
        res["extra_vs_kl_mb"] = res["peak_extra_mb"] - kl["peak_extra_mb"]
        res["extra_vs_kl_in_block_buffers"] = res["extra_vs_kl_mb"] / block_buffer_mb
        print(
            f"{loss:5s} time x{res['time_ratio']:.2f}  peak-memory x{res['memory_ratio'] or float('nan'):.2f}  "
            f"extra vs KL {res['extra_vs_kl_mb']:+.0f} MB ({res['extra_vs_kl_in_block_buffers']:+.2f} block buffers)"
        )
        summary[loss] = res
    if "jkl" in results and "pkl" in results:
        jkl, pkl = results["jkl"], results["pkl"]
        jkl["time_vs_pkl"] = jkl["time_s"] / pkl["time_s"]
        jkl["extra_vs_pkl_in_block_buffers"] = (jkl["peak_extra_mb"] - pkl["peak_extra_mb"]) / block_buffer_mb
        summary["aim_jkl_time_le_1_5x_pkl"] = jkl["time_vs_pkl"] <= 1.5
        summary["aim_jkl_extra_le_one_block_buffer_over_pkl"] = jkl["extra_vs_pkl_in_block_buffers"] <= 1.0
        print(
            f"\njkl vs pkl (same run): time x{jkl['time_vs_pkl']:.2f}, extra "
            f"{jkl['extra_vs_pkl_in_block_buffers']:+.2f} block buffers; {jkl['joint_chunks']} of {args.chunks} "
            f"chunks joint, {jkl['support_entries']} support entries, {jkl['teacher_positions']} teacher positions"
        )
    if "pkl" in results:
        summary["aim_pkl_time_le_1_5x_kl"] = results["pkl"]["time_ratio"] <= 1.5
        summary["aim_pkl_extra_le_one_block_buffer"] = results["pkl"]["extra_vs_kl_in_block_buffers"] <= 1.0
    # issue 13: GOLD, H-KL and ULD at most 2x KL's time and 2 extra [block, V] buffers (hist vs sort side by side)
    side = [b for b in ("gold", "hkl", "uld") if b in results]
    if side:
        print("\nULD without a sort (hist) vs the exact sort, same run:")
    for base in side:
        res = results[base]
        srt = results.get(base + "_sort")
        exact = results.get(base + "_exact")
        summary[f"aim_{base}_time_le_2x_kl"] = res["time_ratio"] <= 2.0
        summary[f"aim_{base}_extra_le_2_block_buffers"] = res["extra_vs_kl_in_block_buffers"] <= 2.0
        line = (
            f"{base:5s} hist (contested share {res.get('uld_share', float('nan')):g}, "
            f"{res.get('uld_tries', 1)} tries): "
            f"time x{res['time_ratio']:.2f} KL, extra {res['extra_vs_kl_in_block_buffers']:+.2f} block buffers"
        )
        if srt is not None:
            line += (
                f" | sort: time x{srt['time_ratio']:.2f} KL, "
                f"extra {srt['extra_vs_kl_in_block_buffers']:+.2f} block buffers"
                f" | speed-up x{srt['time_s'] / res['time_s']:.1f}, "
                f"|value diff| {abs(res['value'] - srt['value']):.2e}"
            )
            summary[f"{base}_hist_vs_sort_value_diff"] = abs(res["value"] - srt["value"])
        if exact is not None:  # the default static contested-entry buffer against the exact size
            line += (
                f" | exact-size buffer: time x{exact['time_ratio']:.2f} KL, "
                f"extra {exact['extra_vs_kl_in_block_buffers']:+.2f} block buffers"
            )
            summary[f"{base}_static_vs_exact_value_diff"] = abs(res["value"] - exact["value"])
        print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
