"""Per-token log-probabilities from a converted megatron-core checkpoint (checking, debugging)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xtoken_nemo.models.build import forward_logits, mask_padded_vocab
from xtoken_nemo.models.checkpoint import arch_from_metadata, load_mcore_checkpoint, read_metadata
from xtoken_nemo.models.config import ModelArch
from xtoken_nemo.models.errors import ModelError
from xtoken_nemo.models.runtime import ensure_model_parallel
from xtoken_nemo.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """``logprobs[i]`` = log p(ids[i] | ids[:i]); None for the first token (nothing predicts it)."""

    ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(lp for lp in self.logprobs if lp is not None))

    def to_json(self) -> dict[str, Any]:
        scored = [lp for lp in self.logprobs if lp is not None]
        return {
            "tokens": self.tokens,
            "logprobs": self.logprobs,
            "ids": self.ids,
            "total_logprob": self.total,
            "mean_logprob": self.total / len(scored) if scored else None,
            **self.meta,
        }


def check_tokenizer_fits(tokenizer, arch: ModelArch) -> None:
    """A tokenizer may know fewer ids than the model's vocab (unused rows), never more."""
    if tokenizer.vocab_size > arch.vocab_size:
        raise ModelError(
            f"tokenizer '{tokenizer.name}' has vocab_size {tokenizer.vocab_size} but the model's config.json "
            f"vocab_size is {arch.vocab_size}: ids >= {arch.vocab_size} have no embedding row; "
            "use the model's own tokenizer"
        )


def token_logprobs(model, arch: ModelArch, ids: torch.Tensor) -> torch.Tensor:
    """[b, s] ids -> [b, s-1] float32 log p(ids[:, t+1] | ids[:, :t+1]).

    The model must gather its output (``parallel_output=False``) or run at TP=1: logits are
    [b, s, V_padded]; padded columns are masked before the softmax.
    """
    with torch.no_grad():
        logits = forward_logits(model, ids, arch).float()
    logits = mask_padded_vocab(logits, arch.vocab_size)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return logp.gather(-1, ids[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()


def score_text(
    checkpoint: str | Path,
    tokenizer,
    text: str,
    add_bos: bool | None = None,
    params_dtype: torch.dtype = torch.float32,
) -> ScoreResult:
    """Load ``checkpoint`` on this process (TP=1) and score ``text`` tokenized by ``tokenizer``.

    ``tokenizer``: a loaded :class:`xtoken_nemo.tokenizers.Tokenizer` or a name/path for
    ``load_tokenizer``. BOS follows the tokenizer family's default unless ``add_bos`` is given.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    arch = arch_from_metadata(read_metadata(checkpoint))
    check_tokenizer_fits(tok, arch)
    ids = tok.encode(text, add_bos=add_bos).ids
    if len(ids) < 2:
        raise ModelError(
            f"text {text!r} is {len(ids)} token(s); scoring needs at least 2 (the first one is only context)"
        )
    ensure_model_parallel(1)
    model, arch, meta = load_mcore_checkpoint(checkpoint, params_dtype=params_dtype, parallel_output=False)
    lps = token_logprobs(model, arch, torch.tensor([ids]))[0].tolist()
    return ScoreResult(
        ids=list(ids),
        tokens=[tok.token_text(i) for i in ids],
        logprobs=[None, *lps],
        meta={"family": arch.family, "vocab_size": arch.vocab_size, "padded_vocab_size": meta["padded_vocab_size"]},
    )
