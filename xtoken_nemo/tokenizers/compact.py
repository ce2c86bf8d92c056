"""A compact vocabulary: a real tokenizer restricted to the token ids a corpus uses.

For small experiments (the CPU demo): a hidden-64 model with Llama-3.2's 128,256 or Phi-4-mini's
200,064 logits is almost all output layer. A compact tokenizer keeps the real tokenizer's
segmentation, surfaces and special tokens exactly, and renumbers the kept ids 0..n-1 (in the
order of the base ids), so embeddings and output layers span only those ids.

A compact vocabulary is a JSON file ``<name>.subvocab.json``::

    {"format": "xtoken-nemo/subvocab", "base": "llama3", "base_fingerprint": "...", "ids": [0, 13, ...]}

and ``load_tokenizer("<path>.subvocab.json")`` loads it like any tokenizer. ``encode`` of text
with a token outside the kept ids is an error naming the token: nothing is silently mapped.

Because a compact tokenizer has the same segmentation, character offsets and surfaces, the
alignment (character spans) and the exact-match common set computed on it are the full ones
restricted to the kept ids; W built on the full tokenizers is restricted by
:func:`xtoken_nemo.vocab.compact.restrict_projection`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.tokenizers.base import Encoding, Tokenizer

SUBVOCAB_SUFFIX = ".subvocab.json"
FORMAT_NAME = "xtoken-nemo/subvocab"


class CompactTokenizer(Tokenizer):
    """``base`` restricted to ``kept_ids`` (sorted base ids; compact id i = kept_ids[i])."""

    def __init__(self, base: Tokenizer, kept_ids: list[int], name: str | None = None) -> None:
        kept = sorted({int(i) for i in kept_ids})
        if not kept or kept[0] < 0 or kept[-1] >= base.vocab_size:
            raise TokenizerError(f"compact vocabulary of '{base.name}': ids must lie in [0, {base.vocab_size})")
        self.base = base
        self.kept_ids = kept
        self.name = name or f"{base.name}@compact{len(kept)}"
        self.vocab_size = len(kept)
        self.adds_bos_by_default = base.adds_bos_by_default
        self._to_compact = {b: c for c, b in enumerate(kept)}
        self.special_tokens = {self._to_compact[b]: s for b, s in base.special_tokens.items() if b in self._to_compact}
        self.special_ids = {role: self._to_compact[b] for role, b in base.special_ids.items() if b in self._to_compact}

    # ----- id maps ----------------------------------------------------------------------------
    def to_compact(self, base_ids: list[int], text: str | None = None) -> list[int]:
        out = []
        for b in base_ids:
            c = self._to_compact.get(b)
            if c is None:
                where = f" in {text[:60]!r}" if text is not None else ""
                raise TokenizerError(
                    f"token {self.base.token_text(b)!r} (id {b} of '{self.base.name}'){where} is not in the compact "
                    f"vocabulary '{self.name}' ({self.vocab_size} ids); "
                    "rebuild it from a corpus that includes this text"
                )
            out.append(c)
        return out

    def to_base(self, compact_ids: list[int]) -> list[int]:
        return [self.kept_ids[c] for c in compact_ids]

    # ----- Tokenizer interface -------------------------------------------------------------------
    def _encode_text(self, text: str) -> Encoding:
        enc = self.base._encode_text(text)
        return Encoding(self.to_compact(enc.ids, text), enc.offsets)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.to_compact(ids, t) for ids, t in zip(self.base.encode_batch(texts), texts)]

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(self.to_base(list(ids)))

    def _build_surfaces(self) -> list[bytes | None]:
        table = self.base.surfaces
        return [table[b] for b in self.kept_ids]

    # ----- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, base_spec: str) -> None:
        """Write ``<name>.subvocab.json``; ``base_spec`` is what ``load_tokenizer`` loads the base from."""
        path = Path(path)
        if not path.name.endswith(SUBVOCAB_SUFFIX):
            raise TokenizerError(f"a compact vocabulary file must end with {SUBVOCAB_SUFFIX}: {path}")
        data = {
            "format": FORMAT_NAME,
            "base": base_spec,
            "base_fingerprint": self.base.fingerprint,
            "ids": self.kept_ids,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def load_compact(path: str | os.PathLike) -> CompactTokenizer:
    """Read a ``.subvocab.json`` file; its base tokenizer must be the one it was made from."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"compact vocabulary {path} cannot be read ({exc}); rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("ids"), list):
        raise TokenizerError(f"{path} is not an xtoken-nemo compact vocabulary (format {FORMAT_NAME}); rebuild it")
    base = load_tokenizer(data["base"])
    if base.fingerprint != data.get("base_fingerprint"):
        raise TokenizerError(
            f"compact vocabulary {path} was made from another '{data['base']}' tokenizer "
            f"(fingerprint {str(data.get('base_fingerprint'))[:12]}, loaded {base.fingerprint[:12]}); rebuild it"
        )
    return CompactTokenizer(base, data["ids"], name=path.name.removesuffix(SUBVOCAB_SUFFIX))


def corpus_ids(tokenizer: Tokenizer, texts: list[str]) -> set[int]:
    """Base ids that encoding ``texts`` produces, plus the tokenizer's special-role ids."""
    ids: set[int] = set(tokenizer.special_ids.values())
    for row in tokenizer.encode_batch(texts):
        ids.update(row)
    return ids
