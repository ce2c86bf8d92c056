"""`xtoken init-model`, `xtoken train --config`, `xtoken score` and `xtoken export` end to end,
through the real entry point, on the SentencePiece pair of test_distill."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill import TINY, sp_pair  # noqa: F401  (fixture)

from xtoken_nemo.cli import main


def test_init_train_score_export(sp_pair, tmp_path, capsys):  # noqa: F811
    student_init = tmp_path / "student_init"
    assert (
        main(
            [
                "init-model",
                "--tokenizer",
                sp_pair["student"],
                "--num-layers",
                "1",
                "--hidden-size",
                "32",
                "--num-attention-heads",
                "2",
                "--seed",
                "3",
                "--pad-for-tp",
                "2",
                "--out",
                str(student_init),
            ]
        )
        == 0
    )
    config = {
        "name": "cli-run",
        "student": {"tokenizer": sp_pair["student"], "checkpoint": str(student_init)},
        "teachers": [
            {
                "name": "cross",
                "mode": "pkl",
                "alpha": 1.0,
                "projection": sp_pair["W"],
                "model": {"tokenizer": sp_pair["teacher"], "checkpoint": sp_pair["ckpt"]["cross"]},
            }
        ],
        "data": {"paths": [sp_pair["data"]], "seq_length": 32},
        "train": {"train_steps": 3, "global_batch_size": 2, "micro_batch_size": 1},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "save_interval": 2},
        "log_dir": str(tmp_path / "logs"),
    }
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_file), "--quiet", "optim.lr=1e-3", "train.train_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "cli-run: completed at step 3/3" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000002", "iter_0000003"]

    # the resolved config, with defaults filled in
    assert main(["train", "--config", str(cfg_file), "--print-config", "train.seed=7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["train"]["seed"] == 7 and printed["optim"]["lr"] == 5e-5 and printed["teachers"][0]["merge"] == "chain"
    )

    text = "The international meeting started at 10:30 with 42 people."
    assert (
        main(
            [
                "score",
                "--checkpoint",
                str(tmp_path / "ckpt" / "iter_0000003"),
                "--tokenizer",
                sp_pair["student"],
                "--text",
                text,
                "--json",
            ]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    assert len(scored["tokens"]) == len(scored["logprobs"]) > 5

    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(hf_dir), "--quiet"]) == 0
    assert "iter_0000003" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    from xtoken_nemo.tokenizers import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = load_tokenizer(sp_pair["student"]).encode(text).ids
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    hf_lp = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    ours = [lp for lp in scored["logprobs"] if lp is not None]
    assert ours == pytest.approx(hf_lp, abs=1e-4)


def test_train_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"train_stepz": 3}}))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown field(s) ['train_stepz'] in train" in err and "\n" not in err
    good = tmp_path / "empty.json"
    good.write_text("{}")
    assert main(["train", "--config", str(good)]) == 2
    assert "data.paths is empty" in capsys.readouterr().err
