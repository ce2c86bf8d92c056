"""Checks a recipe passes before anything is submitted: the config's own rules (batch layout,
modes, alphas), then the files it names (checkpoints, W, prefix supports, data) and that every W
and prefix support was built from exactly the student's and that teacher's tokenizers."""

from __future__ import annotations

from pathlib import Path

from xtoken_nemo.distill.config import DistillConfig
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.vocab import ProjectionMatrix
from xtoken_nemo.vocab.prefix_support import PrefixSupport


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
        if tc.support:
            student_tok = student_tok or load_tokenizer(cfg.student.tokenizer)
            problems += _support_problems(f"teachers.{i} ({tc.name})", tc, cfg.student.tokenizer, student_tok)
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


def _support_problems(where: str, tc, student_name: str, student_tok) -> list[str]:
    """A jkl teacher's prefix-support file: present and built from these tokenizers."""
    command = f"`xtoken build-support --student {student_name} --teacher {tc.model.tokenizer} --out {tc.support}`"
    if not Path(tc.support).is_file():
        return [f"{where}: prefix-support file {tc.support} missing: {command}"]
    try:
        PrefixSupport.load(tc.support, student_tok, load_tokenizer(tc.model.tokenizer))
    except Exception as exc:  # the loader's message says which tokenizer differs
        return [
            f"{where}: prefix-support file {tc.support} does not fit tokenizers "
            f"{student_name} -> {tc.model.tokenizer}: {exc}; rebuild it with {command}"
        ]
    return []
