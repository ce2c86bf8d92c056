"""Peak memory of HF <-> megatron-core conversion relative to the model's size.

Creates a random mid-size Llama-shaped HF model (bf16 safetensors), then converts it in fresh
processes (so each peak is its own) and prints, for each direction, the peak RSS growth over the
process's baseline (after imports) divided by the model's bytes. A ratio near 1 means "the model
once plus small buffers"; multiply by a 4B model's bytes (8 GB in bf16) for the expected peak.

    .venv/bin/python bench/convert_memory.py [--hidden 1024 --layers 8 --vocab 32000]

Prints ratios measured side by side; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class _AnonPeak:
    """Samples RssAnon (private memory; excludes the safetensors mmap's page cache) every 10 ms."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mib("RssAnon"))
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_mib("RssAnon"))


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def create(out: str, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def run(step: str, src: str, dst: str) -> None:
    import xtoken_nemo.models.convert as convert  # noqa: F401  (imports megatron: part of the baseline)
    from xtoken_nemo.models.runtime import ensure_model_parallel

    ensure_model_parallel(1)
    base, base_anon = _rss_mib(), _status_mib("RssAnon")
    with _AnonPeak() as anon:
        if step == "hf-to-mcore":
            convert.hf_to_mcore(src, dst)
        else:
            convert.mcore_to_hf(src, dst)
    print(json.dumps({"baseline_mib": base, "peak_mib": _peak_mib(), "anon_growth_mib": anon.peak - base_anon}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    ap.add_argument("--_src", help=argparse.SUPPRESS)
    ap.add_argument("--_dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._step == "create":
        return create(args._dst, args.hidden, args.layers, args.vocab)
    if args._step:
        return run(args._step, args._src, args._dst)

    def sub(step: str, src: str, dst: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--_step",
            step,
            "--_src",
            src,
            "--_dst",
            dst,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        hf, ck, back = (str(Path(tmp) / n) for n in ("hf", "ck", "back"))
        params = sub("create", "", hf)["params"]
        model_mib = params * 2 / 2**20
        print(f"model: {params / 1e6:.1f}M parameters, {model_mib:.0f} MiB in bf16")
        for step, src, dst in (("hf-to-mcore", hf, ck), ("mcore-to-hf", ck, back)):
            r = sub(step, src, dst)
            growth = r["peak_mib"] - r["baseline_mib"]
            anon = r["anon_growth_mib"]
            print(
                f"{step:12s} peak RSS growth {growth:7.0f} MiB = {growth / model_mib:.2f} x model "
                f"(incl. page cache of the mmapped input); private (RssAnon) growth {anon:7.0f} MiB = "
                f"{anon / model_mib:.2f} x model (-> ~{anon / model_mib * 8.0:.1f} GB private for a 4B model in bf16)"
            )


if __name__ == "__main__":
    main()
