"""A deterministic corpus where numbers matter: arithmetic, counting, dates, quantities and short
prose around them. The same seed always gives the same text; no downloads.

The held-out split uses a different seed, and its arithmetic prompts (``a + b =``) are the items
of the exact-match evaluation: each prompt has one correct answer, written as a number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena")
ITEMS = ("apples", "books", "coins", "eggs", "pens", "boxes", "cups", "stamps", "shells", "cards")
PLACES = ("market", "school", "library", "harbor", "museum", "station", "garden", "bakery")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")
WORDS = (
    "the of and to in is was for on that with as by at from they this which be are or an had "
    "people city river morning evening report total number count record list price week day year "
    "small large new old first last many few each every more less about near after before"
).split()


@dataclass(frozen=True)
class ArithmeticItem:
    """An exact-match item: ``prompt`` (ends with ``=``) and its integer ``answer``."""

    prompt: str
    answer: int


@dataclass(frozen=True)
class CorpusSpec:
    """Operand range of the arithmetic and the mix of sentence kinds (weights)."""

    max_operand: int = 20
    kinds: tuple = (("arith", 5), ("count", 2), ("date", 1), ("quantity", 2), ("prose", 1))


def _arith(rng: random.Random, spec: CorpusSpec) -> str:
    a, b = rng.randint(1, spec.max_operand), rng.randint(1, spec.max_operand)
    if rng.random() < 0.75:
        return f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}."


def _count(rng: random.Random, spec: CorpusSpec) -> str:
    start, step = rng.randint(1, 60), rng.choice((1, 1, 2, 5, 10))
    return ", ".join(str(start + i * step) for i in range(rng.randint(4, 7))) + "."


def _date(rng: random.Random, spec: CorpusSpec) -> str:
    year, day, month = rng.randint(1950, 2030), rng.randint(1, 28), rng.choice(MONTHS)
    place, n = rng.choice(PLACES), rng.randint(2, 300)
    return rng.choice((
        f"On {month} {day}, {year} the {place} had {n} visitors.",
        f"The {place} opened in {year} and closed in {year + rng.randint(1, 40)}.",
        f"{year}-{MONTHS.index(month) + 1:02d}-{day:02d}: {n} people came to the {place}.",
    ))


def _quantity(rng: random.Random, spec: CorpusSpec) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, spec.max_operand), rng.randint(1, spec.max_operand)
    return rng.choice((
        f"{name} has {a} {item} and buys {b} more, so {name} has {a + b} {item}.",
        f"{name} sold {a} {item} for ${a * b}, that is ${b} each.",
        f"There are {a} {item} in each of {b} boxes: {a * b} {item} in all.",
    ))


def _prose(rng: random.Random, spec: CorpusSpec) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
    return " ".join(words).capitalize() + "."


_KINDS = {"arith": _arith, "count": _count, "date": _date, "quantity": _quantity, "prose": _prose}


def documents(n: int, seed: int, spec: CorpusSpec = CorpusSpec(), sentences: tuple[int, int] = (4, 10)) -> list[str]:
    """``n`` documents of a few sentences each (one per line)."""
    rng = random.Random(seed)
    names, weights = zip(*spec.kinds)
    docs = []
    for _ in range(n):
        k = rng.randint(*sentences)
        docs.append("\n".join(_KINDS[kind](rng, spec) for kind in rng.choices(names, weights, k=k)))
    return docs


def arithmetic_items(n: int, seed: int, spec: CorpusSpec = CorpusSpec()) -> list[ArithmeticItem]:
    """``n`` held-out exact-match prompts ``a + b =`` (answer ``a + b``): a document's first line,
    as in the training text."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(1, spec.max_operand), rng.randint(1, spec.max_operand)
        items.append(ArithmeticItem(prompt=f"{a} + {b} =", answer=a + b))
    return items
