import pytest


@pytest.fixture(scope="session")
def llama3():
    from xtoken_nemo.tokenizers import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="session")
def qwen3():
    from xtoken_nemo.tokenizers import load_tokenizer

    return load_tokenizer("qwen3")


@pytest.fixture(scope="session")
def phi4mini():
    from xtoken_nemo.tokenizers import load_tokenizer

    return load_tokenizer("phi4mini")


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A real SentencePiece BPE model (byte fallback on) trained here on a small corpus."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    lines = []
    for i in range(400):
        lines.append(f"The international meeting number {i} started at {i % 24}:{i % 60:02d} with {i * 7} people.")
        lines.append(f"def function_{i % 13}(x):\n    return x * {i} + {i % 9}")
        lines.append("Hundreds of students read the books, and the teachers wrote notes.")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tiny"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
    )
    return out / "tiny.model"
