"""A decoded-buffer grouping of two tokenizations, the baseline that tests and bench compare with.

The algorithm: decode every token of both sides to a string, then greedily append pieces to two
buffers (always growing the shorter one) and cut a group only when the two buffers are equal raw
strings. This is how TRL's GOLD trainer grouped tokens in its earlier releases. One piece of
disagreement (Llama-3's ``<|begin_of_text|>`` on one side only) means the buffers never become
equal again and everything after it lands in one trailing super-group. We decode each token on
its own (``decode([id])``), which is linear; a byte-level token holding half of a multi-byte
character decodes to U+FFFD, a second way for the buffers to disagree.

TRL 1.16 no longer groups this way: its ``gold_trainer.py`` aligns by byte offsets and only over
the completion, so a BOS never enters the alignment. Compared side by side on 50 texts, TRL 1.16's
groups equal ours (:mod:`xtoken_nemo.align`) on 50/50 once its first group, which absorbs the BOS,
is folded. This module is therefore not "what TRL does today": it is the buffer approach, kept to
show its failure (tests/test_align.py) and to time it (bench/align.py).

Not part of the library: nothing under ``xtoken_nemo`` imports it.
"""

from __future__ import annotations


def decoded_pieces(tok, ids) -> list[str]:
    return [tok.decode([int(i)]) for i in ids]


def gold_buffer_groups(s_pieces: list[str], t_pieces: list[str]) -> list[tuple[list[int], list[int]]]:
    """Groups (student token indices, teacher token indices) from two lists of decoded pieces."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    s_buf = t_buf = ""
    s_group: list[int] = []
    t_group: list[int] = []
    n, m = len(s_pieces), len(t_pieces)
    while i < n or j < m:
        if s_buf and s_buf == t_buf:
            groups.append((s_group, t_group))
            s_buf = t_buf = ""
            s_group, t_group = [], []
            continue
        grow_student = (len(s_buf) <= len(t_buf) and i < n) or j >= m
        if s_buf == "" and i < n:
            grow_student = True
        elif t_buf == "" and j < m:
            grow_student = False
        if grow_student:
            s_buf += s_pieces[i]
            s_group.append(i)
            i += 1
        else:
            t_buf += t_pieces[j]
            t_group.append(j)
            j += 1
    if s_group or t_group:
        groups.append((s_group, t_group))
    return groups


def gold_align_ids(s_ids, t_ids, student, teacher) -> list[tuple[list[int], list[int]]]:
    """Decode both id sequences and group them the GOLD way."""
    return gold_buffer_groups(decoded_pieces(student, s_ids), decoded_pieces(teacher, t_ids))
