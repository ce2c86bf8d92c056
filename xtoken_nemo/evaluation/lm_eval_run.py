"""``xtoken eval``: export a run's student to Hugging Face format and score it with lm-eval.

lm-eval (``pip install lm-eval``; an optional dependency: it does not change torch) loads the
exported directory with transformers (``model="hf"``). Tokenizer files come from ``--like`` (the
student's original HF directory) or, for a tokenizer.json-based student tokenizer (the built-in
``llama3`` or a path), are written beside the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xtoken_nemo.distill.run_checkpoints import latest_checkpoint
from xtoken_nemo.errors import XTokenError
from xtoken_nemo.models.convert import mcore_to_hf
from xtoken_nemo.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

PAPER_TASKS = ("mmlu", "gsm8k", "hendrycks_math", "winogrande", "hellaswag")
# the metric the paper's table reports for each task (lm-eval "metric,filter" keys)
PRIMARY_METRIC = {
    "mmlu": ("acc", "none"),
    "gsm8k": ("exact_match", "strict-match"),
    "hendrycks_math": ("exact_match", "none"),
    "winogrande": ("acc", "none"),
    "hellaswag": ("acc_norm", "none"),
}
RESULTS_FILE = "results.json"


class EvalError(XTokenError):
    """lm-eval is missing or an evaluation cannot run."""


@dataclass
class EvalConfig:
    checkpoint: str  # a run's checkpoint dir (latest iteration) or an iter_N dir
    tasks: tuple[str, ...] = PAPER_TASKS
    num_fewshot: int = 3
    out: str | None = None  # default: <run dir>/eval
    like: str | None = None
    include_path: str | None = None  # a directory of custom task YAMLs
    limit: float | None = None
    batch_size: int | str = 1
    device: str | None = None
    dtype: str | None = None
    seed: int = 1234


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory for a checkpoint path: runs/NAME for runs/NAME/checkpoints[/iter_N]."""
    path = Path(checkpoint).resolve()
    if path.name.startswith("iter_"):
        path = path.parent
    return path.parent if path.name == "checkpoints" else path


def write_tokenizer(tokenizer_spec: str, out_dir: Path) -> None:
    """Tokenizer files for transformers' AutoTokenizer beside an exported model."""
    tok = load_tokenizer(tokenizer_spec)
    path = Path(tokenizer_spec)
    if path.is_dir():
        copied = [p for p in path.iterdir() if p.name.startswith(("tokenizer", "special_tokens_map")) and p.is_file()]
        for p in copied:
            shutil.copy2(p, out_dir / p.name)
        if copied:
            return
    rust = getattr(tok, "_tok", None)
    if path.suffix == ".json" and path.is_file():
        shutil.copy2(path, out_dir / "tokenizer.json")
    elif rust is not None and hasattr(rust, "to_str"):
        (out_dir / "tokenizer.json").write_text(rust.to_str())
    else:
        raise EvalError(
            f"cannot write HF tokenizer files for tokenizer '{tokenizer_spec}': "
            "give --like with the student's HF directory"
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    for role in ("bos", "eos", "pad", "unk"):
        tid = tok.special_ids.get(role)
        if tid is not None:
            config[f"{role}_token"] = tok.token_text(tid)
    if "pad_token" not in config and "eos_token" in config:
        config["pad_token"] = config["eos_token"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_student(checkpoint: str | Path, out_dir: Path, like: str | None = None, dtype: str | None = None) -> dict:
    """Export the newest checkpoint (same code path as `xtoken export`) plus tokenizer files."""
    source = latest_checkpoint(checkpoint)
    mcore_to_hf(source, out_dir, like=like, dtype=dtype)
    run_config = {}
    if (source / "run_config.json").is_file():
        run_config = json.loads((source / "run_config.json").read_text())
    if like is None:
        tokenizer = run_config.get("student", {}).get("tokenizer")
        if not tokenizer:
            raise EvalError(f"{source} has no run_config.json naming the student tokenizer: give --like")
        write_tokenizer(tokenizer, out_dir)
    return {"iteration_dir": str(source), "run_config": run_config}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("lm-eval is not installed: `pip install lm-eval` (it keeps the installed torch)") from None
    return lm_eval


def primary_metric(task: str, metrics: dict) -> tuple[str, float] | None:
    """(name, value) of a task's reported metric from lm-eval's ``results[task]``."""
    wanted = PRIMARY_METRIC.get(task)
    if wanted is not None:
        for key in (f"{wanted[0]},{wanted[1]}", f"{wanted[0]},flexible-extract", wanted[0]):
            if isinstance(metrics.get(key), (int, float)):
                return key, float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in key and key != "alias" and not key.startswith("sample"):
            return key, float(value)
    return None


def evaluate(cfg: EvalConfig, progress: bool = False) -> dict:
    """Export, run lm-eval, write ``<out>/results.json``; returns that summary."""
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    out = Path(cfg.out) if cfg.out else run_dir_of(cfg.checkpoint) / "eval"
    hf_dir = out / "hf"
    if hf_dir.is_dir():  # our own export of an earlier evaluation: replace it
        shutil.rmtree(hf_dir)
    exported = export_student(cfg.checkpoint, hf_dir, like=cfg.like, dtype=cfg.dtype)
    if cfg.include_path:  # local task files: never reach for the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task_manager = TaskManager(include_path=cfg.include_path) if cfg.include_path else TaskManager()
    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(hf_dir),
            "dtype": cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        },
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=device,
        limit=cfg.limit,
        task_manager=task_manager,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        log_samples=False,
    )
    tasks = {}
    for task in cfg.tasks:
        found = primary_metric(task, raw["results"].get(task, {}))
        if found is None:
            raise EvalError(f"lm-eval returned no metric for task '{task}' (results: {sorted(raw['results'])})")
        tasks[task] = {"metric": found[0], "value": found[1]}
    summary = {
        "name": exported["run_config"].get("name", run_dir_of(cfg.checkpoint).name),
        "checkpoint": exported["iteration_dir"],
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "tasks": tasks,
        "lm_eval": {"results": raw["results"], "versions": raw.get("versions", {}), "n-shot": raw.get("n-shot", {})},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(summary, indent=2, default=str))
    log.info("wrote %s", out / RESULTS_FILE)
    return summary
