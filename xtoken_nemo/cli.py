"""`xtoken` command line. Library code logs; only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from xtoken_nemo.errors import XTokenError


def _load(name: str):
    from xtoken_nemo.tokenizers import load_tokenizer

    return load_tokenizer(name)


def cmd_build_w(args: argparse.Namespace) -> int:
    from xtoken_nemo.vocab.build import BuildConfig, build_projection_matrix

    student, teacher = _load(args.student), _load(args.teacher)
    config = BuildConfig(beta=args.beta, gamma=args.gamma, max_pieces=args.max_pieces, top_k=args.top_k, long_rows=args.long_rows)
    W = build_projection_matrix(student, teacher, config, progress=not args.quiet)
    W.save(args.out)
    stats = W.builder_stats()
    if args.json:
        print(json.dumps({"out": str(args.out), "shape": list(W.shape), "stats": stats}))
        return 0
    pieces = ", ".join(f"{k} pieces: {v:,}" for k, v in stats["multi_token_rows"].items())
    print(f"W {student.name} -> {teacher.name}: shape {W.shape[0]:,} x {W.shape[1]:,}, nnz {stats['nnz']:,}, written to {args.out}")
    print(f"  exact rows        {stats['exact_rows']:,}  (+ {stats['special_rows']} special tokens matched by role/content)")
    print(f"  multi-token rows  {sum(stats['multi_token_rows'].values()):,}  ({pieces})")
    print(f"  byte-fragment rows {stats['byte_rows']:,}  (non-UTF-8 pieces, greedy byte match)")
    print(f"  rows > {config.max_pieces} pieces  {stats['long_rows']:,}  (policy: {stats['long_rows_policy']})")
    print(f"  zero rows         {stats['zero_rows']:,}  (incl. {stats['unmatched_special_rows']} special tokens with no counterpart)")
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
    print(json.dumps({"shape": list(W.shape), "nnz": W.nnz, **meta, "builder": json.loads(W.metadata.get("builder", "{}")), "stats": W.builder_stats()}, indent=2))
    for text in args.token or []:
        if student is None or teacher is None:
            raise XTokenError("--token needs --student and --teacher to turn text into ids")
        ids = student.encode(text, add_bos=False).ids
        if len(ids) != 1:
            print(f"{text!r} is {len(ids)} student tokens, not one: {[student.token_text(i) for i in ids]}")
            continue
        row = {teacher.token_text(t): round(w, 4) for t, w in W.row(ids[0]).items()}
        print(f"{text!r} (student id {ids[0]}) -> {row}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtoken", description="Cross-tokenizer knowledge distillation (X-Token) on megatron-core")
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG for xtoken, INFO for libraries (default: INFO for xtoken, WARNING for libraries)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-w", help="build the projection matrix W from two tokenizers")
    p.add_argument("--student", required=True, help="built-in name (llama3, qwen3, phi4mini, o200k) or tokenizer path")
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--max-pieces", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--long-rows", choices=("zero", "truncate"), default="zero",
                   help="rows needing more than --max-pieces teacher pieces: zero (paper) or keep the first pieces")
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

    from xtoken_nemo.align.cli import add_align_parser
    from xtoken_nemo.data.cli import add_preprocess_parser
    from xtoken_nemo.distill.cli import add_train_parser
    from xtoken_nemo.models.cli import add_convert_parser, add_score_parser

    add_align_parser(sub)
    add_preprocess_parser(sub)
    add_convert_parser(sub)
    add_score_parser(sub)
    add_train_parser(sub)
    from xtoken_nemo.recipes.cli import add_recipes_parser; add_recipes_parser(sub)  # noqa: E702
    from xtoken_nemo.launcher.cli import add_launch_parser; add_launch_parser(sub)  # noqa: E702
    from xtoken_nemo.evaluation.cli import add_eval_parser; add_eval_parser(sub)  # noqa: E702
    from xtoken_nemo.demo.cli import add_demo_parser
    add_demo_parser(sub)
    return parser


# Third-party warnings a normal run prints, filtered precisely: (category, module regex, message
# regex), the module being the one the warning is attributed to. Each is harmless for us:
KNOWN_WARNINGS = (
    # torch.distributed.checkpoint wraps tensors in a ShardedTensor while megatron's
    # dist_checkpointing loads a checkpoint; torch's own internals, nothing we call or can change.
    # On CPU the warning is attributed to the frame of our CUDA->CPU TorchFunctionMode.
    (FutureWarning, r"(torch\.distributed\.|xtoken_nemo\.compat\.cuda_redirect\Z)",
     r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # megatron-core 0.16's torch strategy calls torch.distributed.checkpoint.load_state_dict; a
    # rename in torch, same behaviour; megatron's code, not ours.
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r"`load_state_dict` is deprecated and will be removed"),
    # CPU / no-apex installs: megatron falls back to torch norms, optimizers and multi-tensor
    # helpers; the trainer logs its own one-line warning about the optimizer it picks. On the GPU
    # container TE/apex are present and these never fire.
    (UserWarning, r"megatron\.core\.", r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to "),
    # megatron-core 0.16.1's own TransformerConfig default (cuda_graph_scope="full") warns about
    # itself in __post_init__; it is converted to the new spelling (empty list). No CUDA graphs used.
    (UserWarning, r"megatron\.core\.transformer\.transformer_config\Z", r"full scope is deprecated\. Use empty cuda_graph_scope"),
)

_CONSOLE_HANDLER = "_xtoken_console"


def configure_console(verbose: bool = False, rank: int | None = None, stream=None) -> None:
    """Logging and warnings of an ``xtoken`` process (called first thing in :func:`main`).

    - ``xtoken_nemo.*`` loggers at INFO (DEBUG with ``verbose``), everything else at WARNING (INFO
      with ``verbose``); lines ``[YYYY-mm-dd HH:MM:SS] LEVEL logger: message`` on stderr.
    - rank (default: ``$RANK``, 0 when unset) other than 0: our loggers at ERROR, lines prefixed
      ``[rank N]``, and no Python warnings at all: rank 0 says what every rank would repeat.
    - rank 0: the known third-party warnings (:data:`KNOWN_WARNINGS`) are filtered, unless the user
      asked for warnings explicitly (``-W`` / ``PYTHONWARNINGS``), which then apply unchanged.
    """
    if rank is None:
        try:
            rank = int(os.environ.get("RANK") or 0)
        except ValueError:
            rank = 0
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _CONSOLE_HANDLER, False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _CONSOLE_HANDLER, True)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"{prefix}[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    ours = logging.DEBUG if verbose else logging.INFO
    logging.getLogger("xtoken_nemo").setLevel(ours if rank == 0 else logging.ERROR)

    if rank != 0:
        warnings.simplefilter("ignore")
        return
    if sys.warnoptions:
        return
    for category, module, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _verbose_flag(argv: list[str]) -> bool:
    """-v/--verbose among the options before the subcommand (read before the parser imports anything)."""
    for arg in argv:
        if arg in ("-v", "--verbose"):
            return True
        if not arg.startswith("-"):
            return False
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_console(verbose=_verbose_flag(argv))  # before any subcommand imports torch/megatron
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except XTokenError as exc:
        print(f"xtoken {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
