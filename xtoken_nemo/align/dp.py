"""Dynamic-programming fallback: align token *pieces* when no shared text positions exist.

Needleman-Wunsch over the two sequences of decoded pieces (surface bytes; ``None`` for special
tokens) with the scores of NVIDIA NeMo-RL's X-Token reference: match +3, mismatch -3, gap -1.5.
Moves:

- ``(1, 1)``: one token each; +3 if the pieces are equal (two specials: equal role/content),
  else -3 (a *mismatch* chunk). A special never mismatches against text: it is matched or gapped.
- ``(a, b)`` with ``1 <= a, b <= max_join`` (not both 1): a group of ``a`` student tokens against
  ``b`` teacher tokens whose concatenations are the same bytes, +3. The reference joins 1 token
  to up to 4; we allow a:b up to 4:4 so that the crossing splits of ordinary text
  ("un"+"believ"+"able" vs "unbel"+"iev"+"able") are one chunk, as on the exact path.
- ``(1, 0)`` / ``(0, 1)``: a gap, -1.5 (a token with no counterpart, e.g. a BOS on one side).

Every matched group scores the same, so the best path has as many matched chunks as possible:
on identical text that is the finest common partition, i.e. exactly the exact aligner's chunks,
as long as no chunk needs more than ``max_join`` tokens on a side (the one documented
difference; see tests/test_align.py).

Cost: a band of ``band`` bytes around the diagonal (in cumulative byte length, so zero-width
specials do not move it) keeps it O((n + m) * band / bytes_per_token * max_join^2). If the band
is too narrow for the two texts to meet, it is widened until they do.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

from xtoken_nemo.align.alignment import Alignment

NEG = float("-inf")


def align_pieces(
    s_pieces: list[bytes | None],
    t_pieces: list[bytes | None],
    s_keys: list[frozenset] | None = None,
    t_keys: list[frozenset] | None = None,
    *,
    match: float = 3.0,
    mismatch: float = -3.0,
    gap: float = -1.5,
    max_join: int = 4,
    band: int | None = None,
) -> Alignment:
    """Banded NW alignment of two piece sequences.

    s_pieces: [n] student pieces (bytes; None for a special token)
    t_pieces: [m] teacher pieces
    s_keys, t_keys: per token the role/content keys of specials (pairing), None elsewhere
    """
    n, m = len(s_pieces), len(t_pieces)
    s_keys = s_keys or [None] * n
    t_keys = t_keys or [None] * m
    cs, ct = [0], [0]
    nss, nst = [0], [0]  # prefix counts of specials
    for p in s_pieces:
        cs.append(cs[-1] + (len(p) if p is not None else 0))
        nss.append(nss[-1] + (p is None))
    for p in t_pieces:
        ct.append(ct[-1] + (len(p) if p is not None else 0))
        nst.append(nst[-1] + (p is None))
    S = b"".join(p for p in s_pieces if p is not None)
    T = b"".join(p for p in t_pieces if p is not None)
    width = band if band is not None else 32
    width = max(width, 0) + abs(cs[-1] - ct[-1])
    while True:
        result = _run(s_pieces, t_pieces, s_keys, t_keys, cs, ct, nss, nst, S, T, match, mismatch, gap, max_join, width)
        if result is not None:
            return result
        width = width * 2 + 64  # texts drifted further apart than the band: widen and retry


def _run(s_pieces, t_pieces, s_keys, t_keys, cs, ct, nss, nst, S, T, match, mismatch, gap, J, width):
    n, m = len(s_pieces), len(t_pieces)
    full = width >= max(cs[-1], ct[-1]) + 1
    los, his, scores, moves = [], [], [], []
    for i in range(n + 1):
        if full:
            lo, hi = 0, m
        else:
            lo = bisect_left(ct, cs[i] - width)
            hi = bisect_right(ct, cs[i] + width) - 1
        los.append(lo)
        his.append(hi)
        row = [NEG] * (hi - lo + 1)
        mv = [0] * (hi - lo + 1)
        sp_prev = s_pieces[i - 1] if i > 0 else None
        for j in range(lo, hi + 1):
            if i == 0 and j == 0:
                row[0] = 0.0
                continue
            best, bm = NEG, 0
            # (1, 1): match / mismatch / special pair
            if i > 0 and j > 0:
                pl = los[i - 1]
                if pl <= j - 1 <= his[i - 1]:
                    prev = scores[i - 1][j - 1 - pl]
                    if prev > NEG:
                        tp = t_pieces[j - 1]
                        if sp_prev is None or tp is None:
                            if (
                                sp_prev is None
                                and tp is None
                                and s_keys[i - 1]
                                and t_keys[j - 1]
                                and (s_keys[i - 1] & t_keys[j - 1])
                            ):
                                best, bm = prev + match, 11
                        elif sp_prev == tp:
                            best, bm = prev + match, 11
                        else:
                            best, bm = prev + mismatch, 111
            # (a, b) group matches, no specials inside a group
            if i > 0 and j > 0:
                for a in range(1, min(J, i) + 1):
                    if nss[i] - nss[i - a]:
                        break
                    la = cs[i] - cs[i - a]
                    pl, ph = los[i - a], his[i - a]
                    for b in range(1, min(J, j) + 1):
                        if nst[j] - nst[j - b]:
                            break
                        lb = ct[j] - ct[j - b]
                        if lb > la:
                            break
                        if lb < la or (a == 1 and b == 1):
                            continue
                        if pl <= j - b <= ph:
                            prev = scores[i - a][j - b - pl]
                            if prev + match > best and S[cs[i - a] : cs[i]] == T[ct[j - b] : ct[j]]:
                                best, bm = prev + match, a * 10 + b
            # gaps
            if i > 0:
                pl = los[i - 1]
                if pl <= j <= his[i - 1]:
                    prev = scores[i - 1][j - pl]
                    if prev + gap > best:
                        best, bm = prev + gap, 10
            if j > lo:
                prev = row[j - 1 - lo]
                if prev + gap > best:
                    best, bm = prev + gap, 1
            row[j - lo] = best
            mv[j - lo] = bm
        scores.append(row)
        moves.append(mv)
    if not (los[n] <= m <= his[n]) or scores[n][m - los[n]] == NEG:
        return None
    # backtrace
    s_ends, t_ends, spans, bad = [], [], [], []
    i, j = n, m
    while i > 0 or j > 0:
        code = moves[i][j - los[i]]
        flag = code >= 100
        a, b = divmod(code % 100, 10)
        s_ends.append(i)
        t_ends.append(j)
        spans.append((cs[i - a], cs[i]))
        bad.append(flag)
        i, j = i - a, j - b
    s_ends.reverse()
    t_ends.reverse()
    spans.reverse()
    bad.reverse()
    return Alignment(
        np.array(s_ends, np.int64),
        np.array(t_ends, np.int64),
        np.array(spans, np.int64).reshape(-1, 2),
        unit="byte",
        method="dp",
        mismatch=np.array(bad, dtype=bool),
    )
