"""Tokenizers: one interface over HF tokenizers, SentencePiece and tiktoken BPE.

from xtoken_nemo.tokenizers import load_tokenizer
tok = load_tokenizer("qwen3")            # built-in offline name
tok = load_tokenizer("/models/Llama-3.2-1B")  # HF dir, tokenizer.json, .model or .tiktoken
tok = load_tokenizer("demo_out/vocab/llama3.subvocab.json")  # a compact vocabulary (compact.py)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.base import ROLES, Encoding, Tokenizer
from xtoken_nemo.tokenizers.builtin import ALIASES, BUILTIN_NAMES, load_builtin
from xtoken_nemo.tokenizers.hf import HFTokenizer
from xtoken_nemo.tokenizers.sp import SentencePieceTokenizer
from xtoken_nemo.tokenizers.tiktoken_bpe import TiktokenTokenizer, read_ranks

__all__ = ["ROLES", "BUILTIN_NAMES", "Encoding", "Tokenizer", "load_tokenizer"]


def load_tokenizer(
    name_or_path: str | Path,
    vocab_size: int | None = None,
    special_tokens: dict[str, str | int] | None = None,
) -> Tokenizer:
    """A built-in name (llama3, qwen3, phi4mini, o200k) or a path to a tokenizer.

    Paths: an HF model directory or tokenizer.json, a SentencePiece .model, a .tiktoken ranks
    file (o200k pattern), or a compact vocabulary ``*.subvocab.json`` (tokenizers/compact.py).
    ``vocab_size`` sets the model's logit count when it exceeds the tokenizer's ids;
    ``special_tokens`` sets roles, e.g. ``{"bos": "<s>"}``.
    """
    key = str(name_or_path)
    if key in BUILTIN_NAMES or key in ALIASES:
        if vocab_size is None and special_tokens is None:
            return _cached_builtin(ALIASES.get(key, key))
        tok = load_builtin(key)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise TokenizerError(f"built-in tokenizer '{key}' has a fixed vocab_size of {tok.vocab_size}")
        tok._apply_special_overrides(special_tokens)
        return tok
    path = Path(name_or_path)
    if key.endswith(".subvocab.json") and path.is_file():
        return _cached_compact(str(path.resolve()), path.stat().st_mtime_ns)
    if not path.exists():
        raise TokenizerError(
            f"tokenizer '{key}' is neither a built-in name ({', '.join(BUILTIN_NAMES)}) nor an existing path; "
            "give a built-in name, an HF model directory, a tokenizer.json, a .model or a .tiktoken file"
        )
    if path.is_dir() or path.suffix == ".json":
        return HFTokenizer(path, name=key, vocab_size=vocab_size, special_tokens=special_tokens)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, name=key, vocab_size=vocab_size, special_tokens=special_tokens)
    if path.suffix in (".tiktoken", ".vocab"):
        return TiktokenTokenizer(read_ranks(path), name=key, vocab_size=vocab_size, roles=special_tokens)
    raise TokenizerError(
        f"cannot tell the tokenizer format of {path}; expected an HF directory, tokenizer.json, .model or .tiktoken"
    )


@lru_cache(maxsize=8)
def _cached_builtin(name: str) -> Tokenizer:
    return load_builtin(name)


@lru_cache(maxsize=8)
def _cached_compact(path: str, mtime_ns: int) -> Tokenizer:
    from xtoken_nemo.tokenizers.compact import load_compact  # lazy: cycle, compact.py imports load_tokenizer

    return load_compact(path)
