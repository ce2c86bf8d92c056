"""Alignment and preprocessing throughput, measured side by side in one run.

    .venv/bin/python bench/align.py [--kb 300] [--teacher qwen3] [--doc-tokens 2048]

1. Alignment (tokens/s of student tokens) on the same deterministic mixed text, cut into
   documents of about --doc-tokens tokens, from ids:
   - exact  : our linear path on surface bytes (xtoken_nemo.align.align_ids)
   - dp     : our banded Needleman-Wunsch fallback
   - gold   : decoded-buffer grouping (per-token decode + buffer equality; earlier TRL GOLD
              releases grouped this way, TRL 1.16 aligns by byte offsets: bench/gold_buffer.py)
   printed with the ratios exact/gold and exact/dp.
2. Preprocessing end to end (xtoken_nemo.data.preprocess, 1 worker, JSONL in, .bin/.idx out):
   tokens/s and the split of its time into read / tokenize / align / write.
Ratios only; absolute numbers depend on the (shared) machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timeit(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=int, default=300, help="KB of mixed text (default 300)")
    ap.add_argument("--student", default="llama3")
    ap.add_argument("--teacher", default="qwen3")
    ap.add_argument("--doc-tokens", type=int, default=2048, help="tokens per aligned document (default 2048)")
    ap.add_argument("--dp-kb", type=int, default=60, help="KB of the text the slow DP path is timed on (default 60)")
    args = ap.parse_args(argv)

    from gold_buffer import gold_align_ids  # bench/gold_buffer.py, beside this script

    from xtoken_nemo.align import align_ids, surface_table
    from xtoken_nemo.data.synthetic import text_of_size
    from xtoken_nemo.tokenizers import load_tokenizer

    student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
    import unicodedata

    # NFC first: Qwen3 NFC-normalizes, and ids that decode to different bytes need the offsets
    # path (text at hand) or the DP; the comparison here is on ids alone
    text = unicodedata.normalize("NFC", text_of_size(args.kb * 1024, seed=42))
    # documents of about doc_tokens student tokens, cut at line ends
    lines, docs, cur, cur_len = text.splitlines(keepends=True), [], [], 0
    for line in lines:
        n = len(student.encode_batch([line])[0])
        cur.append(line)
        cur_len += n
        if cur_len >= args.doc_tokens:
            docs.append("".join(cur))
            cur, cur_len = [], 0
    if cur:
        docs.append("".join(cur))
    s_ids = student.encode_batch(docs)
    t_ids = teacher.encode_batch(docs)
    surface_table(student), surface_table(teacher)  # build the lookup tables outside the timing
    n_tokens = sum(len(x) for x in s_ids)
    print(
        f"text: {len(text.encode()) / 1024:.0f} KB, {len(docs)} documents, {n_tokens:,} {args.student} tokens, "
        f"{sum(len(x) for x in t_ids):,} {args.teacher} tokens"
    )

    def run_exact():
        for a, b in zip(s_ids, t_ids):
            align_ids(a, b, student, teacher, method="exact")

    def run_gold():
        for a, b in zip(s_ids, t_ids):
            gold_align_ids(a, b, student, teacher)

    dp_limit = args.dp_kb * 1024
    dp_pairs, size = [], 0
    for d, a, b in zip(docs, s_ids, t_ids):
        if size >= dp_limit:
            break
        dp_pairs.append((a, b))
        size += len(d.encode())
    dp_tokens = sum(len(a) for a, _ in dp_pairs)

    def run_dp():
        for a, b in dp_pairs:
            align_ids(a, b, student, teacher, method="dp")

    t_exact = _timeit(run_exact)
    t_gold = _timeit(run_gold, repeat=1)
    t_dp = _timeit(run_dp, repeat=1)
    r_exact, r_gold, r_dp = n_tokens / t_exact, n_tokens / t_gold, dp_tokens / t_dp
    print("\nalignment throughput (student tokens/s, from ids)")
    print(f"  exact (ours)          {r_exact:14,.0f}")
    print(f"  dp fallback (ours)    {r_dp:14,.0f}   (on the first {dp_tokens:,} tokens)")
    print(f"  decoded buffers       {r_gold:14,.0f}   (bench/gold_buffer.py)")
    print(f"  ratio exact / buffers {r_exact / r_gold:14.1f}x")
    print(f"  ratio exact / dp      {r_exact / r_dp:14.1f}x")
    # agreement on the benchmark text itself
    same_chunks = total_chunks = 0
    for a, b in dp_pairs:
        ex = align_ids(a, b, student, teacher, method="exact")[0]
        dp = align_ids(a, b, student, teacher, method="dp")[0]
        exact_set = set(map(tuple, ex.chunks.tolist()))
        same_chunks += sum(tuple(c) in exact_set for c in dp.chunks.tolist())
        total_chunks += len(ex)
    print(
        f"  DP chunks identical to exact chunks: {same_chunks:,}/{total_chunks:,} "
        f"({100 * same_chunks / total_chunks:.2f}%; the rest sit around chunks of more than 4 tokens,"
        " e.g. Greek words Qwen3 spells with 6 byte tokens)"
    )

    # ---- preprocessing end to end -------------------------------------------------------------
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        with open(src, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        cfg = PreprocessConfig(
            inputs=[str(src)],
            student=args.student,
            teachers=[args.teacher],
            out=str(Path(tmp) / "out"),
            seq_length=4096,
            docs_per_shard=max(1, len(docs) // 4),
            progress=False,
        )
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost outside the timing)

        t = time.perf_counter()
        manifest = preprocess(cfg)
        wall = time.perf_counter() - t
    sec = manifest["seconds"]
    busy = sum(sec.values())
    tokens = manifest["student"]["tokens"] + sum(t["tokens"] for t in manifest["teachers"])
    print("\npreprocessing end to end (1 worker, student + 1 teacher, JSONL -> .bin/.idx)")
    print(
        f"  {manifest['student']['tokens']:,} student tokens in {wall:.2f} s wall (incl. tokenizer setup): "
        f"{manifest['student']['tokens'] / wall:,.0f} student tokens/s, {tokens / wall:,.0f} tokens/s all sides"
    )
    print(
        f"  shard work {busy:.2f} s = {tokens / busy:,.0f} tokens/s all sides: "
        + ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in sec.items())
    )
    print(f"  tokenize / align time ratio {sec['tokenize'] / max(sec['align'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
