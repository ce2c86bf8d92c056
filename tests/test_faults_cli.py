"""Faults a user meets at the console: a preprocessed dataset whose .bin/.idx is cut short (one
line naming the file and how to rebuild it, not a numpy error deep in training), and the console
of `xtoken train` (our loggers at INFO with timestamps, rank 0 only; known third-party warnings
filtered precisely; a real tiny run prints no FutureWarning/UserWarning)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from xtoken_nemo.data.errors import DataError

SEQ = 32
TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two SentencePiece tokenizers (student BPE, teacher unigram) and a corpus preprocessed for them."""
    import sentencepiece as spm

    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
    from xtoken_nemo.data.synthetic import documents

    root = tmp_path_factory.mktemp("faults")
    docs = documents(80, seed=3)
    (root / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    paths = {}
    for name, size, kind in (("student", 800, "bpe"), ("teacher", 600, "unigram")):
        spm.SentencePieceTrainer.train(
            input=str(root / "corpus.txt"),
            model_prefix=str(root / name),
            vocab_size=size,
            model_type=kind,
            byte_fallback=True,
            character_coverage=0.995,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=3,
            minloglevel=2,
        )
        paths[name] = str(root / f"{name}.model")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in docs))
    data = root / "data"
    preprocess(
        PreprocessConfig(
            inputs=[str(jsonl)],
            student=paths["student"],
            teachers=[paths["teacher"], paths["student"]],
            out=str(data),
            seq_length=SEQ,
            progress=False,
        )
    )
    return {"root": root, "data": data, "jsonl": jsonl, **paths}


# ---------------------------------------------------------------------------------------------
# Task 1: a .bin / .idx shorter than its index / header says
# ---------------------------------------------------------------------------------------------
def _copy(tiny, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(tiny["data"], out)
    return out


def _cut(path: Path, nbytes: int) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - nbytes)
    return size


def _open_like_the_trainer(path: Path):
    from xtoken_nemo.distill.batches import build_dataset
    from xtoken_nemo.distill.config import DataConfig, DistillConfig

    cfg = DistillConfig(data=DataConfig(paths=[str(path)], seq_length=SEQ))
    return build_dataset(cfg, None, None)


def test_intact_dataset_opens(tiny):
    ds = _open_like_the_trainer(tiny["data"])
    assert len(ds) > 0 and ds[len(ds) - 1]["tokens"].shape == (SEQ,)


def test_data_shorter_than_one_window_is_a_one_line_error(tiny):
    from xtoken_nemo.distill.batches import build_dataset
    from xtoken_nemo.distill.config import DataConfig, DistillConfig

    cfg = DistillConfig(data=DataConfig(paths=[str(tiny["data"])], seq_length=10**9))
    with pytest.raises(DataError) as info:
        build_dataset(cfg, None, None)
    msg = str(info.value)
    assert "\n" not in msg and "fewer tokens than one window" in msg and "data.seq_length" in msg


@pytest.mark.parametrize("name", ["student.bin", "teacher0.bin", "teacher0.chunks.bin"])
def test_truncated_bin_is_a_one_line_error_naming_the_file(tiny, tmp_path, name):
    data = _copy(tiny, tmp_path)
    size = _cut(data / name, 6)
    with pytest.raises(DataError) as info:
        _open_like_the_trainer(data)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{data / name} is truncated" in msg
    assert f"expected {size:,} bytes" in msg and f"found {size - 6:,}" in msg
    assert (
        f"delete {data} and rebuild it with `xtoken preprocess --input {tiny['jsonl']} --student {tiny['student']}"
        in msg
    )
    assert f"--teacher {tiny['teacher']} --teacher {tiny['student']} --seq-length {SEQ} --out {data}`" in msg


@pytest.mark.parametrize("name,cut", [("student.idx", 8), ("teacher0.chunks.idx", 3), ("teacher0.idx", 10_000)])
def test_cut_idx_is_a_one_line_error_naming_the_file(tiny, tmp_path, name, cut):
    data = _copy(tiny, tmp_path)
    _cut(data / name, min(cut, (data / name).stat().st_size))
    with pytest.raises(DataError) as info:
        _open_like_the_trainer(data)
    msg = str(info.value)
    assert "\n" not in msg and f"{data / name} is truncated" in msg and "xtoken preprocess" in msg


def test_bin_disagreeing_with_the_manifest(tiny, tmp_path):
    data = _copy(tiny, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["student"]["tokens"] += 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"student\.idx holds [\d,]+ tokens, manifest\.json says"):
        _open_like_the_trainer(data)


def test_cut_shard_is_caught_at_the_merge_and_redone_after_deleting_it(tiny, tmp_path):
    from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        inputs=[str(tiny["jsonl"])],
        student=tiny["student"],
        teachers=[tiny["teacher"]],
        out=str(tmp_path / "out"),
        seq_length=SEQ,
        docs_per_shard=40,
        progress=False,
        keep_shards=True,
    )
    preprocess(cfg)
    shard = tmp_path / "out" / "shards" / "shard-000001"
    (tmp_path / "out" / "manifest.json").unlink()
    _cut(shard / "teacher0.bin", 4)
    with pytest.raises(DataError) as info:
        preprocess(cfg)
    msg = str(info.value)
    assert "\n" not in msg and f"{shard / 'teacher0.bin'} is truncated" in msg and f"delete {shard}" in msg
    shutil.rmtree(shard)
    assert preprocess(cfg)["resumed"]["shards_skipped"] == 1
    assert len(_open_like_the_trainer(tmp_path / "out")) > 0


# ---------------------------------------------------------------------------------------------
# Task 2: console set-up
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def console(monkeypatch):
    """Run configure_console against a captured stream; restore logging and warnings after."""
    from xtoken_nemo import cli

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("xtoken_nemo").level)
    monkeypatch.setattr(sys, "warnoptions", [])
    stream = io.StringIO()
    with warnings.catch_warnings():

        def setup(verbose=False, rank=0):
            warnings.resetwarnings()  # no filter but ours: anything not filtered is shown
            cli.configure_console(verbose=verbose, rank=rank, stream=stream)
            return stream

        yield setup
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    logging.getLogger("xtoken_nemo").setLevel(saved[2])


def test_our_info_is_shown_on_rank0_with_a_timestamp(console):
    out = console(rank=0)
    logging.getLogger("xtoken_nemo.x").info("hello %d", 1)
    logging.getLogger("xtoken_nemo.x").debug("not at INFO")
    line = out.getvalue().strip()
    assert line.endswith("INFO xtoken_nemo.x: hello 1") and "\n" not in line
    import re

    assert re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] INFO", line)


def test_our_info_is_hidden_on_rank1_and_errors_carry_the_rank(console):
    out = console(rank=1)
    logging.getLogger("xtoken_nemo.x").info("every rank would say this")
    logging.getLogger("xtoken_nemo.x").warning("nor this")
    logging.getLogger("xtoken_nemo.x").error("bad on rank 1")
    text = out.getvalue()
    assert "every rank" not in text and "nor this" not in text
    assert "[rank 1]" in text and "ERROR xtoken_nemo.x: bad on rank 1" in text


def test_third_party_info_is_hidden_and_verbose_levels(console):
    out = console(rank=0)
    logging.getLogger("megatron.core.x").info("third-party chatter")
    logging.getLogger("megatron.core.x").warning("third-party warning")
    assert "chatter" not in out.getvalue() and "WARNING megatron.core.x: third-party warning" in out.getvalue()
    out = console(verbose=True, rank=0)
    logging.getLogger("xtoken_nemo.x").debug("our debug")
    logging.getLogger("megatron.core.x").info("their info")
    logging.getLogger("megatron.core.x").debug("their debug")
    text = out.getvalue()
    assert "our debug" in text and "their info" in text and "their debug" not in text


def _warn(message, category, module, filename="x.py", lineno=1):
    warnings.warn_explicit(message, category, filename, lineno, module=module, registry={})


# (message, category, module) as each one is raised in a real run (see cli.KNOWN_WARNINGS)
REAL_WARNINGS = [
    (
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        FutureWarning,
        "torch.distributed.checkpoint.planner_helpers",
    ),
    (
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        FutureWarning,
        "xtoken_nemo.compat.cuda_redirect",
    ),
    (
        "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
        FutureWarning,
        "megatron.core.dist_checkpointing.strategies.torch",
    ),
    (
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
        UserWarning,
        "megatron.core.optimizer",
    ),
    (
        "Transformer Engine and Apex are not installed. "
        "Falling back to local implementations of multi_tensor_applier and multi_tensor_scale",
        UserWarning,
        "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
    ),
    (
        "Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier, "
        "multi_tensor_l2norm, and multi_tensor_scale",
        UserWarning,
        "megatron.core.optimizer.clip_grads",
    ),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.gpt.gpt_layer_specs"),
    (
        "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
        UserWarning,
        "megatron.core.transformer.transformer_config",
    ),
]


@pytest.mark.parametrize("message,category,module", REAL_WARNINGS)
def test_known_third_party_warnings_are_filtered(console, message, category, module):
    console(rank=0)
    with warnings.catch_warnings(record=True) as seen:
        _warn(message, category, module)
    assert seen == []


def test_other_warnings_still_show_on_rank0_and_none_on_rank1(console):
    console(rank=0)
    with warnings.catch_warnings(record=True) as seen:
        _warn(
            "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior.",
            UserWarning,
            "xtoken_nemo.distill.trainer",
        )  # ours: fixed at its source, never filtered
        _warn("Apex is not installed. Falling back to Torch Norm", UserWarning, "somebody.else")  # module matters
        _warn(
            "`load_state_dict` is deprecated and will be removed in future versions.",
            DeprecationWarning,
            "megatron.core.dist_checkpointing.strategies.torch",
        )  # category matters
        _warn("something new", FutureWarning, "megatron.core.models.backends")  # message matters
    assert [str(w.message)[:20] for w in seen] == [
        "Converting a tensor ",
        "Apex is not installe",
        "`load_state_dict` is",
        "something new",
    ]
    console(rank=1)
    with warnings.catch_warnings(record=True) as seen:
        _warn("something new", FutureWarning, "megatron.core.models.backends")
        _warn("ours", UserWarning, "xtoken_nemo.x")
    assert seen == []


def test_explicit_warnoptions_are_respected(console, monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    console(rank=0)
    with warnings.catch_warnings(record=True) as seen:
        _warn(*REAL_WARNINGS[0])
    assert len(seen) == 1


# ---------------------------------------------------------------------------------------------
# a real tiny `xtoken train`: no FutureWarning / UserWarning on the console
# ---------------------------------------------------------------------------------------------
def test_tiny_train_console_has_no_warnings(tiny, tmp_path):
    from xtoken_nemo.distill.config import ModelConfig
    from xtoken_nemo.distill.model_setup import save_random_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel
    from xtoken_nemo.tokenizers import load_tokenizer
    from xtoken_nemo.vocab.build import build_projection_matrix

    root = tiny["root"]
    W = root / "W.safetensors"
    if not W.exists():
        build_projection_matrix(load_tokenizer(tiny["student"]), load_tokenizer(tiny["teacher"]), progress=False).save(
            W
        )
    ensure_model_parallel(1)
    ck = {}
    for role, tok, family, seed in (("student", tiny["student"], "llama", 10), ("cross", tiny["teacher"], "qwen3", 11)):
        ck[role] = save_random_checkpoint(
            ModelConfig(tokenizer=tok, family=family, init_seed=seed, **TINY),
            load_tokenizer(tok).vocab_size,
            str(tmp_path / f"init_{role}"),
            pad_for_tp=2,
        )
    config = {
        "name": "quiet-run",
        "student": {"tokenizer": tiny["student"], "checkpoint": ck["student"], **TINY},
        "teachers": [
            {
                "name": "cross",
                "mode": "pkl",
                "alpha": 0.7,
                "projection": str(W),
                "model": {"tokenizer": tiny["teacher"], "family": "qwen3", "checkpoint": ck["cross"], **TINY},
            },
            {
                "name": "same",
                "mode": "kl",
                "alpha": 0.3,
                "model": {"tokenizer": tiny["student"], "checkpoint": ck["student"], **TINY},
            },
        ],
        "data": {"paths": [str(tiny["data"])], "seq_length": SEQ},
        "train": {"train_steps": 2, "global_batch_size": 2, "micro_batch_size": 1},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "save_interval": 2},
        "log_dir": str(tmp_path / "logs"),
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "xtoken_nemo.cli", "train", "--config", str(tmp_path / "run.json"), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quiet-run: completed at step 2/2" in proc.stdout
    bad = [line for line in proc.stderr.splitlines() if "FutureWarning" in line or "UserWarning" in line]
    assert bad == [], "\n".join(bad)
