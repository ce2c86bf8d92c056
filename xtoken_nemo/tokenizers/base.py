"""The one tokenizer interface every back end (HF tokenizers, SentencePiece, tiktoken) provides.

Terms used throughout the package:
- *surface*: the bytes a token stands for in running text (``"Ġ201"`` -> ``b" 201"``,
  ``"▁Hund"`` -> ``b" Hund"``, ``<0x0A>`` -> ``b"\\n"``). Special/control tokens have none.
- *vocab_size*: the number of rows of the model's output layer, which can exceed the ids the
  tokenizer knows (Qwen3-4B: 151,936 logits for 151,669 tokenizer ids). Ids without a token are
  "unused": no surface, never produced by ``encode``.
- *roles*: special tokens by role, so that families can be matched (``bos``, ``eos``, ``pad``,
  ``unk``, ``start_of_turn``, ``end_of_turn``).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

from xtoken_nemo.errors import TokenizerError

ROLES = ("bos", "eos", "pad", "unk", "start_of_turn", "end_of_turn")


def char_index_of_bytes(text: str) -> list[int]:
    """[len(utf8) + 1] the character each UTF-8 byte of ``text`` belongs to; the last entry is
    len(text) (the end). Turns byte offsets (SentencePiece spans, tiktoken token bytes) into
    character offsets."""
    index: list[int] = []
    for ci, ch in enumerate(text):
        index.extend([ci] * len(ch.encode("utf-8")))
    index.append(len(text))
    return index


@dataclass(frozen=True)
class Encoding:
    """Token ids of one text with their character spans.

    ids:     [n] token ids.
    offsets: [n] (start, end) character offsets into the text; a token added by the tokenizer
             (BOS/EOS) has an empty span (start == end) at the position it was added.
    """

    ids: list[int]
    offsets: list[tuple[int, int]]


class Tokenizer(ABC):
    """A loaded tokenizer. Subclasses fill the abstract methods; the rest is shared."""

    name: str
    vocab_size: int
    #: role -> token id, only for roles this tokenizer has
    special_ids: dict[str, int]
    #: every special/control id -> its literal content (e.g. ``"<|eot_id|>"``)
    special_tokens: dict[int, str]
    #: whether ``encode`` adds BOS unless told otherwise (the family's own convention)
    adds_bos_by_default: bool = False

    # ----- back-end specific ----------------------------------------------------------------
    @abstractmethod
    def _encode_text(self, text: str) -> Encoding:
        """Encode text literally (special-token strings in it are ordinary text), no BOS/EOS."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts as they would be encoded mid-document (no BOS/EOS), batched."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of a sequence of ids (special tokens rendered as their literal content)."""

    @abstractmethod
    def _build_surfaces(self) -> list[bytes | None]:
        """[vocab_size] surface bytes per id; None for special and unused ids."""

    # ----- shared ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> Encoding:
        """Ids and character offsets of ``text``; BOS by the family's default unless given."""
        enc = self._encode_text(text)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if self.adds_bos_by_default if add_bos is None else add_bos:
            ids.insert(0, self.require("bos"))
            offsets.insert(0, (0, 0))
        if add_eos:
            ids.append(self.require("eos"))
            offsets.append((len(text), len(text)))
        return Encoding(ids, offsets)

    @cached_property
    def surfaces(self) -> list[bytes | None]:
        """[vocab_size] surface bytes per id (None for special/unused ids)."""
        table = self._build_surfaces()
        if len(table) != self.vocab_size:
            raise TokenizerError(
                f"tokenizer '{self.name}': surface table has {len(table)} ids, expected {self.vocab_size}"
            )
        return table

    def token_text(self, token_id: int) -> str:
        """Readable text of one id: its surface (undecodable bytes escaped) or special content."""
        surface = self.surfaces[token_id]
        if surface is not None:
            return surface.decode("utf-8", errors="backslashreplace")
        return self.special_tokens.get(token_id, f"<unused:{token_id}>")

    def role_of(self, token_id: int) -> list[str]:
        return [role for role, tid in self.special_ids.items() if tid == token_id]

    def require(self, role: str) -> int:
        """The id of a special role, or a TokenizerError saying how to supply it."""
        if role not in self.special_ids:
            raise TokenizerError(
                f"tokenizer '{self.name}' has no {role.upper()} token; "
                + (
                    "encode with add_bos=False (this family does not use one) or name a token with "
                    f"load_tokenizer(..., special_tokens={{'{role}': '<token>'}})"
                    if role == "bos"
                    else f"name one with load_tokenizer(..., special_tokens={{'{role}': '<token>'}})"
                )
            )
        return self.special_ids[role]

    @property
    def bos_id(self) -> int | None:
        return self.special_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("eos")

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.get("pad")

    @property
    def num_tokens(self) -> int:
        """Ids that are real tokens (have a surface or are special); the rest are unused."""
        return sum(1 for i, s in enumerate(self.surfaces) if s is not None or i in self.special_tokens)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every id's surface/special content and the roles: equal iff same vocab."""
        h = hashlib.sha256()
        h.update(f"vocab_size={self.vocab_size}\n".encode())
        for tid, surface in enumerate(self.surfaces):
            if surface is not None:
                h.update(b"T" + len(surface).to_bytes(4, "little") + surface)
            elif tid in self.special_tokens:
                content = self.special_tokens[tid].encode()
                h.update(b"S" + len(content).to_bytes(4, "little") + content)
            else:
                h.update(b"U")
        for role in sorted(self.special_ids):
            h.update(f"{role}={self.special_ids[role]}\n".encode())
        return h.hexdigest()

    def describe(self) -> str:
        roles = ", ".join(f"{r}={self.special_tokens.get(i, i)}" for r, i in sorted(self.special_ids.items()))
        return f"{self.name}: vocab_size={self.vocab_size}, roles: {roles or 'none'}"

    def _apply_special_overrides(self, overrides: dict[str, str | int] | None) -> None:
        """Set roles from {role: token content or id}; unknown roles/tokens are errors."""
        for role, token in (overrides or {}).items():
            if role not in ROLES:
                raise TokenizerError(f"unknown special-token role '{role}'; roles are {', '.join(ROLES)}")
            if token is None:
                self.special_ids.pop(role, None)
                continue
            if isinstance(token, int):
                tid = token
            else:
                matches = [i for i, content in self.special_tokens.items() if content == token]
                if not matches:
                    raise TokenizerError(
                        f"tokenizer '{self.name}' has no special token {token!r} to use as {role}; "
                        f"its special tokens include {sorted(self.special_tokens.values())[:8]}"
                    )
                tid = matches[0]
            if not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"{role} id {tid} is outside tokenizer '{self.name}' vocab of {self.vocab_size}")
            self.special_ids[role] = tid
