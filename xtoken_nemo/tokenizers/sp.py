"""Back end over a SentencePiece ``.model`` file."""

from __future__ import annotations

from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.base import Encoding, Tokenizer, char_index_of_bytes
from xtoken_nemo.tokenizers.hf import sentencepiece_piece_bytes


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece with surfaces in bytes ("▁" -> space, ``<0xHH>`` byte fallback).

    ``encode_batch`` encodes text as it appears mid-document: a second processor built from the
    same model with ``add_dummy_prefix`` off, so "national" is not turned into "▁national".
    """

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        vocab_size: int | None = None,
        special_tokens: dict[str, str | int] | None = None,
    ) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"SentencePiece model {path} does not exist; give the path of a .model file")
        self.name = name or str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise TokenizerError(
                f"cannot load SentencePiece model {path} ({exc}); check it is a complete .model file"
            ) from None
        self._fragment_sp = self._without_dummy_prefix(path.read_bytes()) or self._sp
        size = self._sp.get_piece_size()
        self.vocab_size = vocab_size or size
        if self.vocab_size < size:
            raise TokenizerError(
                f"vocab_size={self.vocab_size} is smaller than SentencePiece model {path}'s {size} pieces"
            )
        self.special_tokens = {
            i: self._sp.id_to_piece(i) for i in range(size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        self.special_ids = {}
        for role, tid in (
            ("bos", self._sp.bos_id()),
            ("eos", self._sp.eos_id()),
            ("pad", self._sp.pad_id()),
            ("unk", self._sp.unk_id()),
        ):
            if tid >= 0:
                self.special_ids[role] = tid
        self.adds_bos_by_default = "bos" in self.special_ids
        self._apply_special_overrides(special_tokens)

    @staticmethod
    def _without_dummy_prefix(model_bytes: bytes):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        if not proto.normalizer_spec.add_dummy_prefix:
            return None
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _encode_text(self, text: str) -> Encoding:
        proto = self._encode_proto(text)
        # SentencePiece spans are byte offsets into the UTF-8 input; we expose character offsets.
        char_at = char_index_of_bytes(text)
        num_bytes = len(char_at) - 1
        ids, offsets = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            start = char_at[piece.begin]
            end = char_at[piece.end] if piece.end <= num_bytes else len(text)
            if piece.end > piece.begin and end == start:
                end = start + 1
            offsets.append((start, end))
        return Encoding(ids, offsets)

    def _encode_proto(self, text: str):
        # sentencepiece >= 0.2.1 returns spans as return_type="proto"; older releases only as
        # out_type="immutable_proto".
        try:
            return self._sp.encode(text, return_type="proto")
        except TypeError:
            return self._sp.encode(text, out_type="immutable_proto")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._fragment_sp.encode(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def _build_surfaces(self) -> list[bytes | None]:
        table: list[bytes | None] = [None] * self.vocab_size
        for tid in range(self._sp.get_piece_size()):
            if tid in self.special_tokens or self._sp.is_unused(tid):
                continue
            table[tid] = sentencepiece_piece_bytes(self._sp.id_to_piece(tid))
        return table
