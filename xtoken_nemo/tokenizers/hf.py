"""Back end over Hugging Face ``tokenizers`` (a tokenizer.json file or an HF model directory)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.base import Encoding, Tokenizer

SP_SPACE = "\u2581"  # "▁", SentencePiece's space marker


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte->printable-char table ("Ġ" -> 0x20, "Ċ" -> 0x0A)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


def sentencepiece_piece_bytes(piece: str) -> bytes:
    """Surface bytes of a SentencePiece-convention piece: "▁" is a space, "<0xHH>" one byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SP_SPACE, " ").encode("utf-8")


def _walk(node):
    """Yield every dict inside a tokenizer.json component (Sequence nesting included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with our conventions.

    Text is encoded literally: ``encode_special_tokens`` is on, so a ``"<|endoftext|>"`` string
    inside a document is ordinary text (as with tiktoken's ``encode_ordinary``); specials are
    only ever added explicitly (BOS/EOS, packing).
    """

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        vocab_size: int | None = None,
        special_tokens: dict[str, str | int] | None = None,
        drop_ids_from: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        json_path = path / "tokenizer.json" if path.is_dir() else path
        if not json_path.is_file():
            raise TokenizerError(
                f"no tokenizer.json at {json_path}; give a tokenizer.json, an HF model directory, a "
                "SentencePiece .model, a .tiktoken file, or a built-in name (llama3, qwen3, phi4mini, o200k)"
            )
        try:
            spec = json.loads(json_path.read_text(encoding="utf-8"))
            self._tok = RustTokenizer.from_str(json.dumps(spec))
        except Exception as exc:
            raise TokenizerError(
                f"cannot read tokenizer {json_path}: {exc}; check the file is a complete tokenizer.json"
            ) from None
        self._tok.encode_special_tokens = True
        self.name = name or str(path)
        self._fragment_tok = self._without_prefix_space(spec) or self._tok

        config_dir = json_path.parent
        config = self._read_json(config_dir / "tokenizer_config.json")
        model_config = self._read_json(config_dir / "config.json")

        self._byte_level = any(
            d.get("type") == "ByteLevel" for d in _walk([spec.get("decoder"), spec.get("pre_tokenizer")])
        )
        pieces = {tid: piece for piece, tid in spec["model"]["vocab"].items()}
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        known_ids = set(pieces) | set(added)
        if drop_ids_from is not None:
            known_ids = {i for i in known_ids if i < drop_ids_from}
        self._pieces = pieces
        self._added = {i: a for i, a in added.items() if i in known_ids}
        self.special_tokens = {i: a["content"] for i, a in self._added.items() if a.get("special")}

        natural_size = max(known_ids) + 1
        self.vocab_size = vocab_size or int(model_config.get("vocab_size") or 0) or natural_size
        if self.vocab_size < natural_size:
            raise TokenizerError(
                f"tokenizer '{self.name}' has ids up to {natural_size - 1} but vocab_size={self.vocab_size}; "
                "the model's vocab must be at least the tokenizer's"
            )

        self.special_ids = {}
        by_content = {content: i for i, content in self.special_tokens.items()}
        for role in ("bos", "eos", "pad", "unk"):
            content = _token_content(config.get(f"{role}_token"))
            if content is not None and content in by_content:
                self.special_ids[role] = by_content[content]
        if "add_bos_token" in config:
            adds_bos = bool(config["add_bos_token"])
        else:  # no config: the post-processor's template says whether BOS is prepended
            template = [d for d in _walk(spec.get("post_processor")) if d.get("type") == "TemplateProcessing"]
            first = template[0]["single"][0] if template and template[0].get("single") else {}
            adds_bos = "SpecialToken" in first and first["SpecialToken"]["id"] == self.special_tokens.get(
                self.special_ids.get("bos")
            )
        self.adds_bos_by_default = adds_bos and "bos" in self.special_ids
        self._apply_special_overrides(special_tokens)

    @staticmethod
    def _read_json(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{path} is not valid JSON ({exc}); fix or remove it") from None

    @staticmethod
    def _without_prefix_space(spec: dict):
        """A copy of a Metaspace tokenizer that does not prepend "▁" (for mid-text fragments)."""
        from tokenizers import Tokenizer as RustTokenizer

        changed = False
        spec = json.loads(json.dumps(spec))
        for node in _walk([spec.get("pre_tokenizer")]):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                node["prepend_scheme"], changed = "never", True
                node.pop("add_prefix_space", None)
        normalizer = spec.get("normalizer")
        if normalizer:
            for node in _walk([normalizer]):
                seq = node.get("normalizers")
                if isinstance(seq, list):
                    keep = [n for n in seq if not (n.get("type") == "Prepend" and n.get("prepend") == SP_SPACE)]
                    changed |= len(keep) != len(seq)
                    node["normalizers"] = keep
            if normalizer.get("type") == "Prepend" and normalizer.get("prepend") == SP_SPACE:
                spec["normalizer"], changed = None, True
        if not changed:
            return None
        tok = RustTokenizer.from_str(json.dumps(spec))
        tok.encode_special_tokens = True
        return tok

    def _encode_text(self, text: str) -> Encoding:
        enc = self._tok.encode(text, add_special_tokens=False)
        return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._fragment_tok, "encode_batch_fast", self._fragment_tok.encode_batch)
        return [list(e.ids) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _build_surfaces(self) -> list[bytes | None]:
        table: list[bytes | None] = [None] * self.vocab_size
        decoder = byte_level_decoder()
        for tid, piece in self._pieces.items():
            if tid >= self.vocab_size or tid in self.special_tokens:
                continue
            if self._byte_level:
                try:
                    table[tid] = bytes(decoder[c] for c in piece)
                except KeyError:  # a piece outside the byte alphabet: keep its literal text
                    table[tid] = piece.encode("utf-8")
            else:
                table[tid] = sentencepiece_piece_bytes(piece)
        for tid, added in self._added.items():
            if not added.get("special"):
                table[tid] = added["content"].encode("utf-8")
        return table
