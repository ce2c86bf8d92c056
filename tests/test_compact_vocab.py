"""Compact vocabularies (tokenizers/compact.py; W on them: vocab/compact.py): the real tokenizers
restricted to a corpus's ids.

What the demo relies on: the same segmentation and character offsets as the full tokenizer (so the
alignment is the full one), the common set and W equal to the full ones restricted, and a clear
error for text outside the kept ids."""

from __future__ import annotations

import json

import pytest

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.tokenizers.compact import CompactTokenizer, corpus_ids
from xtoken_nemo.vocab.build import build_projection_matrix
from xtoken_nemo.vocab.canonical import exact_matches
from xtoken_nemo.vocab.compact import projection_support, restrict_projection

TEXTS = [
    "The room of Alice is 47.",
    "The room of Zoe is 98.\nEvery room has a number.",
    "Counting 1, 12, 123 and 1234.",
]


@pytest.fixture(scope="module")
def full():
    return load_tokenizer("llama3"), load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def compact(full, tmp_path_factory):
    llama, qwen = full
    W = build_projection_matrix(llama, qwen, progress=False)
    s_ids = corpus_ids(llama, TEXTS)
    t_ids = corpus_ids(qwen, TEXTS) | projection_support(W, s_ids)
    d = tmp_path_factory.mktemp("vocab")
    CompactTokenizer(llama, sorted(s_ids), name="llama3").save(d / "llama3.subvocab.json", base_spec="llama3")
    CompactTokenizer(qwen, sorted(t_ids), name="qwen3").save(d / "qwen3.subvocab.json", base_spec="qwen3")
    return W, load_tokenizer(str(d / "llama3.subvocab.json")), load_tokenizer(str(d / "qwen3.subvocab.json")), d


def test_same_segmentation_offsets_and_surfaces(full, compact):
    _, s, t, _ = compact
    for base, small in zip(full, (s, t)):
        assert small.vocab_size < 200 and small.vocab_size == len(small.kept_ids)
        for text in TEXTS:
            a, b = base.encode(text, add_eos=True), small.encode(text, add_eos=True)
            assert b.offsets == a.offsets
            assert small.to_base(b.ids) == a.ids
            assert [small.surfaces[i] for i in b.ids] == [base.surfaces[i] for i in a.ids]
            assert small.decode(b.ids) == base.decode(a.ids)
            assert small.encode_batch([text])[0] == small.encode(text, add_bos=False).ids
        assert set(small.special_ids) == {r for r, i in base.special_ids.items() if i in small.kept_ids}
        assert small.eos_id is not None


def test_text_outside_the_vocabulary_is_a_clear_error(compact):
    _, s, _, _ = compact
    with pytest.raises(TokenizerError, match="not in the compact vocabulary 'llama3'.*rebuild it"):
        s.encode("Quantum chromodynamics")


def test_common_set_and_W_are_the_full_ones_restricted(full, compact):
    llama, qwen = full
    W, s, t, _ = compact
    full_pairs = {(a, b) for a, b in exact_matches(llama, qwen).pairs()}
    kept = {(s.kept_ids[a], t.kept_ids[b]) for a, b in exact_matches(s, t).pairs()}
    assert kept == {(a, b) for a, b in full_pairs if a in set(s.kept_ids) and b in set(t.kept_ids)}

    Wc = restrict_projection(W, s, t)
    Wc.check_tokenizers(s, t)
    assert Wc.shape == (s.vocab_size, t.vocab_size)
    for c, base_id in enumerate(s.kept_ids):
        # every kept row is the full row, renumbered: no row loses mass
        assert {t.kept_ids[j]: w for j, w in Wc.row(c).items()} == W.row(base_id)
    assert Wc.nnz > 0


def test_restriction_refuses_a_teacher_vocabulary_missing_W_columns(full, compact):
    _, qwen = full
    W, s, _, _ = compact
    t_small = CompactTokenizer(qwen, sorted(corpus_ids(qwen, TEXTS[:1])), name="qwen3-too-small")
    with pytest.raises(TokenizerError, match="outside the compact teacher vocabulary"):
        restrict_projection(W, s, t_small)


def test_file_checks(compact, tmp_path):
    _, _, _, d = compact
    data = json.loads((d / "llama3.subvocab.json").read_text())
    data["base_fingerprint"] = "0" * 64
    bad = tmp_path / "other.subvocab.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="made from another 'llama3' tokenizer"):
        load_tokenizer(str(bad))
    broken = tmp_path / "broken.subvocab.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        load_tokenizer(str(broken))
