"""Reading documents from JSONL and Parquet files, split into shards.

A shard is a fixed slice of one input file: for JSONL ``docs_per_shard`` lines (found by one fast
binary scan for the byte offsets), for Parquet a run of whole row groups holding at least
``docs_per_shard`` rows. The shard plan depends only on the files and ``docs_per_shard``, so a
restarted run finds the same shards and skips the finished ones.

Bad records are not dropped silently: :func:`read_shard` yields ``(location, None, reason)`` for
each, with reason one of ``invalid_utf8``, ``bad_json``, ``missing_field``, ``not_a_string``,
``empty``; the preprocessing summary counts them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from xtoken_nemo.data.errors import DataError

SKIP_REASONS = ("invalid_utf8", "bad_json", "missing_field", "not_a_string", "empty")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class ShardSpec:
    index: int
    path: str
    kind: str  # "jsonl" | "parquet"
    start: int  # JSONL: byte offset; Parquet: first row group
    stop: int  # JSONL: byte offset (exclusive); Parquet: row group (exclusive)
    first_record: int  # line / row number of the shard's first record in its file (0-based)

    def to_dict(self) -> dict:
        return asdict(self)


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(
        f"cannot read {path}: unknown file type '{suffix}'; give .jsonl (one JSON object per line) or .parquet files"
    )


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files from paths, directories (their .jsonl/.parquet files, sorted) and globs."""
    import glob

    files: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise DataError(f"input pattern '{item}' matches no file")
        for match in matches:
            p = Path(match)
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
                if not found:
                    raise DataError(f"input directory {p} holds no .jsonl or .parquet file")
                files.extend(found)
            elif p.is_file():
                file_kind(p)
                files.append(p)
            else:
                raise DataError(f"input file {p} does not exist")
    return files


def plan_shards(files: list[Path], docs_per_shard: int, text_field: str) -> list[ShardSpec]:
    shards: list[ShardSpec] = []
    for path in files:
        kind = file_kind(path)
        if kind == "jsonl":
            offsets, line = [0], 0
            starts = [0]
            with open(path, "rb") as f:
                pos = 0
                for raw in f:
                    pos += len(raw)
                    line += 1
                    if line % docs_per_shard == 0:
                        offsets.append(pos)
                        starts.append(line)
            size = os.path.getsize(path)
            if offsets[-1] != size:
                offsets.append(size)
                starts.append(line)
            for a, b, first in zip(offsets[:-1], offsets[1:], starts[:-1]):
                shards.append(ShardSpec(len(shards), str(path), kind, a, b, first))
        else:
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as exc:
                raise DataError(f"cannot read Parquet file {path}: {exc}") from None
            names = pf.schema_arrow.names
            if text_field not in names:
                raise DataError(
                    f"Parquet file {path} has no column '{text_field}' (columns: {', '.join(names)}); "
                    "pick the text column with --text-field"
                )
            group, rows, first, start = 0, 0, 0, 0
            total_groups = pf.num_row_groups
            while group < total_groups:
                rows += pf.metadata.row_group(group).num_rows
                group += 1
                if rows >= docs_per_shard or group == total_groups:
                    shards.append(ShardSpec(len(shards), str(path), kind, start, group, first))
                    first += rows
                    start, rows = group, 0
    return shards


def read_shard(spec: ShardSpec, text_field: str):
    """Yield ``(location, text, None)`` for good documents and ``(location, None, reason)`` otherwise."""
    if spec.kind == "jsonl":
        with open(spec.path, "rb") as f:
            f.seek(spec.start)
            data = f.read(spec.stop - spec.start)
        for k, raw in enumerate(data.splitlines()):
            loc = f"{spec.path}:{spec.first_record + k + 1}"
            if not raw.strip():
                continue  # blank line: not a record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield loc, None, "invalid_utf8"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield loc, None, "bad_json"
                continue
            yield (
                loc,
                *_check_text(
                    obj.get(text_field) if isinstance(obj, dict) else None, isinstance(obj, dict) and text_field in obj
                ),
            )
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(spec.path)
        table = pf.read_row_groups(list(range(spec.start, spec.stop)), columns=[text_field])
        for k, value in enumerate(table.column(0).to_pylist()):
            loc = f"{spec.path}:row {spec.first_record + k}"
            if isinstance(value, (bytes, bytearray)):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    yield loc, None, "invalid_utf8"
                    continue
            yield (loc, *_check_text(value, value is not None))


def _check_text(value, present: bool):
    if not present or value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "not_a_string"
    if not value:
        return None, "empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
        return None, "invalid_utf8"
    return value, None
