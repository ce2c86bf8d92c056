"""Inputs of the ``cpu-tiny`` recipe: tiny random checkpoints (as `xtoken init-model`), W files
(as `xtoken build-w`) and a preprocessed synthetic corpus (as `xtoken preprocess`), written under
``<root>/cpu-tiny``. Idempotent: what exists is kept."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
from xtoken_nemo.data.synthetic import documents as synthetic_documents
from xtoken_nemo.distill.config import KDMode, ModelConfig
from xtoken_nemo.distill.model_setup import save_random_checkpoint
from xtoken_nemo.models.runtime import ensure_model_parallel
from xtoken_nemo.recipes.cpu_tiny import SEQ_LENGTH, TEACHERS, TINY
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.vocab.build import build_projection_matrix

log = logging.getLogger(__name__)


def prepare_cpu_tiny(root: str | Path, documents: int = 60, progress: bool = False) -> dict:
    base = Path(root).expanduser().resolve() / "cpu-tiny"
    written = {}
    student = load_tokenizer("llama3")
    models = [("llama3-tiny-student", "llama3", "llama", 100)] + [
        (f"{name}-tiny", tok, family, 101 + i) for i, (name, tok, family, _, _) in enumerate(TEACHERS)
    ]
    for name, tok, family, seed in models:
        out = base / "ckpt" / name
        if not (out / "xtoken_model.json").is_file():
            ensure_model_parallel(1)
            mc = ModelConfig(tokenizer=tok, family=family, init_seed=seed, **TINY)
            save_random_checkpoint(mc, load_tokenizer(tok).vocab_size, str(out), pad_for_tp=2)
            written[f"ckpt/{name}"] = str(out)
    for _, tok, _, mode, _ in TEACHERS:
        if not KDMode(mode).needs_projection:
            continue
        out = base / "w" / f"W_llama3_{tok}.safetensors"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            build_projection_matrix(student, load_tokenizer(tok), progress=progress).save(out)
            written[f"w/{out.name}"] = str(out)
    data = base / "data"
    if not (data / "manifest.json").is_file():
        corpus = base / "corpus.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(
            "\n".join(json.dumps({"text": t}) for t in synthetic_documents(documents, seed=5, max_sentences=12))
        )
        teachers = list(dict.fromkeys(tok for _, tok, _, _, _ in TEACHERS))
        preprocess(
            PreprocessConfig(
                inputs=[str(corpus)],
                student="llama3",
                teachers=teachers,
                out=str(data),
                seq_length=SEQ_LENGTH,
                progress=progress,
            )
        )
        written["data"] = str(data)
    log.info("cpu-tiny inputs under %s (new: %s)", base, sorted(written))
    return {"root": str(base), "written": written}
