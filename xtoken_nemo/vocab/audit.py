"""Coverage audit: which student-token categories land in the strict common set C, and the
loss it recommends for a teacher (docs/method.md, "Coverage audit: choosing P-KL or H-KL").

For each category, ``total`` counts the category's strings that are single student tokens and
``covered`` those whose teacher counterpart is an exact canonical match. Rule: if a *critical*
category (digits, 2/3-digit numerals, ASCII punctuation) is not (almost) fully covered, the
GOLD-style partition would push those tokens down (Proposition 1): recommend P-KL. Otherwise the
partition is sound: recommend H-KL.
"""

from __future__ import annotations

import keyword
import string
from dataclasses import dataclass, field

from xtoken_nemo.tokenizers.base import Tokenizer
from xtoken_nemo.vocab.canonical import exact_matches, surface_index

CRITICAL_CATEGORIES = ("digits_1", "numerals_2", "numerals_3", "ascii_punct")
#: a critical category with a smaller covered fraction makes the partition unsound
CRITICAL_COVERAGE = 0.95

_COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their has been if more when will would who so no"
).split()
_MULTILINGUAL = (
    # frequent words/characters of other scripts and accented Latin
    "der die und nicht ist les des une est que los las por para não são что это как не и в на "
    "的 是 了 我 不 人 在 他 有 这 の に は を た が です する 이 는 에 을 를 하다 في من على إلى "
    "für über straße café naïve déjà año niño"
).split()


def _categories() -> dict[str, list[str]]:
    cats = {
        "digits_1": [str(d) for d in range(10)],
        "numerals_2": [f"{n:02d}" for n in range(100)],
        "numerals_3": [f"{n:03d}" for n in range(1000)],
        "ascii_punct": list(string.punctuation),
        "whitespace_runs": [c * n for c in (" ", "\n", "\t") for n in range(1, 17)],
        "code_keywords": [p + kw for kw in keyword.kwlist for p in ("", " ")],
        "casing_variants": [" " + f(w) for w in _COMMON_WORDS for f in (str.lower, str.title, str.upper)],
        "multilingual": [p + w for w in _MULTILINGUAL for p in ("", " ")],
    }
    return cats


@dataclass
class CategoryCoverage:
    covered: int
    total: int
    missing_examples: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 1.0


@dataclass
class AuditReport:
    student: str
    teacher: str
    categories: dict[str, CategoryCoverage]
    common_size: int
    student_vocab_size: int
    recommended_loss: str
    reason: str

    def to_json(self) -> dict:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "categories": {
                name: {"covered": c.covered, "total": c.total, "missing_examples": c.missing_examples}
                for name, c in self.categories.items()
            },
            "common_size": self.common_size,
            "student_vocab_size": self.student_vocab_size,
            "recommended_loss": self.recommended_loss,
            "reason": self.reason,
        }

    def to_text(self) -> str:
        lines = [
            f"coverage audit: student {self.student} -> teacher {self.teacher}",
            f"strict common set C: {self.common_size:,} of {self.student_vocab_size:,} student ids",
            f"{'category':<20} {'covered':>8} {'total':>7} {'share':>7}  missing (examples)",
        ]
        for name, c in self.categories.items():
            mark = "*" if name in CRITICAL_CATEGORIES else " "
            missing = ", ".join(repr(m) for m in c.missing_examples[:4])
            lines.append(f"{mark}{name:<19} {c.covered:>8} {c.total:>7} {c.fraction:>7.1%}  {missing}")
        lines.append("(* critical category)")
        lines.append(f"recommended loss: {self.recommended_loss.upper()} - {self.reason}")
        return "\n".join(lines)


def audit(student: Tokenizer, teacher: Tokenizer) -> AuditReport:
    matches = exact_matches(student, teacher)
    student_index = surface_index(student)
    categories = {}
    for name, strings in _categories().items():
        present = [s for s in dict.fromkeys(strings) if s.encode("utf-8") in student_index]
        covered = [s for s in present if student_index[s.encode("utf-8")] in matches.ordinary]
        missing = [s for s in present if student_index[s.encode("utf-8")] not in matches.ordinary]
        categories[name] = CategoryCoverage(len(covered), len(present), missing[:8])

    weak = [n for n in CRITICAL_CATEGORIES if categories[n].total and categories[n].fraction < CRITICAL_COVERAGE]
    if weak:
        detail = ", ".join(f"{n} {categories[n].covered}/{categories[n].total}" for n in weak)
        loss = "pkl"
        reason = (
            f"critical categories outside the common set ({detail}): a GOLD/H-KL partition would "
            "push these tokens down (Proposition 1); P-KL moves their mass through W instead"
        )
    else:
        loss = "hkl"
        reason = (
            f"every critical category is at least {CRITICAL_COVERAGE:.0%} in the common set: the partition "
            "is sound, and H-KL keeps exact-match KL where it exists"
        )
    return AuditReport(student.name, teacher.name, categories, matches.common_size, student.vocab_size, loss, reason)


def plot_audits(reports: list[AuditReport], path: str) -> None:
    """Bar chart of covered share per category, one bar group per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports[0].categories)
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 1.1), 4.5))
    for i, report in enumerate(reports):
        xs = [j + i * width for j in range(len(names))]
        shares = [report.categories[n].fraction * 100 for n in names]
        bars = ax.bar(xs, shares, width, label=f"{report.teacher} (-> {report.recommended_loss.upper()})")
        counts = [f"{report.categories[n].covered}/{report.categories[n].total}" for n in names]
        ax.bar_label(bars, labels=counts, fontsize=7, padding=2)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("% of category in strict common set C")
    ax.set_ylim(0, 115)
    ax.set_title(f"Coverage audit, student {reports[0].student}")
    ax.legend(loc="upper center", ncol=len(reports), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
