"""Checks a recipe passes before anything is submitted: the config's own rules (batch layout,
modes, alphas), then the files it names (checkpoints, W, data) and that every W was built from
exactly the student's and that teacher's tokenizers."""

from __future__ import annotations

from pathlib import Path

from xtoken_nemo.distill.config import DistillConfig
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.vocab import ProjectionMatrix


def check_files(cfg: DistillConfig) -> list[str]:
    """Problems with the files a run needs, one sentence each (empty: all present and consistent)."""
    problems: list[str] = []
    models = [("student", cfg.student)] + [(f"teachers.{i} ({t.name})", t.model) for i, t in enumerate(cfg.teachers)]
    for where, mc in models:
        if mc.checkpoint and not (Path(mc.checkpoint) / "xtoken_model.json").is_file():
            problems.append(
                f"{where}: checkpoint {mc.checkpoint} missing (no xtoken_model.json): "
                f"`xtoken convert hf-to-mcore --hf HF_DIR --out {mc.checkpoint} --tp 8`"
            )
    for path in cfg.data.paths:
        if not (Path(path) / "manifest.json").is_file():
            problems.append(
                f"data: {path} is not a preprocessed dataset (no manifest.json): "
                f"run `xtoken preprocess ... --out {path}`"
            )
    student_tok = None
    for i, tc in enumerate(cfg.teachers):
        if not tc.needs_projection or not tc.projection:
            continue
        where = f"teachers.{i} ({tc.name})"
        command = (
            f"`xtoken build-w --student {cfg.student.tokenizer} --teacher {tc.model.tokenizer} --out {tc.projection}`"
        )
        if not Path(tc.projection).is_file():
            problems.append(f"{where}: W file {tc.projection} missing: {command}")
            continue
        try:
            student_tok = student_tok or load_tokenizer(cfg.student.tokenizer)
            ProjectionMatrix.load(tc.projection, student_tok, load_tokenizer(tc.model.tokenizer))
        except Exception as exc:  # the loader's message says which tokenizer differs
            problems.append(
                f"{where}: W file {tc.projection} does not fit tokenizers "
                f"{cfg.student.tokenizer} -> {tc.model.tokenizer}: {exc}; rebuild it with {command}"
            )
    return problems
