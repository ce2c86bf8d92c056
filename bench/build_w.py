"""Benchmark: building W for the built-in pairs (Llama-3.2 student x Qwen3 / Phi-4-mini).

Prints, per pair, the full build time and student rows/s, and side by side in the same run the
pass-2 teacher tokenization batched (what the builder does) vs one call per token, as a ratio.
Last line: one JSON object with every figure.

    .venv/bin/python bench/build_w.py [--pairs llama3:qwen3,llama3:phi4mini]
"""

from __future__ import annotations

import argparse
import json
import time

from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.vocab.build import build_projection_matrix
from xtoken_nemo.vocab.canonical import exact_matches


def pass2_texts(student, teacher) -> list[str]:
    matched = exact_matches(student, teacher).ordinary
    texts = []
    for sid, surface in enumerate(student.surfaces):
        if surface and sid not in matched:
            try:
                texts.append(surface.decode("utf-8"))
            except UnicodeDecodeError:
                pass
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", default="llama3:qwen3,llama3:phi4mini")
    args = parser.parse_args()
    results = {}
    for pair in args.pairs.split(","):
        s_name, t_name = pair.split(":")
        t0 = time.perf_counter()
        student, teacher = load_tokenizer(s_name), load_tokenizer(t_name)
        _ = student.surfaces, teacher.surfaces
        load_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        W = build_projection_matrix(student, teacher, progress=False)
        build_s = time.perf_counter() - t0

        texts = pass2_texts(student, teacher)
        t0 = time.perf_counter()
        teacher.encode_batch(texts)
        batched_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for text in texts:
            teacher.encode_batch([text])
        single_s = time.perf_counter() - t0

        r = {
            "shape": list(W.shape),
            "nnz": W.nnz,
            "tokenizer_load_s": round(load_s, 3),
            "build_s": round(build_s, 3),
            "student_rows_per_s": round(W.shape[0] / build_s),
            "pass2_tokens": len(texts),
            "pass2_batched_s": round(batched_s, 4),
            "pass2_one_call_per_token_s": round(single_s, 4),
            "batching_speedup": round(single_s / batched_s, 2),
        }
        results[pair] = r
        print(
            f"{pair:<18} build {build_s:6.2f} s ({r['student_rows_per_s']:,} rows/s, nnz {W.nnz:,}); "
            f"pass 2: {len(texts):,} texts batched {batched_s:.3f} s vs one call each {single_s:.3f} s "
            f"= {r['batching_speedup']}x"
        )
    print(json.dumps({"bench": "build_w", "results": results}))


if __name__ == "__main__":
    main()
