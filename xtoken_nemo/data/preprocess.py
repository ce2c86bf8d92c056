"""Preprocess once, train many times: tokenize with the student and every teacher, align, write
Megatron-core indexed datasets.

Output directory::

    manifest.json                 tokenizer fingerprints, counts, seq length, version, skip counts
    student.bin / .idx            one sequence per document: [BOS?] ids EOS
    teacher{m}.bin / .idx         teacher m's ids, same documents in the same order
    teacher{m}.chunks.bin / .idx  teacher m's alignment per document: int32 interleaved cumulative
                                  chunk ends [s_end_0, t_end_0, s_end_1, t_end_1, ...] relative to
                                  the document's first token (gap chunks included, see
                                  xtoken_nemo.align.alignment)
    shards/                       per-shard datasets while running (removed after the merge
                                  unless keep_shards)

A teacher whose tokenizer has the student's fingerprint gets no files at all: it is marked
``identity`` in the manifest and the training dataset hands it the student's tokens.

Document boundaries (decided here): each document is stored as ``[BOS] ids EOS`` per side, with
BOS only where the family adds one by default (Llama-3 yes; Qwen3, Phi-4-mini no) unless
overridden, and each side's *own* EOS (student EOS for the student, teacher EOS for the teacher).
Packing documents back to back therefore separates them with EOS the Megatron way. In the
alignment the two EOS tokens form a special pair chunk (same role), so the student learns the
teacher's end-of-document distribution; a BOS on one side only is a gap chunk.

Resumability: the work is split into shards (slices of the input files). Each shard is written
to a temporary directory and renamed into ``shards/`` when complete, with its stats; a restarted
run with the same configuration skips every finished shard. The merge into the final datasets
and the manifest (written last) happen after all shards exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xtoken_nemo import __version__ as pkg_version
from xtoken_nemo.align.exact import align_bytes, align_offsets, surface_table
from xtoken_nemo.data.errors import DataError
from xtoken_nemo.data.integrity import check_indexed
from xtoken_nemo.data.readers import SKIP_REASONS, ShardSpec, expand_inputs, plan_shards, read_shard
from xtoken_nemo.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

FORMAT = "xtoken-dual-tokenized"
FORMAT_VERSION = 1
MAX_SKIP_EXAMPLES = 5


@dataclass
class PreprocessConfig:
    inputs: list[str]
    student: str
    teachers: list[str]
    out: str
    seq_length: int = 4096
    workers: int = 1
    text_field: str = "text"
    docs_per_shard: int = 10_000
    keep_shards: bool = False
    student_bos: bool | None = None  # None: the student family's default
    teacher_bos: bool | None = None  # None: each teacher family's default
    progress: bool = True


@dataclass
class ShardStats:
    shard: int
    documents: int = 0
    skipped: dict = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    skipped_examples: list = field(default_factory=list)
    longer_than_window: int = 0
    student_tokens: int = 0
    teachers: list = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: {"read": 0.0, "tokenize": 0.0, "align": 0.0, "write": 0.0})


# ----- tokenizer set-up -------------------------------------------------------------------------
class _Side:
    """One tokenizer with its document convention and how to tokenize it fast."""

    def __init__(self, spec: str, tok, add_bos: bool | None) -> None:
        self.spec, self.tok = spec, tok
        self.add_bos = tok.adds_bos_by_default if add_bos is None else add_bos
        self.bos = tok.require("bos") if self.add_bos else None
        try:
            self.eos = tok.require("eos")
        except Exception as exc:
            raise DataError(f"tokenizer '{spec}' has no EOS token to separate documents ({exc})") from None
        # Batched encoding is used when it gives the same ids as encoding a whole document
        # (byte-level BPE, tiktoken). SentencePiece/Metaspace encode a document with a leading
        # "▁" that mid-text fragments lack: those are encoded one document at a time.
        # (A compact vocabulary segments exactly as its base tokenizer, which may not know the probes.)
        probes = ["Hello world", " Hello world.\n  x = 12345"]
        seg = getattr(tok, "base", tok)
        self.batched = all(seg.encode_batch([p])[0] == seg.encode(p, add_bos=False).ids for p in probes)
        self.table = surface_table(tok)

    def wrap(self, ids) -> np.ndarray:
        out = np.empty(len(ids) + 1 + (self.bos is not None), dtype=np.int64)
        k = 0
        if self.bos is not None:
            out[0] = self.bos
            k = 1
        out[k : k + len(ids)] = ids
        out[-1] = self.eos
        return out


_STATE: dict = {}


def _setup(cfg: PreprocessConfig) -> dict:
    student = _Side(cfg.student, load_tokenizer(cfg.student), cfg.student_bos)
    teachers = []
    for spec in cfg.teachers:
        tok = load_tokenizer(spec)
        identity = tok.fingerprint == student.tok.fingerprint
        teachers.append(None if identity else _Side(spec, tok, cfg.teacher_bos))
    return {"cfg": cfg, "student": student, "teachers": teachers}


# ----- one shard --------------------------------------------------------------------------------
def _token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _tokenize(side: _Side, texts: list[str]):
    """ids per text (no specials) and, for per-document encoding, the offsets."""
    if side.batched:
        return side.tok.encode_batch(texts), None
    encs = [side.tok.encode(t, add_bos=False) for t in texts]
    return [e.ids for e in encs], [e.offsets for e in encs]


def _offsets_for(side: _Side, text: str, ids, offsets):
    if offsets is not None:
        return offsets
    enc = side.tok.encode(text, add_bos=False)
    if list(enc.ids) != list(ids):
        raise DataError(f"tokenizer '{side.spec}': batched and single-document encodings differ; report this as a bug")
    return enc.offsets


def _wrap_offsets(side: _Side, offsets, text_len: int) -> np.ndarray:
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    parts = []
    if side.bos is not None:
        parts.append(np.zeros((1, 2), np.int64))
    parts.append(off)
    parts.append(np.array([[text_len, text_len]], np.int64))
    return np.concatenate(parts)


def process_shard(spec: ShardSpec, shard_dir: Path, state: dict | None = None) -> dict:
    """Tokenize, align and write one shard; returns its stats (also saved as stats.json)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    state = state or _STATE
    cfg: PreprocessConfig = state["cfg"]
    student: _Side = state["student"]
    teachers: list[_Side | None] = state["teachers"]
    stats = ShardStats(spec.index)
    stats.teachers = [
        {"tokens": 0, "chunks": 0, "matched_chunks": 0, "gap_chunks": 0, "byte_path_docs": 0, "offsets_path_docs": 0}
        for _ in teachers
    ]
    t0 = time.perf_counter()
    texts = []
    for loc, text, reason in read_shard(spec, cfg.text_field):
        if text is None:
            stats.skipped[reason] += 1
            if len(stats.skipped_examples) < MAX_SKIP_EXAMPLES:
                stats.skipped_examples.append(f"{loc}: {reason}")
            continue
        texts.append(text)
    t1 = time.perf_counter()
    stats.seconds["read"] = t1 - t0

    s_ids, s_offs = _tokenize(student, texts)
    t_tok = [(_tokenize(side, texts) if side is not None else None) for side in teachers]
    t2 = time.perf_counter()
    stats.seconds["tokenize"] = t2 - t1

    tmp = shard_dir.parent / f".tmp-{shard_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    s_builder = IndexedDatasetBuilder(str(tmp / "student.bin"), dtype=_token_dtype(student.tok.vocab_size))
    t_builders = [
        (
            IndexedDatasetBuilder(str(tmp / f"teacher{m}.bin"), dtype=_token_dtype(side.tok.vocab_size)),
            IndexedDatasetBuilder(str(tmp / f"teacher{m}.chunks.bin"), dtype=np.int32),
        )
        if side is not None
        else None
        for m, side in enumerate(teachers)
    ]
    align_seconds = extra_tokenize = 0.0
    loop_start = time.perf_counter()
    for d, text in enumerate(texts):
        s_doc = student.wrap(s_ids[d])
        if len(s_ids[d]) > cfg.seq_length:
            stats.longer_than_window += 1
        stats.student_tokens += len(s_doc)
        s_builder.add_item(torch.from_numpy(s_doc.astype(s_builder.dtype)))
        s_builder.end_document()
        for m, side in enumerate(teachers):
            if side is None:
                continue
            t_ids_doc = t_tok[m][0][d]
            t_doc = side.wrap(t_ids_doc)
            ta = time.perf_counter()
            if student.table.concat(s_ids[d]) == side.table.concat(t_ids_doc):
                al = align_bytes(s_doc, t_doc, student.tok, side.tok)
                stats.teachers[m]["byte_path_docs"] += 1
            else:  # normalizers/SentencePiece: align on character offsets into the original text
                te = time.perf_counter()
                s_off = _wrap_offsets(
                    student, _offsets_for(student, text, s_ids[d], s_offs[d] if s_offs else None), len(text)
                )
                t_off = _wrap_offsets(
                    side, _offsets_for(side, text, t_ids_doc, t_tok[m][1][d] if t_tok[m][1] else None), len(text)
                )
                extra_tokenize += time.perf_counter() - te
                al = align_offsets(s_doc, s_off, t_doc, t_off, student.tok, side.tok)
                stats.teachers[m]["offsets_path_docs"] += 1
            if al.num_student_tokens != len(s_doc) or al.num_teacher_tokens != len(t_doc):
                raise DataError(f"internal alignment error on document {d} of shard {spec.index}; report this as a bug")
            align_seconds += time.perf_counter() - ta
            matched = al.matched_mask
            st = stats.teachers[m]
            st["tokens"] += len(t_doc)
            st["chunks"] += len(al)
            st["matched_chunks"] += int(matched.sum())
            st["gap_chunks"] += int(len(al) - matched.sum())
            ids_b, chunk_b = t_builders[m]
            ids_b.add_item(torch.from_numpy(t_doc.astype(ids_b.dtype)))
            ids_b.end_document()
            chunk_b.add_item(torch.from_numpy(al.interleaved()))
            chunk_b.end_document()
    stats.documents = len(texts)
    stats.seconds["align"] = align_seconds - extra_tokenize
    stats.seconds["tokenize"] += extra_tokenize
    s_builder.finalize(str(tmp / "student.idx"))
    for m, pair in enumerate(t_builders):
        if pair is not None:
            pair[0].finalize(str(tmp / f"teacher{m}.idx"))
            pair[1].finalize(str(tmp / f"teacher{m}.chunks.idx"))
    stats.seconds["write"] = time.perf_counter() - loop_start - align_seconds
    out = asdict(stats)
    (tmp / "stats.json").write_text(json.dumps(out, indent=1))
    os.replace(tmp, shard_dir)  # atomic: a shard directory exists only when complete
    return out


def _worker(args):
    spec, shard_dir = args
    return process_shard(spec, Path(shard_dir))


# ----- driver -----------------------------------------------------------------------------------
def _config_key(cfg: PreprocessConfig, state: dict, files: list[Path]) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "student": state["student"].tok.fingerprint,
        "student_bos": state["student"].add_bos,
        "teachers": [
            (side.tok.fingerprint, side.add_bos) if side is not None else "identity" for side in state["teachers"]
        ],
        "text_field": cfg.text_field,
        "docs_per_shard": cfg.docs_per_shard,
        "inputs": [(str(p.resolve()), p.stat().st_size) for p in files],
    }


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run (or resume) preprocessing; returns the manifest."""
    if cfg.seq_length < 1:
        raise DataError(f"--seq-length must be positive, got {cfg.seq_length}")
    if not cfg.teachers:
        raise DataError("give at least one --teacher")
    if cfg.workers < 1:
        raise DataError(f"--workers must be at least 1, got {cfg.workers}")
    out = Path(cfg.out)
    files = expand_inputs(cfg.inputs)
    state = _setup(cfg)
    key = _config_key(cfg, state, files)
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config_hash") == key_hash:
            log.info("%s is already complete for this configuration; nothing to do", out)
            manifest["resumed"] = {"shards_total": manifest["shards"], "shards_skipped": manifest["shards"]}
            return manifest
        raise DataError(
            f"{out} already holds a finished preprocessing run with a different configuration "
            "(inputs, tokenizers, text field or shard size); choose another --out or delete it"
        )

    shards_root = out / "shards"
    shards_root.mkdir(parents=True, exist_ok=True)
    plan_file = shards_root / "config.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())
        if previous.get("config_hash") != key_hash:
            raise DataError(
                f"{shards_root} holds shards of a different configuration (inputs, tokenizers, text field "
                "or shard size changed); delete the directory or choose another --out"
            )
    plan = plan_shards(files, cfg.docs_per_shard, cfg.text_field)
    plan_file.write_text(json.dumps({"config_hash": key_hash, "config": key, "shards": len(plan)}, indent=1))
    for stale in shards_root.glob(".tmp-*"):  # half-written shards of a crashed run
        shutil.rmtree(stale, ignore_errors=True)

    shard_dirs = [shards_root / f"shard-{s.index:06d}" for s in plan]
    pending = [(s, str(d)) for s, d in zip(plan, shard_dirs) if not (d / "stats.json").exists()]
    skipped_shards = len(plan) - len(pending)
    if skipped_shards:
        log.info("resuming: %d of %d shards already finished", skipped_shards, len(plan))

    from tqdm import tqdm

    bar = tqdm(total=len(plan), initial=skipped_shards, unit="shard", desc="preprocess", disable=not cfg.progress)
    docs = 0
    try:
        if cfg.workers == 1 or len(pending) <= 1:
            _STATE.update(state)
            for spec, d in pending:
                stats = process_shard(spec, Path(d), state)
                docs += stats["documents"]
                bar.update(1)
                bar.set_postfix(docs=docs)
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported once, inherited by fork)

            _STATE.update(state)
            ctx = mp.get_context("fork")
            with ctx.Pool(min(cfg.workers, len(pending))) as pool:
                for stats in pool.imap_unordered(_worker, pending):
                    docs += stats["documents"]
                    bar.update(1)
                    bar.set_postfix(docs=docs)
    finally:
        bar.close()

    manifest = _merge(cfg, state, plan, shard_dirs, out, key_hash)
    manifest["resumed"] = {"shards_total": len(plan), "shards_skipped": skipped_shards}
    return manifest


def _merge(cfg, state, plan, shard_dirs, out: Path, key_hash: str) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    student: _Side = state["student"]
    teachers: list[_Side | None] = state["teachers"]
    all_stats = [json.loads((d / "stats.json").read_text()) for d in shard_dirs]
    prefixes = [("student", _token_dtype(student.tok.vocab_size))]
    for m, side in enumerate(teachers):
        if side is not None:
            prefixes += [(f"teacher{m}", _token_dtype(side.tok.vocab_size)), (f"teacher{m}.chunks", np.int32)]
    staging = out / ".merge"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    for d in shard_dirs:  # a shard cut after it was finished would poison the merged files
        for prefix, _ in prefixes:
            check_indexed(
                d / prefix, f"delete {d} and rerun the same `xtoken preprocess` command (it redoes only that shard)"
            )
    for prefix, dtype in prefixes:
        builder = IndexedDatasetBuilder(str(staging / f"{prefix}.bin"), dtype=dtype)
        for d in shard_dirs:
            builder.add_index(str(d / prefix))
        builder.finalize(str(staging / f"{prefix}.idx"))
    for prefix, _ in prefixes:
        for ext in (".bin", ".idx"):
            os.replace(staging / f"{prefix}{ext}", out / f"{prefix}{ext}")
    shutil.rmtree(staging)

    skipped = {r: sum(s["skipped"][r] for s in all_stats) for r in SKIP_REASONS}
    examples = [e for s in all_stats for e in s["skipped_examples"]][:MAX_SKIP_EXAMPLES]
    seconds = {k: sum(s["seconds"][k] for s in all_stats) for k in ("read", "tokenize", "align", "write")}

    def side_entry(side: _Side) -> dict:
        return {
            "tokenizer": side.spec,
            "name": side.tok.name,
            "fingerprint": side.tok.fingerprint,
            "vocab_size": side.tok.vocab_size,
            "bos": side.add_bos,
            "bos_id": side.bos,
            "eos_id": side.eos,
        }

    teacher_entries = []
    for m, side in enumerate(teachers):
        if side is None:
            tok = load_tokenizer(cfg.teachers[m])
            teacher_entries.append(
                {
                    "tokenizer": cfg.teachers[m],
                    "name": tok.name,
                    "fingerprint": tok.fingerprint,
                    "identity": True,
                    "prefix": None,
                    "chunks_prefix": None,
                    "tokens": sum(s["student_tokens"] for s in all_stats),
                }
            )
            continue
        entry = side_entry(side)
        entry.update(identity=False, prefix=f"teacher{m}", chunks_prefix=f"teacher{m}.chunks")
        for k in ("tokens", "chunks", "matched_chunks", "gap_chunks", "byte_path_docs", "offsets_path_docs"):
            entry[k] = sum(s["teachers"][m][k] for s in all_stats)
        teacher_entries.append(entry)

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "xtoken_nemo_version": pkg_version,
        "config_hash": key_hash,
        "seq_length": cfg.seq_length,
        "text_field": cfg.text_field,
        "inputs": [str(Path(p)) for p in dict.fromkeys(s.path for s in plan)],
        "shards": len(plan),
        "documents": sum(s["documents"] for s in all_stats),
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "skipped_examples": examples,
        "longer_than_window": sum(s["longer_than_window"] for s in all_stats),
        "student": {**side_entry(student), "prefix": "student", "tokens": sum(s["student_tokens"] for s in all_stats)},
        "teachers": teacher_entries,
        "seconds": seconds,
        "document_format": "[BOS if the family adds one] ids EOS, per side with its own specials",
        "chunks_format": "int32 interleaved cumulative ends [s_end_0, t_end_0, ...] per document, gaps included",
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    if not cfg.keep_shards:
        shutil.rmtree(out / "shards", ignore_errors=True)
    return manifest
