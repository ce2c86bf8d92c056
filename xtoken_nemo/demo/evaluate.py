"""Evaluation of a trained megatron checkpoint on held-out text and the lookup prompts.

Per model (student or teacher, each with its own tokenizer):

- ``heldout_ce``: mean next-token cross-entropy (nats per token of the model's tokenizer) over
  held-out documents, each scored on its own (``[BOS] ids EOS``, the training convention);
- ``heldout_nats_per_char``: the same total divided by characters: comparable across tokenizers;
- ``numeral_ce``: mean CE over tokens made only of digits (Llama-3: 1-3 digit numerals);
- ``numeral_nats_per_digit``: total NLL of those tokens per digit (comparable across tokenizers);
- ``numeral_exact_match``: greedy decoding (a few tokens, megatron model, no cache) after each
  lookup prompt ``The room of <name> is``; correct when the first number generated equals the answer;
- ``first_digit_match``: the first number generated starts with the answer's first digit (what a
  chain-merged loss can carry from a teacher that writes numbers digit by digit);
- ``answer_nll``: NLL of the answer's tokens (``" " + str(answer)``) given the prompt: the
  continuous counterpart of exact match.

Per-item values are returned too, so the report can bootstrap confidence intervals and paired
differences between runs over seeds and items together (a hierarchical bootstrap: each resample
draws the seeds with replacement, then the items, the same draws for every run), beside a
t-interval over the per-seed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from xtoken_nemo.demo.corpus import LookupItem
from xtoken_nemo.models.build import forward_logits, mask_padded_vocab
from xtoken_nemo.models.checkpoint import load_mcore_checkpoint
from xtoken_nemo.models.runtime import ensure_model_parallel

_NUMBER = re.compile(r"\s*(\d+)")


@dataclass
class EvalItems:
    """Per-document and per-prompt values for one model (arrays of equal length across runs)."""

    doc_nll: np.ndarray  # [D] summed NLL per held-out document
    doc_tokens: np.ndarray  # [D] scored tokens per document
    doc_chars: np.ndarray  # [D] characters per document
    doc_num_nll: np.ndarray  # [D] summed NLL of numeral tokens
    doc_num_tokens: np.ndarray  # [D]
    doc_num_digits: np.ndarray  # [D]
    correct: np.ndarray  # [P] 1.0 if the greedy answer is right
    first_digit: np.ndarray  # [P] 1.0 if the greedy answer's first digit is right
    answer_nll: np.ndarray  # [P]
    generations: list[str]

    def metrics(self) -> dict[str, float]:
        return {
            "heldout_ce": float(self.doc_nll.sum() / max(1, self.doc_tokens.sum())),
            "heldout_nats_per_char": float(self.doc_nll.sum() / max(1, self.doc_chars.sum())),
            "numeral_ce": float(self.doc_num_nll.sum() / max(1, self.doc_num_tokens.sum())),
            "numeral_nats_per_digit": float(self.doc_num_nll.sum() / max(1, self.doc_num_digits.sum())),
            "numeral_exact_match": float(self.correct.mean()) if len(self.correct) else 0.0,
            "first_digit_match": float(self.first_digit.mean()) if len(self.first_digit) else 0.0,
            "answer_nll": float(self.answer_nll.mean()) if len(self.answer_nll) else 0.0,
        }

    def to_json(self) -> dict:
        out = {k: v.tolist() for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        out["generations"] = self.generations
        return out

    @classmethod
    def from_json(cls, data: dict) -> EvalItems:
        return cls(**{k: (v if k == "generations" else np.asarray(v, dtype=np.float64)) for k, v in data.items()})


def _is_numeral(surface: bytes) -> bool:
    return bool(surface) and surface.isdigit()


class ModelScorer:
    """A loaded checkpoint (TP=1, gathered logits) with its tokenizer."""

    def __init__(self, checkpoint: str, tokenizer) -> None:
        ensure_model_parallel(1)
        self.tok = tokenizer
        self.model, self.arch, _ = load_mcore_checkpoint(checkpoint, params_dtype=torch.float32, parallel_output=False)
        self.model.eval()
        self.vocab = tokenizer.vocab_size
        self.bos = tokenizer.require("bos") if tokenizer.adds_bos_by_default else None
        self.eos = tokenizer.require("eos")

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, s] -> [b, s, V] fp32 logits, padded vocabulary columns at -inf."""
        return mask_padded_vocab(forward_logits(self.model, ids, self.arch).float(), self.vocab)

    def _pad_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), self.eos, dtype=torch.int64)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
        return out

    @torch.no_grad()
    def token_nll(self, seqs: list[list[int]], batch_size: int = 8) -> list[np.ndarray]:
        """NLL of every token after the first, per sequence (right padding is harmless: causal)."""
        out = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            ids = self._pad_batch(chunk)
            logits = self._logits(ids)[:, :-1]
            target = ids[:, 1:]
            nll = (torch.logsumexp(logits, -1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)).numpy()
            out.extend(nll[j, : len(s) - 1].astype(np.float64) for j, s in enumerate(chunk))
        return out

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], new_tokens: int, batch_size: int = 64) -> list[list[int]]:
        """Greedy continuation of each prompt (prompts batched by equal length; no KV cache)."""
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        result: list[list[int]] = [[] for _ in prompts]
        for idx in by_len.values():
            for j in range(0, len(idx), batch_size):
                group = idx[j : j + batch_size]
                ids = torch.tensor([prompts[i] for i in group], dtype=torch.int64)
                for _ in range(new_tokens):
                    nxt = self._logits(ids)[:, -1].argmax(-1)
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                for k, i in enumerate(group):
                    result[i] = ids[k, len(prompts[i]) :].tolist()
        return result


def _wrap(scorer: ModelScorer, ids: list[int]) -> list[int]:
    return ([scorer.bos] if scorer.bos is not None else []) + list(ids)


def evaluate_checkpoint(
    checkpoint: str, tokenizer, heldout: list[str], items: list[LookupItem], new_tokens: int = 4
) -> EvalItems:
    """Score ``checkpoint`` on held-out documents and greedy-decode the lookup prompts."""
    scorer = ModelScorer(checkpoint, tokenizer)
    tok = tokenizer
    docs = [_wrap(scorer, tok.encode(d, add_bos=False).ids) + [scorer.eos] for d in heldout]
    nlls = scorer.token_nll(docs)
    n = len(docs)
    doc_nll, doc_tokens, doc_chars = np.zeros(n), np.zeros(n), np.zeros(n)
    num_nll, num_tokens, num_digits = np.zeros(n), np.zeros(n), np.zeros(n)
    for d, (ids, nll, text) in enumerate(zip(docs, nlls, heldout)):
        doc_nll[d], doc_tokens[d], doc_chars[d] = nll.sum(), len(nll), len(text) + 1  # + the EOS
        for pos in range(1, len(ids)):
            surface = tok.surfaces[ids[pos]] if ids[pos] < len(tok.surfaces) else b""
            if _is_numeral(surface):
                num_nll[d] += nll[pos - 1]
                num_tokens[d] += 1
                num_digits[d] += len(surface)

    prompts = [_wrap(scorer, tok.encode(it.prompt, add_bos=False).ids) for it in items]
    generated = scorer.greedy(prompts, new_tokens)
    texts = [tok.decode(g) for g in generated]
    correct, first_digit = np.zeros(len(items)), np.zeros(len(items))
    for i, (it, text) in enumerate(zip(items, texts)):
        m = _NUMBER.match(text)
        correct[i] = float(m is not None and int(m.group(1)) == it.answer)
        first_digit[i] = float(m is not None and m.group(1)[0] == str(it.answer)[0])
    # answer NLL: the prompt followed by " <answer>", scored on the answer's tokens only
    full = [_wrap(scorer, tok.encode(it.prompt + f" {it.answer}", add_bos=False).ids) for it in items]
    full_nll = scorer.token_nll(full, batch_size=32)
    answer_nll = np.array([nll[len(p) - 1 :].sum() for p, nll in zip(prompts, full_nll)])
    del scorer
    return EvalItems(
        doc_nll, doc_tokens, doc_chars, num_nll, num_tokens, num_digits, correct, first_digit, answer_nll, texts
    )


# ----------------------------------------------------------------------------------------------
# spread: seeds and items resampled together (hierarchical bootstrap), and a t-interval over seeds
# ----------------------------------------------------------------------------------------------
# Student's t, 97.5% quantile for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df), 6 decimals;
# scipy is not a dependency of the package)
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (table to 30; above, the
    Cornish-Fisher expansion, within 2e-6 of the exact value)."""
    if df < 1:
        raise ValueError(f"t quantile needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def t_interval(values) -> list[float] | None:
    """95% t-interval of the mean of per-seed values (n - 1 degrees of freedom); None for one value."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    half = t975(len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


@dataclass(frozen=True)
class Resamples:
    """R bootstrap resamples shared by every run: document indices [R, D], item indices [R, P], and
    for a run with n seeds, seed indices [R, n] (``seeds(n)``: the same draws for every run with n
    seeds, so seed i of run a is paired with seed i of run b)."""

    docs: np.ndarray
    items: np.ndarray
    seed: int = 0

    def seeds(self, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, n]).integers(0, n, (len(self.items), n))


def bootstrap_indices(num_docs: int, num_items: int, samples: int = 1000, seed: int = 0) -> Resamples:
    """The same resamples for every run and seed: intervals of paired differences are then meaningful."""
    rng = np.random.default_rng(seed)
    docs, items = rng.integers(0, num_docs, (samples, num_docs)), rng.integers(0, num_items, (samples, num_items))
    return Resamples(docs, items, seed)


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return num[idx].sum(-1) / np.maximum(den[idx].sum(-1), 1)


def _metric_samples(e: EvalItems, doc_idx: np.ndarray, item_idx: np.ndarray) -> dict[str, np.ndarray]:
    """[R] each metric on R resamples (rows of the index arrays)."""
    return {
        "numeral_exact_match": e.correct[item_idx].mean(-1),
        "first_digit_match": e.first_digit[item_idx].mean(-1),
        "answer_nll": e.answer_nll[item_idx].mean(-1),
        "numeral_ce": _ratio(e.doc_num_nll, e.doc_num_tokens, doc_idx),
        "heldout_ce": _ratio(e.doc_nll, e.doc_tokens, doc_idx),
    }


def _item_samples(evals: list[EvalItems], idx: Resamples) -> dict[str, np.ndarray]:
    """[R, seeds] each metric of each seed's model on the R item/document resamples."""
    per_seed = [_metric_samples(e, idx.docs, idx.items) for e in evals]
    return {k: np.stack([p[k] for p in per_seed], axis=1) for k in per_seed[0]}


def _seed_mean(evals: list[EvalItems], idx: Resamples) -> dict[str, np.ndarray]:
    """[R] each metric averaged over all the seeds' models on resampled items only (the seeds are
    not resampled): the former intervals, which leave out training noise; kept for comparison."""
    return {k: v.mean(1) for k, v in _item_samples(evals, idx).items()}


def _hierarchical(samples: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
    """[R, n] per-seed values on resample r's items, [R, n] seeds drawn for resample r -> [R] the
    mean over the drawn seeds."""
    return np.take_along_axis(samples, seed_idx, axis=1).mean(1)


def _per_seed(evals: list[EvalItems]) -> dict[str, np.ndarray]:
    """[seeds] each metric on all items, one value per seed's model."""
    full = [_metric_samples(e, np.arange(len(e.doc_nll))[None], np.arange(len(e.correct))[None]) for e in evals]
    return {k: np.array([f[k][0] for f in full]) for k in full[0]}


def _ci95(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def summarize(evals: list[EvalItems], idx: Resamples) -> dict:
    """Seed-mean of each metric; its 95% interval from the hierarchical bootstrap (each resample
    draws the seeds with replacement, then the items; one seed: items only); the 95% t-interval
    over the per-seed values (None for one seed); and the per-seed values."""
    per_seed = _per_seed(evals)
    seed_idx = idx.seeds(len(evals))
    samples = {k: _hierarchical(v, seed_idx) for k, v in _item_samples(evals, idx).items()}
    return {
        "mean": {k: float(v.mean()) for k, v in per_seed.items()},
        "ci95": {k: _ci95(v) for k, v in samples.items()},
        "t95": {k: t_interval(v) for k, v in per_seed.items()},
        "per_seed": {k: v.tolist() for k, v in per_seed.items()},
    }


def paired_difference(a: list[EvalItems], b: list[EvalItems], idx: Resamples) -> dict[str, dict]:
    """metric(a) - metric(b), seed-averaged, and the difference per seed (seed i of a against seed i
    of b: same initial weights and data order), with two 95% intervals: ``ci95`` from the
    hierarchical bootstrap (the same seed draws for a and b, then the same items), ``t95`` the
    t-interval over the per-seed differences."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same seeds: {len(a)} against {len(b)}")
    sa, sb = _item_samples(a, idx), _item_samples(b, idx)
    pa, pb = _per_seed(a), _per_seed(b)
    seed_idx = idx.seeds(len(a))
    return {
        k: {
            "diff": float(pa[k].mean() - pb[k].mean()),
            "ci95": _ci95(_hierarchical(sa[k] - sb[k], seed_idx)),
            "t95": t_interval(pa[k] - pb[k]),
            "per_seed": (pa[k] - pb[k]).tolist(),
        }
        for k in sa
    }


def items_only_difference(a: list[EvalItems], b: list[EvalItems], idx: Resamples) -> dict[str, list[float]]:
    """The former 95% interval of metric(a) - metric(b): items resampled, every seed kept (no
    training noise). Not used by the report; kept to show what the hierarchical interval adds."""
    sa, sb = _seed_mean(a, idx), _seed_mean(b, idx)
    return {k: _ci95(sa[k] - sb[k]) for k in sa}
