"""W (docs/method.md, "The projection matrix W") and the coverage audit on the real built-in tokenizers."""

import json

import pytest
import torch

from xtoken_nemo.errors import ProjectionMatrixError
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.vocab import ProjectionMatrix
from xtoken_nemo.vocab.audit import audit
from xtoken_nemo.vocab.build import BuildConfig, build_projection_matrix


@pytest.fixture(scope="module")
def w_qwen(llama3, qwen3):
    return build_projection_matrix(llama3, qwen3, progress=False)


@pytest.fixture(scope="module")
def w_phi(llama3, phi4mini):
    return build_projection_matrix(llama3, phi4mini, progress=False)


def _sid(tok, text):
    ids = tok.encode(text, add_bos=False).ids
    assert len(ids) == 1, f"{text!r} is not a single {tok.name} token"
    return ids[0]


def _named_row(W, student, teacher, text):
    return {teacher.token_text(t): round(w, 4) for t, w in W.row(_sid(student, text)).items()}


@pytest.mark.parametrize("fixture", ["w_qwen", "w_phi"])
def test_rows_on_the_simplex_or_zero(request, fixture):
    W = request.getfixturevalue(fixture)
    assert (W.values >= 0).all()
    sums = W.values.sum(dim=1)
    nonzero = W.row_nnz() > 0
    assert torch.allclose(sums[nonzero], torch.ones(int(nonzero.sum())), atol=1e-6)
    assert (sums[~nonzero] == 0).all()
    assert (W.row_nnz() <= 4).all()
    assert W.shape[0] == 128256


def test_multi_token_weights_as_in_the_method(w_qwen, w_phi, llama3, qwen3, phi4mini):
    # Llama's "201" is three Qwen3 digits: (0.9009, 0.0901, 0.0090)
    assert _named_row(w_qwen, llama3, qwen3, "201") == {"2": 0.9009, "0": 0.0901, "1": 0.009}
    # the paper's over-conservative-matching example: "Hundreds" = "Hund" + "reds" in Phi-4-mini
    assert _named_row(w_phi, llama3, phi4mini, "Hundreds") == {"Hund": 0.9091, "reds": 0.0909}
    assert _named_row(w_phi, llama3, phi4mini, "201") == {"201": 1.0}
    # a 4-piece row carries (0.9000, 0.0900, 0.0090, 0.0009)
    # (the exact values are 0.9 * 0.1^i / 0.9999; docs/method.md prints them to 4 places)
    four = torch.nonzero(w_qwen.row_nnz() == 4).squeeze(1)
    distinct = [int(s) for s in four if len(set(w_qwen.indices[s].tolist())) == 4]
    assert distinct, "expected some 4-piece rows"
    vals = sorted(w_qwen.values[distinct[0]].tolist(), reverse=True)
    assert vals == pytest.approx([0.9 * 0.1**i / 0.9999 for i in range(4)], rel=1e-5)
    assert vals == pytest.approx([0.9000, 0.0900, 0.0090, 0.0009], abs=2e-4)


def test_exact_and_special_rows(w_qwen, llama3, qwen3):
    assert _named_row(w_qwen, llama3, qwen3, " international") == {" international": 1.0}
    assert w_qwen.row(llama3.eos_id) == {qwen3.eos_id: 1.0}
    assert w_qwen.row(llama3.special_ids["end_of_turn"]) == {qwen3.special_ids["end_of_turn"]: 1.0}
    assert w_qwen.row(llama3.bos_id) == {}  # Qwen3 has no BOS: a zero row, counted
    stats = w_qwen.builder_stats()
    assert stats["exact_rows"] > 100_000
    assert stats["zero_rows"] == int((w_qwen.row_nnz() == 0).sum())


def test_long_row_policies(llama3, qwen3, w_qwen):
    stats = w_qwen.builder_stats()
    assert stats["long_rows"] > 0 and stats["long_rows_policy"] == "zero"
    truncated = build_projection_matrix(llama3, qwen3, BuildConfig(long_rows="truncate"), progress=False)
    t_stats = truncated.builder_stats()
    assert t_stats["long_rows"] == stats["long_rows"]
    assert t_stats["zero_rows"] == stats["zero_rows"] - stats["long_rows"]
    # a long row keeps its first 4 pieces with the method's weights
    changed = torch.nonzero((w_qwen.row_nnz() == 0) & (truncated.row_nnz() > 0)).squeeze(1)
    assert len(changed) == stats["long_rows"]
    assert abs(truncated.values[changed[0]].sum().item() - 1) < 1e-6


def test_save_load_round_trip(tmp_path, w_qwen, llama3, qwen3):
    path = tmp_path / "W.safetensors"
    w_qwen.save(path)
    loaded = ProjectionMatrix.load(path, llama3, qwen3)
    assert loaded.shape == (128256, 151936)
    assert torch.equal(loaded.indices, w_qwen.indices) and torch.equal(loaded.values, w_qwen.values)
    assert loaded.metadata["student_fingerprint"] == llama3.fingerprint
    assert json.loads(loaded.metadata["builder"])["beta"] == 0.9
    assert loaded.builder_stats() == w_qwen.builder_stats()


def test_load_refuses_other_tokenizers(tmp_path, w_qwen, llama3, phi4mini):
    path = tmp_path / "W.safetensors"
    w_qwen.save(path)
    with pytest.raises(
        ProjectionMatrixError, match="built for teacher tokenizer 'qwen3'.*rebuild it with `xtoken build-w`"
    ):
        ProjectionMatrix.load(path, llama3, phi4mini)
    with pytest.raises(ProjectionMatrixError, match="built for student tokenizer 'llama3'"):
        ProjectionMatrix.load(path, phi4mini, None)


def test_bad_files(tmp_path, w_qwen):
    path = tmp_path / "W.safetensors"
    w_qwen.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProjectionMatrixError, match="corrupt or truncated.*rebuild it") as info:
        ProjectionMatrix.load(truncated)
    assert "\n" not in str(info.value)
    with pytest.raises(ProjectionMatrixError, match="does not exist"):
        ProjectionMatrix.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ProjectionMatrixError, match="not an xtoken-nemo projection matrix"):
        ProjectionMatrix.load(other)


def _small_w():
    # rows with 0..4 non-zeros, teacher vocab 7
    idx = torch.tensor(
        [[-1, -1, -1, -1], [3, -1, -1, -1], [0, 5, -1, -1], [1, 2, 6, -1], [4, 0, 2, 3], [6, -1, -1, -1]]
    )
    val = torch.tensor(
        [
            [0.0] * 4,
            [1.0, 0, 0, 0],
            [0.909, 0.091, 0, 0],
            [0.9, 0.09, 0.01, 0],
            [0.9, 0.09, 0.009, 0.001],
            [1.0, 0, 0, 0],
        ]
    )
    return ProjectionMatrix(idx, val, 7)


def test_dense_sparse_and_shards():
    W = _small_w()
    dense = W.to_dense()
    assert dense.shape == (6, 7) and dense[4, 3] == pytest.approx(0.001) and dense[0].sum() == 0
    assert torch.allclose(W.to_sparse_csr().to_dense(), dense)
    assert torch.allclose(W.to_sparse_coo().to_dense(), dense)
    # tp=4 with Megatron-style padding to 8 rows: shards concatenate to W plus zero rows
    shards = [W.shard_rows(r, 4, padded_vocab_size=8) for r in range(4)]
    assert all(s.shape == (2, 7) for s in shards)
    stacked = torch.cat([s.to_dense() for s in shards])
    assert torch.equal(stacked[:6], dense) and stacked[6:].sum() == 0
    assert W.argmax_pairs().tolist() == [[1, 3], [2, 0], [3, 1], [4, 4], [5, 6]]
    with pytest.raises(ProjectionMatrixError, match="divisible"):
        W.shard_rows(0, 4, padded_vocab_size=6)


def test_sentencepiece_student_matches_byte_level_teacher(sp_model_path, llama3):
    sp = load_tokenizer(sp_model_path)
    W = build_projection_matrix(sp, llama3, progress=False)
    the = [i for i in range(sp.vocab_size) if sp.surfaces[i] == b" the"][0]
    assert W.row(the) == {_sid(llama3, " the"): 1.0}  # "▁the" == "Ġthe"
    newline = [i for i in range(sp.vocab_size) if sp.surfaces[i] == b"\n"][0]
    assert W.row(newline) == {_sid(llama3, "\n"): 1.0}  # <0x0A> byte fallback == "Ċ"
    assert W.row(sp.eos_id) == {llama3.eos_id: 1.0}  # </s> -> <|end_of_text|> by role
    assert W.row(sp.bos_id) == {llama3.bos_id: 1.0}
    sums = W.values.sum(1)
    assert torch.allclose(sums[W.row_nnz() > 0], torch.tensor(1.0))


def test_audit_reproduces_table_8(llama3, qwen3, phi4mini):
    q = audit(llama3, qwen3).to_json()
    assert q["categories"]["numerals_2"] == {
        "covered": 0,
        "total": 100,
        "missing_examples": q["categories"]["numerals_2"]["missing_examples"],
    }
    assert (q["categories"]["numerals_3"]["covered"], q["categories"]["numerals_3"]["total"]) == (0, 1000)
    assert q["recommended_loss"] == "pkl" and "numerals_2 0/100" in q["reason"]
    p = audit(llama3, phi4mini).to_json()
    assert (p["categories"]["numerals_2"]["covered"], p["categories"]["numerals_2"]["total"]) == (100, 100)
    assert (p["categories"]["numerals_3"]["covered"], p["categories"]["numerals_3"]["total"]) == (1000, 1000)
    assert p["recommended_loss"] == "hkl"
    for report in (q, p):
        for cat in ("digits_1", "ascii_punct"):
            c = report["categories"][cat]
            assert c["covered"] == c["total"] > 0
        assert report["common_size"] > 100_000
