"""Models on megatron-core vs the real oracle (transformers): parity TP=1/TP=2, round trips, bad input.

Tiny random models keep the real architecture shapes of Llama-3.2 (tied, llama3 rope scaling, GQA),
Qwen3 (QK-norm, head_dim != hidden/heads, tied and untied) and Phi-4-mini (Phi3ForCausalLM: fused
qkv and gate_up, partial rotary 0.75, LongRoPE, tied), with a cut vocabulary. All TP=2 checks run in
one spawned 2-process gloo job (module fixture).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

from xtoken_nemo.models import ModelError, arch_from_hf_config, pad_vocab_size

ATOL = 2e-5  # fp32; measured max |diff| is ~1e-6 on logits of magnitude ~2 (TP=1 and TP=2)
SHORT, LONG = 12, 40  # Phi-3 case: original_max_position_embeddings=32, so LONG uses long_factor


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    return LlamaConfig(**{**base, **kw})


def _qwen3_config(**kw):
    from transformers import Qwen3Config

    base = dict(
        vocab_size=1500,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    return Qwen3Config(**{**base, **kw})


def _phi3_config(**kw):
    from transformers import Phi3Config

    base = dict(
        vocab_size=1000,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        original_max_position_embeddings=32,
        partial_rotary_factor=0.75,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.05,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(6)],
            "long_factor": [1.0 + 0.9 * i for i in range(6)],
        },
    )
    return Phi3Config(**{**base, **kw})


CASES = {
    "llama32_tied": ("LlamaForCausalLM", _llama_config),
    "qwen3_untied": ("Qwen3ForCausalLM", _qwen3_config),
    "qwen3_tied": ("Qwen3ForCausalLM", lambda: _qwen3_config(tie_word_embeddings=True, vocab_size=1000)),
    "phi4mini_tied": ("Phi3ForCausalLM", _phi3_config),
}


def _make_hf(case: str, out: Path, seed: int = 0):
    import transformers

    cls_name, make_config = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(make_config()).eval()
    with torch.no_grad():  # norms at 1.0 would hide a wrong norm mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per case: HF dir, HF model, mcore checkpoint (converted at TP=1), ids and HF reference logits."""
    from xtoken_nemo.models import hf_to_mcore

    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, case in enumerate(CASES):
        hf_dir, ck_dir = root / f"{case}-hf", root / f"{case}-mcore"
        model = _make_hf(case, hf_dir, seed=i)
        meta = hf_to_mcore(hf_dir, ck_dir)
        g = torch.Generator().manual_seed(100 + i)
        ids = {n: torch.randint(0, model.config.vocab_size, (2, n), generator=g) for n in (SHORT, LONG)}
        with torch.no_grad():
            ref = {n: model(x).logits for n, x in ids.items()}
        out[case] = dict(hf_dir=hf_dir, ckpt=ck_dir, model=model, meta=meta, ids=ids, ref=ref)
    return out


def _tp2_worker(rank, world_size, cases):
    from megatron.core import parallel_state

    from xtoken_nemo.models.build import forward_logits
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint, save_mcore_checkpoint

    results = {}
    for case, (ckpt, ids, resave_dir) in cases.items():
        model, arch, meta = load_mcore_checkpoint(ckpt)
        with torch.no_grad():
            logits = {n: forward_logits(model, x, arch) for n, x in ids.items()}
        save_mcore_checkpoint(model, resave_dir, meta)  # a TP=2-written checkpoint, reloaded at TP=1 below
        results[case] = {"logits": logits, "tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    return results


@pytest.fixture(scope="module")
def tp2(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    payload = {case: (str(b["ckpt"]), b["ids"], str(root / f"{case}-tp2")) for case, b in built.items()}
    results = run_distributed(_tp2_worker, world_size=2, tp=2, args=(payload,))
    return results, {case: Path(v[2]) for case, v in payload.items()}


def _mcore_logits(ckpt, ids):
    from xtoken_nemo.models.build import forward_logits
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint
    from xtoken_nemo.models.runtime import ensure_model_parallel

    ensure_model_parallel(1)
    model, arch, meta = load_mcore_checkpoint(ckpt)
    with torch.no_grad():
        return {n: forward_logits(model, x, arch) for n, x in ids.items()}, arch, meta


# ---- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_tp1(built, case):
    b = built[case]
    logits, arch, meta = _mcore_logits(b["ckpt"], b["ids"])
    V = arch.vocab_size
    for n in (SHORT, LONG):
        got, ref = logits[n], b["ref"][n]
        assert got.shape == (2, n, meta["padded_vocab_size"])
        torch.testing.assert_close(got[..., :V], ref, atol=ATOL, rtol=1e-5)
        assert torch.count_nonzero(got[..., V:]) == 0  # padded rows are zero -> logits 0, masked downstream


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_tp2(built, tp2, case):
    results, _ = tp2
    b = built[case]
    V = b["meta"]["vocab_size"]
    assert [r[case]["tp_rank"] for r in results] == [0, 1]
    for n in (SHORT, LONG):
        shards = [r[case]["logits"][n] for r in results]
        assert shards[0].shape[-1] == b["meta"]["padded_vocab_size"] // 2  # [b, s, V/tp]
        full = torch.cat(shards, dim=-1)
        torch.testing.assert_close(full[..., :V], b["ref"][n], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_untied", "phi4mini_tied"])
def test_checkpoint_saved_at_tp2_loads_at_tp1(built, tp2, case):
    _, resaved = tp2
    b = built[case]
    logits, arch, _ = _mcore_logits(resaved[case], b["ids"])
    for n in (SHORT, LONG):
        torch.testing.assert_close(logits[n][..., : arch.vocab_size], b["ref"][n], atol=ATOL, rtol=1e-5)


def test_longrope_long_path_is_exercised(built):
    """The Phi-3 case's LONG ids exceed original_max_position_embeddings: long factors are used."""
    from xtoken_nemo.models.rope import rope_inv_freq

    arch = arch_from_hf_config(built["phi4mini_tied"]["hf_dir"])
    assert SHORT <= arch.rope.original_max_position_embeddings < LONG
    assert not torch.equal(rope_inv_freq(arch, SHORT), rope_inv_freq(arch, LONG))


# ---- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_hf_mcore_hf_identical(built, case, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from xtoken_nemo.models import mcore_to_hf

    b = built[case]
    out = tmp_path / "hf"
    mcore_to_hf(b["ckpt"], out, like=b["hf_dir"])
    orig, back = load_file(b["hf_dir"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(orig) == sorted(back)
    for name in orig:
        assert orig[name].dtype == back[name].dtype and torch.equal(orig[name], back[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((b["hf_dir"] / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == CASES[case][0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(b["ids"][SHORT]).logits, b["ref"][SHORT], atol=0, rtol=0)


def test_mcore_to_hf_shards_and_index(built, tmp_path):
    """Small shard limit: several safetensors files plus an index that transformers follows."""
    import transformers

    from xtoken_nemo.models import mcore_to_hf

    b = built["qwen3_untied"]
    out = tmp_path / "sharded"
    files = mcore_to_hf(b["ckpt"], out, like=b["hf_dir"], max_shard_bytes=64 * 1024)
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(b["ids"][SHORT]).logits, b["ref"][SHORT], atol=0, rtol=0)


# ---- rope and configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        _llama_config,
        lambda: _llama_config(rope_scaling={"rope_type": "linear", "factor": 4.0}),
        lambda: _llama_config(rope_scaling=None),
        _phi3_config,
        lambda: _phi3_config(rope_scaling=None, partial_rotary_factor=0.5),
    ],
)
def test_rope_frequencies_match_transformers(make):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from xtoken_nemo.models.rope import rope_attention_factor, rope_inv_freq

    cfg = make()
    arch = arch_from_hf_config(cfg.to_dict())
    rope_type = cfg.rope_parameters["rope_type"]
    for seq_len in (8, 10_000):
        if rope_type == "default":
            from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

            ref, factor = Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
        else:
            ref, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
        got = rope_inv_freq(arch, seq_len)
        assert got.dtype == torch.float32 and torch.equal(got, ref), (rope_type, seq_len)
        assert rope_attention_factor(arch) == pytest.approx(factor, rel=1e-12)


REAL_CONFIGS = {  # the fields that matter, as in the published config.json files
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "Qwen3-4B": {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "attention_bias": False,
        "sliding_window": None,
        "max_window_layers": 36,
    },
    "Phi-4-mini-instruct": {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "vocab_size": 200064,
        "hidden_act": "silu",
        "sliding_window": 262144,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "lm_head_bias": False,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0 + i for i in range(48)], "short_factor": [1.0] * 48},
    },
}


def test_real_configs_parse_to_megatron():
    from xtoken_nemo.models.build import gpt_model_args, transformer_config
    from xtoken_nemo.models.rope import rope_attention_factor

    llama = arch_from_hf_config(REAL_CONFIGS["Llama-3.2-1B"])
    assert (llama.family, llama.tie_embeddings, llama.rope.rope_type, llama.rope.original_max_position_embeddings) == (
        "llama",
        True,
        "llama3",
        8192,
    )
    qwen = arch_from_hf_config(REAL_CONFIGS["Qwen3-4B"])
    assert (qwen.qk_layernorm, qwen.head_dim, qwen.num_query_groups) == (True, 128, 8)
    phi = arch_from_hf_config(REAL_CONFIGS["Phi-4-mini-instruct"])
    assert (phi.head_dim, phi.rotary_dim, phi.rope.rope_type, phi.sliding_window) == (128, 96, "longrope", 262144)
    assert rope_attention_factor(phi) == pytest.approx(
        (1 + __import__("math").log(32) / __import__("math").log(4096)) ** 0.5
    )
    # Megatron padding: multiple of 128 x tp
    assert [a.padded_vocab_size(1) for a in (llama, qwen, phi)] == [128256, 151936, 200064]
    assert llama.padded_vocab_size(8) == 129024 and phi.padded_vocab_size(2) == 200192
    assert pad_vocab_size(1000, tp=2, divisor=64) == 1024
    cfg = transformer_config(qwen, tp=8)
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.qk_layernorm, cfg.hidden_size) == (128, 8, True, 2560)
    args = gpt_model_args(phi, phi.padded_vocab_size(1))
    assert args.share_embeddings_and_output_weights and args.rotary_percent == 0.75


# ---- bad input -----------------------------------------------------------------------------------


def _copy_hf(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["unsupported architecture", "GPT2LMHeadModel"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ["rope_type", "yarn"]),
        ({"attention_bias": True}, ["attention_bias"]),
        ({"hidden_act": "gelu"}, ["hidden_act"]),
        ({"num_attention_heads": 5}, ["num_attention_heads", "num_key_value_heads"]),
    ],
)
def test_unsupported_configs_name_the_field(built, change, words):
    cfg = json.loads((built["llama32_tied"]["hf_dir"] / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelError) as err:
        arch_from_hf_config(cfg)
    for word in words:
        assert word in str(err.value)


def test_longrope_factor_length_mismatch_names_field(built):
    cfg = json.loads((built["phi4mini_tied"]["hf_dir"] / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = dict(cfg[key], short_factor=[1.0] * 5)
    with pytest.raises(ModelError, match="short_factor must be a list of 6"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_key_value_heads": 4}, ["k_proj.weight", "num_key_value_heads=4", "disagree"]),
        ({"intermediate_size": 100}, ["intermediate_size=100", "disagree"]),
        ({"num_hidden_layers": 1}, ["num_hidden_layers=1", "model.layers.1."]),
        ({"tie_word_embeddings": False}, ["lm_head.weight", "tie_word_embeddings"]),
        ({"vocab_size": 1024}, ["embed_tokens.weight", "vocab_size=1024"]),
    ],
)
def test_config_weights_mismatch_names_field(built, tmp_path, change, words):
    from xtoken_nemo.models import hf_to_mcore

    bad = _copy_hf(built["llama32_tied"]["hf_dir"], tmp_path / "bad", **change)
    with pytest.raises(ModelError) as err:
        hf_to_mcore(bad, tmp_path / "out")
    for word in words:
        assert word in str(err.value)


def test_conversion_refuses_bad_tp_and_dirs(built, tmp_path):
    from xtoken_nemo.models import hf_to_mcore, mcore_to_hf

    b = built["phi4mini_tied"]
    with pytest.raises(ModelError, match="num_attention_heads=6 is not divisible by tensor-parallel size 4"):
        hf_to_mcore(b["hf_dir"], tmp_path / "x", tp=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        hf_to_mcore(b["hf_dir"], tmp_path / "full")
    with pytest.raises(ModelError, match="xtoken_model.json"):
        mcore_to_hf(b["hf_dir"], tmp_path / "y")
    with pytest.raises(ModelError, match="different model"):
        mcore_to_hf(b["ckpt"], tmp_path / "z", like=built["llama32_tied"]["hf_dir"])


def test_padded_vocab_must_divide_tp(built):
    from xtoken_nemo.models.config import check_tp

    arch = arch_from_hf_config(built["llama32_tied"]["hf_dir"])
    check_tp(arch, 2, 1024)
    with pytest.raises(ModelError, match="padded_vocab_size=1001.*--tp 2"):
        check_tp(arch, 2, 1001)
    with pytest.raises(ModelError, match="padded_vocab_size=1027"):
        check_tp(arch, 2, 1027)


def test_tokenizer_larger_than_model_vocab_is_refused(built, llama3, capsys):
    from xtoken_nemo.cli.models import add_score_parser

    parser = argparse.ArgumentParser()
    add_score_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["score", "--checkpoint", str(built["llama32_tied"]["ckpt"]), "--tokenizer", "llama3", "--text", "hi"]
    )
    with pytest.raises(ModelError, match="vocab_size 128256 but the model's config.json vocab_size is 1000"):
        args.func(args)


# ---- CLI -----------------------------------------------------------------------------------------


def _parser():
    from xtoken_nemo.cli.models import add_convert_parser, add_score_parser

    parser = argparse.ArgumentParser(prog="xtoken")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    add_score_parser(sub)
    return parser


def test_cli_convert_both_ways_and_score(built, sp_model_path, tmp_path, capsys):
    from xtoken_nemo.tokenizers import load_tokenizer

    b = built["qwen3_untied"]
    parser = _parser()
    ck, back = tmp_path / "ck", tmp_path / "back"
    args = parser.parse_args(
        [
            "convert",
            "hf-to-mcore",
            "--hf",
            str(b["hf_dir"]),
            "--out",
            str(ck),
            "--tp",
            "2",
            "--vocab-divisor",
            "100",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    meta = json.loads((ck / "xtoken_model.json").read_text())
    assert (meta["vocab_size"], meta["padded_vocab_size"], meta["padded_for_tp"]) == (1500, 1600, 2)
    assert meta["hf_config"]["architectures"] == ["Qwen3ForCausalLM"]
    args = parser.parse_args(
        ["convert", "mcore-to-hf", "--mcore", str(ck), "--out", str(back), "--like", str(b["hf_dir"]), "--quiet"]
    )
    assert args.func(args) == 0
    assert "safetensors" in capsys.readouterr().out

    text = "The teachers wrote notes."
    args = parser.parse_args(
        ["score", "--checkpoint", str(ck), "--tokenizer", str(sp_model_path), "--text", text, "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(sp_model_path)
    ids = tok.encode(text).ids
    assert out["ids"] == ids and len(out["tokens"]) == len(out["logprobs"]) == len(ids)
    assert out["logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(b["model"](torch.tensor([ids])).logits[0, :-1].float(), -1)
    ref = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out["logprobs"][1:]), ref, atol=1e-5, rtol=1e-5)

    args = parser.parse_args(["score", "--checkpoint", str(ck), "--tokenizer", str(sp_model_path), "--text", text])
    assert args.func(args) == 0
    assert "total log-prob" in capsys.readouterr().out


def test_mask_padded_vocab_per_rank():
    from xtoken_nemo.models.build import mask_padded_vocab

    logits = torch.zeros(1, 2, 8)  # padded vocab 16 over tp=2, real vocab 11
    assert torch.isfinite(mask_padded_vocab(logits, 11, tp_rank=0)).all()
    masked = mask_padded_vocab(logits, 11, tp_rank=1)
    assert torch.isinf(masked[..., 3:]).all() and torch.isfinite(masked[..., :3]).all()


def test_bf16_checkpoint_round_trip_and_fp32_load(built, tmp_path):
    """Conversion keeps the HF dtype (exact bf16 round trip); loading upcasts to fp32 for scoring."""
    import transformers
    from safetensors.torch import load_file

    from xtoken_nemo.models import hf_to_mcore, mcore_to_hf

    b = built["phi4mini_tied"]
    hf_bf16 = tmp_path / "hf"
    b["model"].to(torch.bfloat16).save_pretrained(hf_bf16)
    b["model"].to(torch.float32)
    meta = hf_to_mcore(hf_bf16, tmp_path / "ck")
    assert meta["params_dtype"] == "bfloat16"
    mcore_to_hf(tmp_path / "ck", tmp_path / "back", like=hf_bf16)
    orig, back = load_file(hf_bf16 / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(orig) == sorted(back)
    bad = [
        (k, orig[k].dtype, back[k].dtype)
        for k in orig
        if not (back[k].dtype == torch.bfloat16 and torch.equal(orig[k], back[k]))
    ]
    assert not bad
    ids = b["ids"][SHORT]
    logits, arch, _ = _mcore_logits(tmp_path / "ck", {SHORT: ids})
    assert logits[SHORT].dtype == torch.float32
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits[SHORT][..., : arch.vocab_size], ref(ids).logits, atol=ATOL, rtol=1e-5)


def test_local_spec_on_cpu_and_sliding_window_guard(built):
    import dataclasses

    from xtoken_nemo.models.build import forward_logits, te_available
    from xtoken_nemo.models.checkpoint import load_mcore_checkpoint

    if not torch.cuda.is_available():
        assert not te_available()  # local spec on CPU
    b = built["phi4mini_tied"]
    model, arch, _ = load_mcore_checkpoint(b["ckpt"])
    windowed = dataclasses.replace(arch, sliding_window=SHORT - 1)
    with pytest.raises(ModelError, match="sliding_window"):
        forward_logits(model, b["ids"][SHORT], windowed)
