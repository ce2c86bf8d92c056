"""`xtoken convert ...` and `xtoken score ...` subcommands (wired into xtoken_nemo/cli/__init__.py).

xtoken convert hf-to-mcore --hf DIR --out DIR [--tp N] [--vocab-divisor 128] [--dtype bfloat16]
xtoken convert mcore-to-hf --mcore DIR --out DIR [--like HF_DIR]
xtoken score --checkpoint DIR --tokenizer T --text "..." [--json]
"""

from __future__ import annotations

import argparse
import json


def _dtype_arg(value: str) -> str:
    if value not in ("auto", "float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError("dtype must be auto, float32, bfloat16 or float16")
    return value


def cmd_hf_to_mcore(args: argparse.Namespace) -> int:
    from xtoken_nemo.models.convert import hf_to_mcore

    meta = hf_to_mcore(
        args.hf,
        args.out,
        tp=args.tp,
        vocab_divisor=args.vocab_divisor,
        dtype=None if args.dtype == "auto" else args.dtype,
        progress=not args.quiet,
    )
    print(
        f"{meta['family']} ({meta['architecture']}) -> megatron-core checkpoint {args.out}: "
        f"vocab {meta['vocab_size']:,} "
        f"padded to {meta['padded_vocab_size']:,} (multiple of {meta['vocab_divisor']} x tp {meta['padded_for_tp']}), "
        f"dtype {meta['params_dtype']}, tied embeddings: {meta['tie_embeddings']}"
    )
    return 0


def cmd_mcore_to_hf(args: argparse.Namespace) -> int:
    from xtoken_nemo.models.convert import mcore_to_hf

    files = mcore_to_hf(
        args.mcore,
        args.out,
        like=args.like,
        dtype=None if args.dtype == "auto" else args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        progress=not args.quiet,
    )
    print(f"wrote {len(files)} safetensors file(s) and config.json to {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from xtoken_nemo.models.score import score_text

    add_bos = None if args.bos == "default" else args.bos == "yes"
    result = score_text(args.checkpoint, args.tokenizer, args.text, add_bos=add_bos)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    width = max(len(repr(t)) for t in result.tokens)
    for tid, token, lp in zip(result.ids, result.tokens, result.logprobs):
        print(f"{tid:>8}  {repr(token):<{width}}  {'' if lp is None else f'{lp:9.4f}'}")
    n = sum(lp is not None for lp in result.logprobs)
    print(f"total log-prob {result.total:.4f} over {n} predicted tokens (mean {result.total / max(n, 1):.4f})")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add `convert` with `hf-to-mcore` and `mcore-to-hf` to an argparse subparsers object."""
    p = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and megatron-core formats")
    sub = p.add_subparsers(dest="convert_command", required=True, metavar="{hf-to-mcore,mcore-to-hf}")

    a = sub.add_parser("hf-to-mcore", help="HF directory (config.json + safetensors) -> megatron-core dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="new (or empty) output directory")
    a.add_argument(
        "--tp",
        type=int,
        default=1,
        help="largest TP size to pad the vocabulary for (multiple of divisor x tp); default 1",
    )
    a.add_argument(
        "--vocab-divisor",
        type=int,
        default=128,
        help="vocabulary padding divisor (Megatron's make-vocab-size-divisible-by); default 128",
    )
    a.add_argument(
        "--dtype",
        type=_dtype_arg,
        default="auto",
        help="parameter dtype of the checkpoint (auto = the HF tensors' dtype)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_hf_to_mcore)

    b = sub.add_parser("mcore-to-hf", help="megatron-core checkpoint (from hf-to-mcore or training) -> HF directory")
    b.add_argument("--mcore", required=True, help="checkpoint directory with xtoken_model.json")
    b.add_argument("--out", required=True, help="new (or empty) output directory")
    b.add_argument(
        "--like",
        default=None,
        help="the original HF directory: config.json, tokenizer and generation files are copied from it",
    )
    b.add_argument(
        "--dtype", type=_dtype_arg, default="auto", help="dtype of the written tensors (auto = the checkpoint's)"
    )
    b.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size limit in GiB; default 2")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_mcore_to_hf)
    return p


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Add `score` (per-token log-probs from a megatron-core checkpoint) to a subparsers object."""
    p = subparsers.add_parser("score", help="per-token log-probabilities of a text under a megatron-core checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory with xtoken_model.json")
    p.add_argument("--tokenizer", required=True, help="built-in name (llama3, qwen3, phi4mini) or tokenizer path")
    p.add_argument("--text", required=True, help="text to score")
    p.add_argument(
        "--bos",
        choices=("default", "yes", "no"),
        default="default",
        help="prepend BOS (default: the tokenizer family's convention)",
    )
    p.add_argument("--json", action="store_true", help="print JSON with tokens and logprobs lists")
    p.set_defaults(func=cmd_score)
    return p
