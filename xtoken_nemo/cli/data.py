"""``xtoken preprocess``: tokenize a corpus with the student and every teacher, align, write
Megatron indexed datasets plus a manifest (see :mod:`xtoken_nemo.data.preprocess`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_preprocess_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize + align a corpus for distillation (Megatron .bin/.idx + manifest)",
        description=(
            "Read JSONL/Parquet documents, tokenize them with the student and each teacher, align "
            "every teacher to the student and write Megatron-core indexed datasets and manifest.json "
            "to --out. Resumable: rerun the same command after a crash and finished shards are kept."
        ),
    )
    p.add_argument(
        "--input", nargs="+", required=True, action="extend", help="JSONL/Parquet files, directories or globs"
    )
    p.add_argument("--student", required=True, help="student tokenizer (built-in name or path)")
    p.add_argument("--teacher", action="append", required=True, help="teacher tokenizer; repeat for several teachers")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--seq-length", type=int, default=4096, help="training window length recorded in the manifest (default 4096)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--text-field", default="text", help="JSON field / Parquet column holding the text (default: text)")
    p.add_argument("--docs-per-shard", type=int, default=10_000, help="documents per resumable shard (default 10000)")
    p.add_argument("--keep-shards", action="store_true", help="keep the per-shard datasets after merging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    p.set_defaults(func=run_preprocess)
    return p


def run_preprocess(args) -> int:
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.errors import XTokenError

    cfg = PreprocessConfig(
        inputs=list(args.input),
        student=args.student,
        teachers=list(args.teacher),
        out=args.out,
        seq_length=args.seq_length,
        workers=args.workers,
        text_field=args.text_field,
        docs_per_shard=args.docs_per_shard,
        keep_shards=args.keep_shards,
        progress=not args.no_progress,
    )
    try:
        manifest = preprocess(cfg)
    except XTokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    print(summary(manifest))
    return 0


def summary(manifest: dict) -> str:
    res = manifest.get("resumed", {})
    lines = [
        f"wrote {manifest['documents']:,} documents in {manifest['shards']} shards"
        + (f" ({res['shards_skipped']} finished earlier, skipped)" if res.get("shards_skipped") else ""),
        f"  student {manifest['student']['tokenizer']}: {manifest['student']['tokens']:,} tokens"
        f" (BOS {'yes' if manifest['student']['bos'] else 'no'}, EOS after every document)",
    ]
    for m, t in enumerate(manifest["teachers"]):
        if t["identity"]:
            lines.append(
                f"  teacher{m} {t['tokenizer']}: same tokenizer as the student, identity alignment (no copy stored)"
            )
        else:
            lines.append(
                f"  teacher{m} {t['tokenizer']}: {t['tokens']:,} tokens, {t['matched_chunks']:,} matched chunks, "
                f"{t['gap_chunks']:,} gap chunks; offsets path for {t['offsets_path_docs']:,} documents"
            )
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    if skipped:
        lines.append("  skipped " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in skipped.items()))
        lines += [f"    e.g. {e}" for e in manifest.get("skipped_examples", [])]
    else:
        lines.append("  skipped none")
    if manifest["longer_than_window"]:
        lines.append(
            f"  {manifest['longer_than_window']:,} documents are longer than seq_length={manifest['seq_length']}: "
            "kept, packing splits them across windows"
        )
    s = manifest["seconds"]
    busy = sum(s.values()) or 1.0
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s ({100 * v / busy:.0f}%)" for k, v in s.items()))
    return "\n".join(lines)
