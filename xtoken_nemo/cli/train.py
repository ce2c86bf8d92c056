"""`xtoken train`, `xtoken export` and `xtoken init-model`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run_config(args: argparse.Namespace):
    from xtoken_nemo.distill.config import ConfigError, apply_overrides, config_from_dict

    if getattr(args, "recipe", None):  # a named recipe (xtoken recipes); paths from $XTOKEN_ROOT
        from xtoken_nemo.recipes import get_recipe, normalize_overrides

        return apply_overrides(get_recipe(args.recipe).config(), normalize_overrides(args.overrides))
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    return apply_overrides(config_from_dict(data), args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from xtoken_nemo.distill.preemption import PreemptionFlag

    # before torch/megatron are imported and the models load (minutes at the paper's sizes): a
    # SIGUSR1/SIGTERM from SLURM in that window is remembered and honoured after the first step
    preemption = PreemptionFlag().install()
    try:
        cfg = load_run_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from xtoken_nemo.distill.trainer import Trainer

        trainer = Trainer(cfg, progress=not args.quiet, preemption=preemption)
        try:
            summary = trainer.run()
            if trainer.rank == 0:
                last = summary["history"][-1] if summary["history"] else {}
                shown = {
                    k: float(f"{v:.4g}")
                    for k, v in last.items()
                    if isinstance(v, float) and k in ("total", "ce", "kd", "grad_norm", "lr")
                }
                print(
                    f"{cfg.name}: {summary['status']} at step {summary['step']}/{cfg.train.train_steps}"
                    f" (skipped {summary['skipped_steps']} non-finite steps); last step {shown}; "
                    f"checkpoints in {cfg.checkpoint.dir}"
                )
        finally:
            trainer.close()
    finally:
        preemption.uninstall()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from xtoken_nemo.distill.run_checkpoints import latest_checkpoint
    from xtoken_nemo.models.convert import mcore_to_hf

    source = latest_checkpoint(args.checkpoint)
    files = mcore_to_hf(source, args.out, like=args.like, dtype=args.dtype, progress=not args.quiet)
    print(f"exported the student of {source} to {args.out} ({len(files)} safetensors file(s))")
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from xtoken_nemo.distill.config import ModelConfig
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel
    from xtoken_nemo.tokenizers import load_tokenizer

    mc = ModelConfig(
        tokenizer=args.tokenizer,
        family=args.family,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        tie_embeddings=not args.untied,
        init_seed=args.seed,
    )
    ensure_model_parallel(1)
    save_random_checkpoint(mc, load_tokenizer(args.tokenizer).vocab_size, args.out, pad_for_tp=args.pad_for_tp)
    print(
        f"wrote a random {args.family} model ({args.num_layers} layers, hidden {args.hidden_size}) "
        f"for tokenizer {args.tokenizer} to {args.out}"
    )
    return 0


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="distill a student from its teachers (one process, or under torchrun)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a run config JSON: any subset of the fields --print-config shows")
    source.add_argument("--recipe", help="a named recipe (`xtoken recipes`); its paths come from $XTOKEN_ROOT")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.train_steps=20 teachers.0.alpha=0.8")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (progress lines are logged either way when stderr is not a terminal)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a run's student as a Hugging Face checkpoint")
    p.add_argument(
        "--checkpoint", required=True, help="a run's checkpoint dir (its latest iteration is used) or an iter_N dir"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--like", help="the student's original HF directory (config and tokenizer files are copied)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("init-model", help="write a randomly initialized model checkpoint (tiny CPU runs, tests)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--family", choices=("llama", "qwen3", "phi3"), default="llama")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int)
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--untied", action="store_true", help="separate output layer (default: tied to the embedding)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--pad-for-tp", type=int, default=8, help="pad the vocab so the model loads at TP sizes dividing this"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init_model)
