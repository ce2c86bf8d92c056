"""Deterministic mixed-content text (no downloads) for tests, benchmarks and demos.

Kinds: English-like prose, Python/C-like code, numbers (integers, decimals, dates, long digit
runs), Unicode (accents, Greek, Cyrillic, CJK, emoji, combining marks) and whitespace runs
(tabs, multiple spaces, blank lines). The same seed always gives the same text.
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be are or an had not "
    "hundreds international distillation tokenizer alignment student teacher probability chunk number year "
    "cats running quickly unbelievable reconstruction misunderstanding photosynthesis government research "
    "between however although model training data language compute gradient matrix vocabulary window"
).split()
UNICODE = (
    "café naïve résumé façade jalapeño Zürich Ångström Ελληνικά Привет мир 東京 漢字テスト 한국어 "
    "🤖 👍🏽 🇫🇷 ❤️ e\u0301 ñ ß Œuvre ½ € → ∑ ∞ “quoted” «guillemets» — …"
).split()
CODE = (
    "def f(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'if __name__ == "__main__":\n\tmain()',
    "x = {'a': 1, \"b\": [2, 3]}  # dict",
    "SELECT id, name FROM users WHERE age >= 21;",
    "const y = await fetch(`/api/v1/items?id=${id}`);",
    "    self.weight = nn.Parameter(torch.zeros(4096, 128256))",
)


def _number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 8)))
    if kind == 1:
        return f"{rng.uniform(0, 1000):.{rng.randrange(1, 5)}f}"
    if kind == 2:
        return f"{rng.randrange(1900, 2030)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 3:
        return f"{rng.randrange(1, 999):,}".replace(",", rng.choice([",", ".", " "])) + str(rng.randrange(1000, 9999))
    if kind == 4:
        return "".join(rng.choice("0123456789") for _ in range(rng.randrange(5, 20)))
    return f"${rng.randrange(1, 10**6)}.{rng.randrange(100):02d}"


def sentence(rng: random.Random) -> str:
    """One sentence of a randomly chosen kind."""
    kind = rng.randrange(5)
    if kind == 0:
        words = [rng.choice(WORDS) for _ in range(rng.randrange(4, 18))]
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", "!", "?", ";", ":"])
    if kind == 1:
        return rng.choice(CODE)
    if kind == 2:
        parts = [rng.choice(WORDS) if rng.random() < 0.5 else _number(rng) for _ in range(rng.randrange(3, 10))]
        return " ".join(parts) + "."
    if kind == 3:
        parts = [rng.choice(UNICODE) if rng.random() < 0.6 else rng.choice(WORDS) for _ in range(rng.randrange(3, 10))]
        return " ".join(parts)
    ws = ["  ", "\t", "\n", "\n\n", "   ", " \n ", "\t\t", "    \n"]
    parts = []
    for _ in range(rng.randrange(3, 8)):
        parts.append(rng.choice(WORDS + list(UNICODE[:6])))
        parts.append(rng.choice(ws))
    return "".join(parts)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def documents(n: int, seed: int = 0, min_sentences: int = 1, max_sentences: int = 40) -> list[str]:
    """Documents of several sentences joined by spaces and newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randrange(min_sentences, max_sentences + 1)
        docs.append("".join(sentence(rng) + rng.choice([" ", " ", "\n", "\n\n"]) for _ in range(k)).rstrip(" "))
    return docs


def text_of_size(num_bytes: int, seed: int = 0) -> str:
    """About ``num_bytes`` UTF-8 bytes of mixed text."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < num_bytes:
        s = sentence(rng) + rng.choice([" ", "\n"])
        out.append(s)
        size += len(s.encode("utf-8"))
    return "".join(out)
