"""``xtoken build-w``, ``xtoken audit``, ``xtoken inspect-w``: W and the coverage audit;
``xtoken build-support`` and ``xtoken inspect-support``: J-KL's prefix support."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from xtoken_nemo.errors import XTokenError


def _load(name: str):
    from xtoken_nemo.tokenizers import load_tokenizer

    return load_tokenizer(name)


def cmd_build_w(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab.build import BuildConfig, build_projection_matrix

    student, teacher = _load(args.student), _load(args.teacher)
    config = BuildConfig(
        beta=args.beta, gamma=args.gamma, max_pieces=args.max_pieces, top_k=args.top_k, long_rows=args.long_rows
    )
    W = build_projection_matrix(student, teacher, config, progress=not args.quiet)
    W.save(args.out)
    stats = W.builder_stats()
    if args.json:
        print(json.dumps({"out": str(args.out), "shape": list(W.shape), "stats": stats}))
        return 0
    pieces = ", ".join(f"{k} pieces: {v:,}" for k, v in stats["multi_token_rows"].items())
    print(
        f"W {student.name} -> {teacher.name}: shape {W.shape[0]:,} x {W.shape[1]:,}, nnz {stats['nnz']:,}, "
        f"written to {args.out}"
    )
    print(
        f"  exact rows        {stats['exact_rows']:,}  "
        f"(+ {stats['special_rows']} special tokens matched by role/content)"
    )
    print(f"  multi-token rows  {sum(stats['multi_token_rows'].values()):,}  ({pieces})")
    print(f"  byte-fragment rows {stats['byte_rows']:,}  (non-UTF-8 pieces, greedy byte match)")
    print(f"  rows > {config.max_pieces} pieces  {stats['long_rows']:,}  (policy: {stats['long_rows_policy']})")
    print(
        f"  zero rows         {stats['zero_rows']:,}  "
        f"(incl. {stats['unmatched_special_rows']} special tokens with no counterpart)"
    )
    print(f"  time              {stats['seconds']:.2f} s")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab.audit import audit, plot_audits

    student = _load(args.student)
    reports = [audit(student, _load(t)) for t in args.teacher]
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_audits(reports, args.plot)
    if args.json:
        out = reports[0].to_json() if len(reports) == 1 else {"teachers": {r.teacher: r.to_json() for r in reports}}
        print(json.dumps(out, indent=2))
    else:
        print("\n\n".join(r.to_text() for r in reports))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def cmd_inspect_w(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab import ProjectionMatrix

    student = _load(args.student) if args.student else None
    teacher = _load(args.teacher) if args.teacher else None
    W = ProjectionMatrix.load(args.w, student, teacher)
    meta = {k: v for k, v in W.metadata.items() if k not in ("stats", "builder")}
    print(
        json.dumps(
            {
                "shape": list(W.shape),
                "nnz": W.nnz,
                **meta,
                "builder": json.loads(W.metadata.get("builder", "{}")),
                "stats": W.builder_stats(),
            },
            indent=2,
        )
    )
    for text, sid in _single_tokens(args.token, student, teacher):
        row = {teacher.token_text(t): round(w, 4) for t, w in W.row(sid).items()}
        print(f"{text!r} (student id {sid}) -> {row}")
    return 0


def _single_tokens(texts: list[str] | None, student, teacher) -> Iterator[tuple[str, int]]:
    """(text, student id) of each ``--token`` text that is one student token; a line for each that
    is not. ``--token`` needs both tokenizers (an error otherwise)."""
    for text in texts or []:
        if student is None or teacher is None:
            raise XTokenError("--token needs --student and --teacher to turn text into ids")
        ids = student.encode(text, add_bos=False).ids
        if len(ids) != 1:
            print(f"{text!r} is {len(ids)} student tokens, not one: {[student.token_text(i) for i in ids]}")
            continue
        yield text, ids[0]


def cmd_build_support(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab.prefix_support import build_prefix_support

    student, teacher = _load(args.student), _load(args.teacher)
    support = build_prefix_support(student, teacher, progress=not args.quiet)
    support.save(args.out)
    stats = support.stats()
    if args.json:
        print(json.dumps({"out": str(args.out), "stats": stats}))
        return 0
    by_pieces = sorted(stats["entries_by_pieces"].items(), key=lambda kv: int(kv[0]))
    pieces = ", ".join(f"{k} pieces: {v:,}" for k, v in by_pieces)
    print(
        f"prefix support {student.name} -> {teacher.name}: {stats['entries']:,} student tokens under "
        f"{stats['prefixes']:,} teacher prefixes ({pieces}); largest row {stats['largest_row']}; "
        f"{stats['seconds']:.2f} s; written to {args.out}"
    )
    return 0


def support_row_text(support, student, teacher, text: str, sid: int) -> str:
    """One line: the teacher pieces of student token ``text`` (id ``sid``) and the support under its prefix."""
    pieces = teacher.encode_batch([text])[0]
    shown = [teacher.token_text(t) for t in pieces]
    if len(pieces) < 2:
        return f"{text!r} (student id {sid}) is one teacher piece {shown}: no joint chunk, P-KL only"
    row = support.entries(tuple(pieces[:-1]))
    tokens = sorted(student.token_text(v) for _, v in row)
    return (
        f"{text!r} (student id {sid}) = teacher pieces {shown}; under prefix {shown[:-1]}: "
        f"{len(tokens)} student tokens {tokens}"
    )


def cmd_inspect_support(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab.prefix_support import PrefixSupport

    student = _load(args.student) if args.student else None
    teacher = _load(args.teacher) if args.teacher else None
    support = PrefixSupport.load(args.support, student, teacher)
    meta = {k: v for k, v in support.metadata.items() if k != "stats"}
    print(json.dumps({**meta, "stats": support.stats()}, indent=2))
    for text, sid in _single_tokens(args.token, student, teacher):
        print(support_row_text(support, student, teacher, text, sid))
    return 0


def add_vocab_parsers(sub) -> None:
    p = sub.add_parser("build-w", help="build the projection matrix W from two tokenizers")
    p.add_argument("--student", required=True, help="built-in name (llama3, qwen3, phi4mini, o200k) or tokenizer path")
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--max-pieces", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument(
        "--long-rows",
        choices=("zero", "truncate"),
        default="zero",
        help="rows needing more than --max-pieces teacher pieces: zero (paper) or keep the first pieces",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_w)

    p = sub.add_parser("audit", help="coverage audit of the strict common set and the recommended loss")
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True, action="append", help="repeat for several teachers")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a bar chart (PNG)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("inspect-w", help="print a W file's metadata and build summary; check it against tokenizers")
    p.add_argument("w", type=Path)
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--token", action="append", help="show W's row for this student token text")
    p.set_defaults(func=cmd_inspect_w)

    p = sub.add_parser(
        "build-support", help="build J-KL's prefix support: student tokens by the teacher prefix they extend"
    )
    p.add_argument("--student", required=True, help="built-in name (llama3, qwen3, phi4mini, o200k) or tokenizer path")
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build_support)

    p = sub.add_parser("inspect-support", help="print a prefix-support file's summary and rows; check its tokenizers")
    p.add_argument("support", type=Path)
    p.add_argument("--student")
    p.add_argument("--teacher")
    p.add_argument("--token", action="append", help="show the support row of this student token text")
    p.set_defaults(func=cmd_inspect_support)
