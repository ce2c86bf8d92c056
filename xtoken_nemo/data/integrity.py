"""Size and consistency checks of Megatron ``.bin/.idx`` pairs before they are memory-mapped.

A ``.bin`` cut short (a copy that stopped, a full disk) otherwise opens fine and fails at the
first read deep in training with numpy's ``offset must be non-negative and no greater than
buffer length``; a cut ``.idx`` fails inside megatron with an equally unhelpful message. These
checks read only the ``.idx`` (a few bytes per document) and the ``.bin`` size.

``.idx`` layout (megatron-core ``IndexedDataset``, not multimodal)::

    b"MMIDIDX\\x00\\x00"  version <Q (=1)  dtype code <B  sequence_count <Q  document_count <Q
    sequence_lengths int32[S]  sequence_pointers int64[S]  document_indices int64[D]

and the ``.bin`` must hold ``sequence_pointers[-1] + sequence_lengths[-1] * itemsize`` bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtoken_nemo.data.errors import DatasetCorruptError

_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes -> numpy dtypes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


@dataclass(frozen=True)
class IndexSummary:
    sequences: int
    documents: int
    tokens: int
    bin_bytes: int


def check_indexed(prefix: str | Path, fix: str) -> IndexSummary:
    """Check ``prefix.idx`` is complete and consistent and ``prefix.bin`` has the size it implies.

    fix: what to do about a damaged pair (appended to the one-line error).
    Raises :class:`DatasetCorruptError` naming the file, the expected and actual sizes.
    """
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise DatasetCorruptError(f"{p} is missing; {fix}")
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES:
            raise DatasetCorruptError(
                f"{idx} is truncated: {idx_size:,} bytes, shorter than the {_HEADER_BYTES}-byte index header; {fix}"
            )
        if head[:9] != _HEADER:
            raise DatasetCorruptError(f"{idx} is not a Megatron index file (bad magic bytes); {fix}")
        version, code, seqs, docs = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _DTYPES:
            raise DatasetCorruptError(f"{idx} has an unknown version {version} or dtype code {code}; {fix}")
        expected_idx = _HEADER_BYTES + 12 * seqs + 8 * docs
        if idx_size != expected_idx:
            state = "truncated" if idx_size < expected_idx else "longer than its header says"
            raise DatasetCorruptError(
                f"{idx} is {state}: expected {expected_idx:,} bytes ({seqs:,} sequences, {docs:,} documents), "
                f"found {idx_size:,}; {fix}"
            )
        lengths = np.fromfile(f, dtype=np.int32, count=seqs)
        pointers = np.fromfile(f, dtype=np.int64, count=seqs)
        doc_idx = np.fromfile(f, dtype=np.int64, count=docs)
    itemsize = np.dtype(_DTYPES[code]).itemsize
    if seqs:
        ends = pointers + lengths.astype(np.int64) * itemsize
        if (lengths < 0).any() or pointers[0] != 0 or (pointers[1:] != ends[:-1]).any():
            raise DatasetCorruptError(f"{idx} is inconsistent: its sequence pointers do not follow its lengths; {fix}")
        expected_bin = int(ends[-1])
    else:
        expected_bin = 0
    if docs and (doc_idx[0] != 0 or doc_idx[-1] != seqs or (np.diff(doc_idx) < 0).any()):
        raise DatasetCorruptError(
            f"{idx} is inconsistent: its document index does not cover its {seqs:,} sequences; {fix}"
        )
    bin_size = os.path.getsize(bin_)
    if bin_size != expected_bin:
        state = "truncated" if bin_size < expected_bin else "longer than its index says"
        raise DatasetCorruptError(
            f"{bin_} is {state}: expected {expected_bin:,} bytes ({seqs:,} sequences, {int(lengths.sum()):,} tokens "
            f"per {idx.name}), found {bin_size:,}; {fix}"
        )
    return IndexSummary(seqs, docs, int(lengths.astype(np.int64).sum()), bin_size)


def rebuild_command(path: str | Path, manifest: dict) -> str:
    """The ``xtoken preprocess`` command that wrote ``path`` (from its manifest)."""
    parts = [
        "xtoken preprocess --input",
        *manifest.get("inputs", ["..."]),
        "--student",
        manifest["student"]["tokenizer"],
    ]
    for t in manifest.get("teachers", []):
        parts += ["--teacher", t["tokenizer"]]
    parts += ["--seq-length", str(manifest.get("seq_length")), "--out", str(path)]
    if manifest.get("text_field", "text") != "text":
        parts += ["--text-field", manifest["text_field"]]
    return " ".join(parts)


def check_preprocessed(path: str | Path, manifest: dict) -> None:
    """Check every ``.bin/.idx`` of a preprocessed directory against its index and the manifest."""
    path = Path(path)
    shards = (path / "shards").is_dir()
    fix = (
        f"delete {path}/manifest.json and rerun `{rebuild_command(path, manifest)}` (the kept shards are merged again)"
        if shards
        else f"delete {path} and rebuild it with `{rebuild_command(path, manifest)}` "
        "(a finished directory is never redone)"
    )
    docs = manifest.get("documents")
    sides = [("student", manifest["student"]["prefix"], manifest["student"].get("tokens"))]
    for e in manifest.get("teachers", []):
        if not e.get("identity"):
            sides += [(e["tokenizer"], e["prefix"], e.get("tokens")), (e["tokenizer"], e["chunks_prefix"], None)]
    for who, prefix, tokens in sides:
        s = check_indexed(path / prefix, fix)
        if docs is not None and s.sequences != docs:
            raise DatasetCorruptError(
                f"{path / prefix}.idx holds {s.sequences:,} documents, manifest.json says {docs:,} ({who}); {fix}"
            )
        if tokens is not None and s.tokens != tokens:
            raise DatasetCorruptError(
                f"{path / prefix}.idx holds {s.tokens:,} tokens, manifest.json says {tokens:,} ({who}); {fix}"
            )
