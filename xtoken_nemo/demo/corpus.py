"""The demo's task: a number lookup that only the teachers know.

A fixed table gives each of ``num_facts`` people a two-digit room number (10-99). Documents
are a few sentences each: facts ("The room of Alice is 47.") and a little filler text.

- The **teachers' corpus** states the true room numbers: the teachers learn the table.
- The **students' corpus** has the same kinds of sentences about the same people, but every room
  number in it is drawn at random: the students' own text does not contain the table, so CE alone
  cannot learn it. Whatever a student knows about the true numbers came through distillation,
  from the teachers' predictions at the positions after "is".
- The **second task's students' corpus** (J-KL, docs/demo.md) keeps each number's true first digit
  and draws the second at random: the first digit is in the student's own text, only the teachers
  know the second.
- The **held-out documents** state the true numbers in new arrangements (a different seed): CE on
  them, and on their numeral tokens, measures how well a model knows the table.
- The **evaluation items** are the prompts "The room of <name> is" for every person; greedy
  decoding must produce the true number (exact match).

Numbers are where the tokenizers differ: Llama-3.2 and Phi-4-mini write 47 as one token, Qwen3
as two single digits. The same seed always gives the same text; no downloads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# first names that are one token (with the leading space) in Llama-3.2, Qwen3 and Phi-4-mini
# (tests/test_demo.py checks it): the lookup key is one token for every model
NAMES = (
    "Aaron",
    "Adam",
    "Alan",
    "Albert",
    "Alex",
    "Alice",
    "Amanda",
    "Amber",
    "Amy",
    "Andrew",
    "Andy",
    "Angela",
    "Anna",
    "Anne",
    "Annie",
    "Anthony",
    "Arthur",
    "Ashley",
    "Austin",
    "Barbara",
    "Ben",
    "Betty",
    "Bill",
    "Billy",
    "Bob",
    "Bobby",
    "Brad",
    "Brandon",
    "Brian",
    "Bruce",
    "Carl",
    "Carlos",
    "Carol",
    "Caroline",
    "Catherine",
    "Charles",
    "Charlie",
    "Chris",
    "Christian",
    "Christine",
    "Claire",
    "Craig",
    "Daniel",
    "Danny",
    "David",
    "Dean",
    "Diana",
    "Donald",
    "Doug",
    "Douglas",
    "Dylan",
    "Eddie",
    "Edward",
    "Elena",
    "Elizabeth",
    "Ellen",
    "Emily",
    "Emma",
    "Eric",
    "Eva",
    "Evan",
    "Frank",
    "Fred",
    "Gary",
    "George",
    "Grace",
    "Greg",
    "Hannah",
    "Harry",
    "Helen",
    "Henry",
    "Ian",
    "Jack",
    "Jacob",
    "Jake",
    "James",
    "Jane",
    "Jason",
    "Jean",
    "Jeff",
    "Jennifer",
    "Jenny",
    "Jerry",
    "Jesse",
    "Jessica",
    "Jim",
    "Jimmy",
    "Joan",
    "Joe",
    "Joel",
    "John",
    "Johnny",
    "Jonathan",
    "Jordan",
    "Jose",
    "Joseph",
    "Josh",
    "Joy",
    "Judy",
    "Julia",
    "Julie",
    "Justin",
    "Karen",
    "Kate",
    "Katie",
    "Keith",
    "Kelly",
    "Kevin",
    "Kim",
    "Kyle",
    "Laura",
    "Lauren",
    "Leo",
    "Linda",
    "Lisa",
    "Louis",
    "Lucy",
    "Luke",
    "Maria",
    "Mark",
    "Martin",
    "Mary",
    "Matt",
    "Max",
    "Megan",
    "Michael",
    "Mike",
    "Nancy",
    "Nathan",
    "Nick",
    "Nina",
    "Oliver",
    "Paul",
    "Peter",
    "Phil",
    "Rachel",
    "Ray",
    "Rebecca",
    "Richard",
    "Rick",
    "Robert",
    "Roger",
    "Ron",
    "Rose",
    "Roy",
    "Russell",
    "Ruth",
    "Ryan",
    "Sam",
    "Sandra",
    "Sara",
    "Sarah",
    "Scott",
    "Sean",
    "Simon",
    "Sophie",
    "Steve",
    "Steven",
    "Susan",
    "Tim",
    "Todd",
    "Tom",
    "Tony",
    "Victor",
    "Walter",
    "Wayne",
    "William",
    "Zoe",
)
FILLER = (
    "The building has many rooms.",
    "Every room has a number.",
    "The list was made last week.",
    "Some people moved in the spring.",
    "The doors are painted blue.",
    "Each floor has a small kitchen.",
    "Visitors ask at the front desk.",
    "The numbers are on the doors.",
)


@dataclass(frozen=True)
class LookupItem:
    """An exact-match item: ``prompt`` (``"The room of <name> is"``) and its integer ``answer``."""

    prompt: str
    answer: int


@dataclass(frozen=True)
class LookupTable:
    """``num_facts`` people (from NAMES) and their room numbers, fixed by ``seed``."""

    num_facts: int = 120
    seed: int = 7
    rooms: tuple[int, int] = (10, 99)  # room numbers drawn from this range (inclusive)

    def facts(self) -> list[tuple[str, int]]:
        rng = random.Random(self.seed)
        people = list(NAMES)
        if self.num_facts > len(people):
            raise ValueError(f"at most {len(people)} facts (one per name in NAMES), asked for {self.num_facts}")
        rng.shuffle(people)
        rooms = [rng.randint(*self.rooms) for _ in range(self.num_facts)]
        return list(zip(people[: self.num_facts], rooms))

    def items(self) -> list[LookupItem]:
        return [LookupItem(prompt(name), room) for name, room in self.facts()]


def prompt(name: str) -> str:
    return f"The room of {name} is"


def fact_sentence(name: str, room: int) -> str:
    return f"{prompt(name)} {room}."


def documents(
    table: LookupTable,
    n: int,
    seed: int,
    scrambled: bool = False,
    facts_per_doc: tuple[int, int] = (4, 8),
    filler_rate: float = 0.25,
    keep_first_digit: bool = False,
) -> list[str]:
    """``n`` documents of ``facts_per_doc`` fact sentences (people in a shuffled cycle, so each is
    mentioned about equally often) with filler sentences in between (``filler_rate`` of the lines).
    ``scrambled``: each room number drawn uniformly from the table's range instead of the true one;
    with ``keep_first_digit`` only the second digit is drawn (0-9), the first stays true (the
    second task: only a teacher can supply the second digit)."""
    rng = random.Random(seed)
    facts = table.facts()
    order: list[tuple[str, int]] = []
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(*facts_per_doc)):
            if not order:
                order = facts[:]
                rng.shuffle(order)
            name, room = order.pop()
            if rng.random() < filler_rate:
                lines.append(rng.choice(FILLER))
            if scrambled and keep_first_digit:
                room = room // 10 * 10 + rng.randint(0, 9)
            elif scrambled:
                room = rng.randint(*table.rooms)
            lines.append(fact_sentence(name, room))
        docs.append("\n".join(lines))
    return docs
