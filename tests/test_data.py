"""Preprocessing to indexed datasets, windows with teacher chunks, blending, bad input, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from xtoken_nemo.align import surface_table
from xtoken_nemo.data import preprocess as pp
from xtoken_nemo.data.dataset import BlendedDistillDataset, DistillDataset, collate_distill
from xtoken_nemo.data.errors import DataError
from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
from xtoken_nemo.data.synthetic import documents
from xtoken_nemo.tokenizers import load_tokenizer

SEQ = 64


def _nfc(b: bytes) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", b.decode("utf-8", errors="replace"))


def _write_inputs(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(60, seed=7, max_sentences=12)
    docs[5] = "x " * 300  # longer than the window
    with open(root / "a.jsonl", "wb") as f:
        for d in docs[:40]:
            f.write(json.dumps({"text": d}).encode() + b"\n")
        f.write(b'{"text": ""}\n')  # empty
        f.write(b'{"content": "no text field"}\n')  # missing field
        f.write(b'{"text": 42}\n')  # not a string
        f.write(b"{not json\n")  # bad json
        f.write(b'{"text": "bad \xff byte"}\n')  # invalid UTF-8
        f.write(b'{"text": "lone \\ud800 surrogate"}\n')  # invalid UTF-8 after JSON decoding
    table = pa.table({"text": docs[40:] + [None]})
    pq.write_table(table, root / "b.parquet", row_group_size=7)
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    docs = _write_inputs(root)
    cfg = PreprocessConfig(
        inputs=[str(root / "a.jsonl"), str(root / "b.parquet")],
        student="llama3",
        teachers=["qwen3", "llama3"],
        out=str(root / "out"),
        seq_length=SEQ,
        docs_per_shard=16,
        progress=False,
        keep_shards=True,
    )
    manifest = preprocess(cfg)
    return root, cfg, manifest, docs


def test_manifest_counts_and_bad_input(built):
    root, cfg, m, docs = built
    assert m["documents"] == 60
    assert m["skipped"] == {"invalid_utf8": 2, "bad_json": 1, "missing_field": 2, "not_a_string": 1, "empty": 1}
    assert m["skipped_total"] == 7 and m["skipped_examples"]
    assert m["longer_than_window"] >= 1
    assert m["student"]["fingerprint"] == load_tokenizer("llama3").fingerprint and m["student"]["bos"] is True
    qwen, ident = m["teachers"]
    assert qwen["identity"] is False and qwen["bos"] is False and qwen["prefix"] == "teacher0"
    assert ident["identity"] is True and ident["prefix"] is None
    assert not (root / "out" / "teacher1.bin").exists()  # identity teacher: no stored copy
    # one gap per document (Llama's BOS); EOS pairs with EOS
    assert qwen["gap_chunks"] == 60
    assert m["seq_length"] == SEQ and m["version"] == 1


def test_stored_documents_and_alignment(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, cfg, m, docs = built
    llama, qwen = load_tokenizer("llama3"), load_tokenizer("qwen3")
    out = root / "out"
    s_ds = IndexedDataset(str(out / "student"))
    t_ds = IndexedDataset(str(out / "teacher0"))
    c_ds = IndexedDataset(str(out / "teacher0.chunks"))
    assert len(s_ds) == len(t_ds) == len(c_ds) == 60
    for d in (0, 5, 41, 59):
        s, t, c = s_ds[d].tolist(), t_ds[d].tolist(), c_ds[d]
        assert s[0] == llama.require("bos") and s[-1] == llama.require("eos")
        assert t[0] != qwen.special_ids.get("bos", -1) and t[-1] == qwen.require("eos")
        assert llama.decode(s[1:-1]) == docs[d] and qwen.decode(t[:-1]) == docs[d]
        se, te = c[0::2], c[1::2]
        assert se[-1] == len(s) and te[-1] == len(t)
        prev_s = prev_t = 0
        for a, b in zip(se.tolist(), te.tolist()):
            if a > prev_s and b > prev_t:
                assert surface_table(llama).concat(s[prev_s:a]) == surface_table(qwen).concat(t[prev_t:b])
            prev_s, prev_t = a, b


def test_windows_chunks_and_identity(built):
    root, cfg, m, docs = built
    llama, qwen = load_tokenizer("llama3"), load_tokenizer("qwen3")
    ds = DistillDataset(root / "out", teachers=["qwen3", "llama3"], student="llama3")
    total = m["student"]["tokens"]
    assert len(ds) == (total - 1) // SEQ
    stream = []
    dropped = kept = 0
    for i in range(len(ds)):
        x = ds[i]
        assert x["tokens"].shape == (SEQ,) and x["labels"].shape == (SEQ,) and x["loss_mask"].shape == (SEQ,)
        assert torch.equal(x["tokens"][1:], x["labels"][:-1])
        stream.append(x["tokens"])
        tt, tl, ch = x["teacher0_tokens"], x["teacher0_labels"], x["teacher0_chunks"]
        assert torch.equal(tt[1:], tl[:-1])
        assert ch.shape[1] == 4 and (ch[:, 1] > ch[:, 0]).all() and (ch[:, 3] > ch[:, 2]).all()
        assert ch[:, 1].max() <= SEQ and ch[:, 0].min() >= 0 and ch[:, 3].max() <= tl.shape[0]
        for s0, s1, t0, t1 in ch.tolist():
            s_b = surface_table(llama).concat(x["labels"][s0:s1].tolist())
            t_b = surface_table(qwen).concat(tl[t0:t1].tolist())
            # same text; Qwen3 NFC-normalizes ("e\u0301" -> "é"); b"" == b"" is the EOS pair
            assert s_b == t_b or _nfc(s_b) == _nfc(t_b)
        # labels covered by chunks: everything except BOS gaps and the partial chunks at the edges
        covered = int((ch[:, 1] - ch[:, 0]).sum())
        bos_labels = int((x["labels"] == llama.require("bos")).sum())
        assert SEQ - covered - bos_labels <= 6
        dropped += SEQ - covered - bos_labels
        kept += len(ch)
        # the same-tokenizer teacher: the student's tokens and one-token chunks
        assert torch.equal(x["teacher1_tokens"], x["tokens"])
        assert x["teacher1_chunks"].tolist()[:2] == [[0, 1, 0, 1], [1, 2, 1, 2]]
    flat = torch.cat(stream).tolist()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    s_ds = IndexedDataset(str(root / "out" / "student"))
    all_tokens = np.concatenate([s_ds[d] for d in range(len(s_ds))]).tolist()
    assert flat == all_tokens[: len(flat)]  # windows tile the packed stream
    print(f"\nwindows: {len(ds)}, chunks kept {kept}, labels in dropped partial chunks {dropped}")


def test_teacher_mismatch_and_missing_dir(built, tmp_path):
    root, *_ = built
    with pytest.raises(DataError, match="teacher 'phi4mini' is not in the preprocessed data"):
        DistillDataset(root / "out", teachers=["phi4mini"])
    with pytest.raises(DataError, match="does not match the preprocessed data"):
        DistillDataset(root / "out", student="qwen3")
    with pytest.raises(DataError, match="no manifest.json"):
        DistillDataset(tmp_path)
    ds = DistillDataset(root / "out", teachers=[load_tokenizer("qwen3").fingerprint])
    assert ds.teacher_names == ["qwen3"] and "teacher1_tokens" not in ds[0]


def test_blend_and_collate(built):
    root, *_ = built
    a = DistillDataset(root / "out", teachers=["qwen3"])
    b = DistillDataset(root / "out", teachers=["qwen3"], shuffle=True, seed=3)
    blend = BlendedDistillDataset([a, b], [0.75, 0.25], size=40)
    ids = blend.dataset_index.tolist()
    assert ids.count(0) == 30 and ids.count(1) == 10
    assert ids == BlendedDistillDataset([a, b], [3, 1], size=40).dataset_index.tolist()  # deterministic
    samples = [blend[i] for i in range(4)]
    batch = collate_distill(samples)
    assert batch["tokens"].shape == (4, SEQ)
    T = batch["teacher0_tokens"].shape[1]
    assert T == max(s["teacher0_tokens"].shape[0] for s in samples) and batch["teacher0_labels"].shape == (4, T)
    chunks = batch["teacher0_chunks"]
    assert chunks.shape == (4, max(s["teacher0_chunks"].shape[0] for s in samples), 4)
    for b, s in enumerate(samples):  # each sample's chunks first, then -1 rows
        n = s["teacher0_chunks"].shape[0]
        assert torch.equal(chunks[b, :n], s["teacher0_chunks"]) and (chunks[b, n:] == -1).all()
    with pytest.raises(DataError, match="cannot blend"):
        BlendedDistillDataset([a, DistillDataset(root / "out")], [1, 1])


def test_resume_after_crash(built, monkeypatch):
    root, cfg, manifest, _ = built
    out = root / "resume"
    cfg2 = PreprocessConfig(**{**cfg.__dict__, "out": str(out), "keep_shards": False})
    real = pp.process_shard
    calls = []

    def crashing(spec, shard_dir, state=None):
        calls.append(spec.index)
        if spec.index == 3:
            raise RuntimeError("simulated crash")
        return real(spec, shard_dir, state)

    monkeypatch.setattr(pp, "process_shard", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess(cfg2)
    assert sorted(p.name for p in (out / "shards").glob("shard-*")) == ["shard-000000", "shard-000001", "shard-000002"]
    assert not (out / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(pp, "process_shard", real)
    m2 = preprocess(cfg2)
    assert m2["resumed"]["shards_skipped"] == 3 and m2["documents"] == manifest["documents"]
    for name in ("student.bin", "teacher0.bin", "teacher0.chunks.bin"):
        assert (out / name).read_bytes() == (root / "out" / name).read_bytes()
    assert not (out / "shards").exists()
    again = preprocess(cfg2)  # finished: nothing to redo
    assert again["resumed"]["shards_skipped"] == again["shards"]
    with pytest.raises(DataError, match="different configuration"):
        preprocess(PreprocessConfig(**{**cfg2.__dict__, "text_field": "content"}))


def test_preprocess_cli_workers_and_errors(built, tmp_path, capsys):
    from xtoken_nemo.cli.data import add_preprocess_parser

    root, *_ = built
    parser = argparse.ArgumentParser(prog="xtoken")
    add_preprocess_parser(parser.add_subparsers(dest="command"))
    argv = [
        "preprocess",
        "--input",
        str(root / "a.jsonl"),
        str(root / "b.parquet"),
        "--student",
        "llama3",
        "--teacher",
        "qwen3",
        "--teacher",
        "llama3",
        "--out",
        str(tmp_path / "o"),
        "--seq-length",
        str(SEQ),
        "--workers",
        "2",
        "--docs-per-shard",
        "16",
        "--no-progress",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote 60 documents" in out and "skipped 2 invalid utf8, 1 bad json, 2 missing field" in out
    assert "identity alignment" in out and "longer than seq_length" in out
    # the worker pool writes the same bytes as the in-process run
    assert (tmp_path / "o" / "teacher0.chunks.bin").read_bytes() == (root / "out" / "teacher0.chunks.bin").read_bytes()
    args = parser.parse_args(
        [
            "preprocess",
            "--input",
            str(root / "b.parquet"),
            "--student",
            "llama3",
            "--teacher",
            "qwen3",
            "--out",
            str(tmp_path / "p"),
            "--text-field",
            "body",
            "--no-progress",
        ]
    )
    assert args.func(args) == 2
    assert "has no column 'body'" in capsys.readouterr().err
    args = parser.parse_args(
        [
            "preprocess",
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--student",
            "llama3",
            "--teacher",
            "qwen3",
            "--out",
            str(tmp_path / "q"),
        ]
    )
    assert args.func(args) == 2
    assert "does not exist" in capsys.readouterr().err
