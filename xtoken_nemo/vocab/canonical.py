"""Canonical surface forms shared across tokenizer families, and the strict common set C.

The canonical form of an ordinary token is its surface *bytes*: byte-level BPE (`Ġ` space,
`Ċ` newline), SentencePiece (`▁` space, `<0xHH>` byte fallback) and tiktoken tokens all reduce
to the bytes they stand for in running text, so equal bytes means the same string.
Special tokens have no surface; they are matched by role (bos, eos, ...), in this order, and
otherwise by identical literal content (e.g. `<|endoftext|>` on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

from xtoken_nemo.tokenizers.base import Tokenizer

# Order in which roles are tried when a special token has several (Phi-4-mini's <|endoftext|>
# is bos, eos and pad at once).
ROLE_PRIORITY = ("eos", "bos", "end_of_turn", "start_of_turn", "unk", "pad")


def surface_index(tokenizer: Tokenizer) -> dict[bytes, int]:
    """{surface bytes: id} over ordinary tokens; on duplicate surfaces the lowest id wins."""
    index: dict[bytes, int] = {}
    for tid, surface in enumerate(tokenizer.surfaces):
        if surface is not None and surface not in index:
            index[surface] = tid
    return index


def match_special(student: Tokenizer, teacher: Tokenizer, student_id: int) -> tuple[int, str] | None:
    """Teacher id for a student special token, and how it matched ("role:eos" / "content")."""
    student_roles = set(student.role_of(student_id))
    for role in ROLE_PRIORITY:
        if role in student_roles and role in teacher.special_ids:
            return teacher.special_ids[role], f"role:{role}"
    content = student.special_tokens.get(student_id)
    for tid, teacher_content in teacher.special_tokens.items():
        if teacher_content == content:
            return tid, "content"
    return None


@dataclass
class ExactMatches:
    """Pass 1 of the builder and the strict common set C of the audit.

    ordinary: {student id: teacher id} for ordinary tokens with equal surface bytes.
    special:  {student id: (teacher id, how)} for special tokens matched by role or content.
    """

    ordinary: dict[int, int]
    special: dict[int, tuple[int, str]]

    @property
    def common_size(self) -> int:
        return len(self.ordinary) + len(self.special)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (student id, teacher id) of the strict common set C, ordinary and special, sorted."""
        return sorted([*self.ordinary.items(), *((s, t) for s, (t, _) in self.special.items())])


def exact_matches(student: Tokenizer, teacher: Tokenizer) -> ExactMatches:
    teacher_index = surface_index(teacher)
    ordinary = {}
    for sid, surface in enumerate(student.surfaces):
        if surface is not None:
            tid = teacher_index.get(surface)
            if tid is not None:
                ordinary[sid] = tid
    special = {}
    for sid in student.special_tokens:
        if sid < student.vocab_size:
            match = match_special(student, teacher, sid)
            if match is not None:
                special[sid] = match
    return ExactMatches(ordinary, special)
