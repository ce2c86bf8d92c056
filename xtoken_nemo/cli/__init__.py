"""The ``xtoken`` command line: the top layer, which nothing in the library imports.

One module per group of commands (``vocab``: build-w, audit, inspect-w; ``align``; ``data``:
preprocess; ``models``: convert, score; ``train``: train, export, init-model; ``recipes``: recipes,
prepare-cpu-tiny; ``launch``; ``evaluate``: eval, report; ``demo``), each adding its subcommands
to the parser here. Library code logs; only this package prints.

The command modules import the library inside the functions that run a command, on purpose:
``main`` configures logging and warning filters before torch and megatron load (``xtoken train``
installs its preemption handler before that), and ``xtoken --help`` stays fast (no torch). The
rest of the package imports our modules at the top of a file (docs/architecture.md, "Imports")."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from xtoken_nemo.cli.align import add_align_parser
from xtoken_nemo.cli.data import add_preprocess_parser
from xtoken_nemo.cli.demo import add_demo_parser
from xtoken_nemo.cli.evaluate import add_eval_parser
from xtoken_nemo.cli.launch import add_launch_parser
from xtoken_nemo.cli.models import add_convert_parser, add_score_parser
from xtoken_nemo.cli.recipes import add_recipes_parser
from xtoken_nemo.cli.train import add_train_parser
from xtoken_nemo.cli.vocab import add_vocab_parsers
from xtoken_nemo.errors import XTokenError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtoken", description="Cross-tokenizer knowledge distillation (X-Token) on megatron-core"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log DEBUG for xtoken, INFO for libraries (default: INFO for xtoken, WARNING for libraries)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_vocab_parsers(sub)
    add_align_parser(sub)
    add_preprocess_parser(sub)
    add_convert_parser(sub)
    add_score_parser(sub)
    add_train_parser(sub)
    add_recipes_parser(sub)
    add_launch_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    return parser


# Third-party warnings a normal run prints, filtered precisely: (category, module regex, message
# regex), the module being the one the warning is attributed to. Each is harmless for us:
KNOWN_WARNINGS = (
    # torch.distributed.checkpoint wraps tensors in a ShardedTensor while megatron's
    # dist_checkpointing loads a checkpoint; torch's own internals, nothing we call or can change.
    # On CPU the warning is attributed to the frame of our CUDA->CPU TorchFunctionMode.
    (
        FutureWarning,
        r"(torch\.distributed\.|xtoken_nemo\.compat\.cuda_redirect\Z)",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
    ),
    # megatron-core 0.16's torch strategy calls torch.distributed.checkpoint.load_state_dict; a
    # rename in torch, same behaviour; megatron's code, not ours.
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r"`load_state_dict` is deprecated and will be removed"),
    # CPU / no-apex installs: megatron falls back to torch norms, optimizers and multi-tensor
    # helpers; the trainer logs its own one-line warning about the optimizer it picks. On the GPU
    # container TE/apex are present and these never fire.
    (UserWarning, r"megatron\.core\.", r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to "),
    # megatron-core 0.16.1's own TransformerConfig default (cuda_graph_scope="full") warns about
    # itself in __post_init__; it is converted to the new spelling (empty list). No CUDA graphs used.
    (
        UserWarning,
        r"megatron\.core\.transformer\.transformer_config\Z",
        r"full scope is deprecated\. Use empty cuda_graph_scope",
    ),
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
    handler.setFormatter(
        logging.Formatter(f"{prefix}[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    )
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
