"""Blending-index build time: the vectorized xtoken_nemo.data.dataset.blending_indices for a
10^8-window, three-dataset blend (ClimbMix scale) against the previous pure-Python loop, timed on
a smaller size and extrapolated linearly (it is O(size), one numpy argmax per window).

    .venv/bin/python bench/blend_index.py [--size 100000000] [--loop-size 1000000]

Prints one human line and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from xtoken_nemo.data.dataset import blending_indices


def blending_indices_loop(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The previous blending rule, kept here as the benchmark's and the tests' reference (about
    10^6 samples/s: not for ClimbMix scale; the library uses ``blending_indices``): sample i goes
    to the dataset whose count is furthest below ``w * (i + 1)`` (first on ties)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    d_index = np.empty(size, dtype=np.int16)
    s_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        err = w * (i + 1) - counts
        d = int(np.argmax(err))
        d_index[i] = d
        s_index[i] = counts[d]
        counts[d] += 1
    return d_index, s_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000_000)
    ap.add_argument("--loop-size", type=int, default=1_000_000)
    ap.add_argument("--weights", default="0.5,0.3,0.2")
    args = ap.parse_args()
    w = np.array([float(x) for x in args.weights.split(",")])

    t0, c0 = time.perf_counter(), time.process_time()
    d, s = blending_indices(w, args.size)
    new_s, new_cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = np.bincount(d, minlength=len(w)).tolist()
    del d, s
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    t0, c0 = time.perf_counter(), time.process_time()
    d_old, _ = blending_indices_loop(w, args.loop_size)
    loop_s, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
    d_new, _ = blending_indices(w, args.loop_size)
    same = float((d_old == d_new).mean())
    old_s = loop_s * args.size / args.loop_size

    print(
        f"blend index, {len(w)} datasets, {args.size:.3g} windows: vectorized {new_s:.1f} s "
        f"(CPU {new_cpu:.1f} s, peak RSS {peak_gb:.1f} GB); old loop {loop_s:.1f} s for {args.loop_size:.3g} -> "
        f"~{old_s:.0f} s ({old_s / 60:.1f} min) extrapolated; {old_s / new_s:.0f}x; "
        f"same positions as the loop: {same:.1%}"
    )
    print(
        json.dumps(
            {
                "bench": "blend_index",
                "datasets": len(w),
                "weights": w.tolist(),
                "size": args.size,
                "vectorized_s": round(new_s, 3),
                "vectorized_cpu_s": round(new_cpu, 3),
                "loop_size": args.loop_size,
                "loop_s": round(loop_s, 3),
                "loop_cpu_s": round(loop_cpu, 3),
                "loop_extrapolated_s": round(old_s, 1),
                "speedup": round(old_s / new_s, 1),
                "counts": counts,
                "same_positions_as_loop": same,
                "peak_rss_gb": round(peak_gb, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
