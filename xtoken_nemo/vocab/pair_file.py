"""Files built once from a (student, teacher) tokenizer pair: W and J-KL's prefix support.

Both are safetensors holding a format name, a format version and both tokenizers' fingerprints and
sizes in their metadata. :func:`read_pair_file` reads one and :func:`check_pair_tokenizers`
refuses one built for other tokenizers; every error is one line that says how to rebuild the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from xtoken_nemo.errors import ProjectionMatrixError
from xtoken_nemo.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class PairFileKind:
    """What a kind of pair file is called, how it is rebuilt and which error it raises."""

    format_name: str  # metadata "format"
    format_version: str  # metadata "format_version" this code reads
    what: str  # e.g. "W file": how messages name it
    rebuild: str  # e.g. "`xtoken build-w`": the command that makes one
    error: type[ProjectionMatrixError]

    @property
    def noun(self) -> str:
        """ "projection matrix" for "xtoken-nemo/projection-matrix"."""
        return self.format_name.split("/")[-1].replace("-", " ")


def read_pair_file(
    path: str | os.PathLike, kind: PairFileKind, names: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, {name: tensor} for ``names``) of a pair file of ``kind``; ``kind.error`` if it is
    missing, another file, corrupt or of another format version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise kind.error(f"{kind.what} {path} does not exist; build it with {kind.rebuild}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != kind.format_name:
                raise kind.error(
                    f"{path} is a safetensors file but not an xtoken-nemo {kind.noun}; build one with {kind.rebuild}"
                )
            tensors = {name: f.get_tensor(name) for name in names}
    except kind.error:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers and data
        raise kind.error(
            f"{kind.what} {path} is corrupt or truncated ({exc}); rebuild it with {kind.rebuild}"
        ) from None
    if meta.get("format_version") != kind.format_version:
        raise kind.error(
            f"{kind.what} {path} has format version {meta.get('format_version')}, this xtoken-nemo reads "
            f"version {kind.format_version}; rebuild it with {kind.rebuild}"
        )
    return meta, tensors


def check_pair_tokenizers(
    metadata: dict[str, str],
    sizes: dict[str, int],
    student: Tokenizer | None,
    teacher: Tokenizer | None,
    source: str,
    kind: PairFileKind,
) -> None:
    """``kind.error`` unless the file was built from exactly these tokenizers (fingerprint and
    number of ids; ``sizes``: {"student": ids, "teacher": ids} the file holds). None skips a side."""
    for side, tok in (("student", student), ("teacher", teacher)):
        if tok is None:
            continue
        want = metadata.get(f"{side}_fingerprint")
        if want != tok.fingerprint or sizes[side] != tok.vocab_size:
            raise kind.error(
                f"{source} was built for {side} tokenizer '{metadata.get(f'{side}_name', '?')}' "
                f"(fingerprint {str(want)[:12]}, {sizes[side]} ids) but the {side} given is '{tok.name}' "
                f"(fingerprint {tok.fingerprint[:12]}, {tok.vocab_size} ids); rebuild it with {kind.rebuild}"
            )
