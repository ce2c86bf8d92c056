"""Exact span alignment in linear time (plus a sort of the boundary sets in C).

Each side's tokens occupy positions of the text: a non-empty token covers ``[start, end)``, a
token with no span (BOS/EOS/special, or an added token) sits at one position with
``start == end``. A side has a *cut* after a non-empty token when the next non-empty token starts
at or after its end (two byte-level tokens that share one multi-byte character overlap in
character offsets, so there is no cut between them). Chunk boundaries are the positions where
**both** sides have a cut; each chunk is the run of tokens between two consecutive common cuts.

Positions come from one of two sources:
- *bytes* (default): every token's surface bytes (:attr:`Tokenizer.surfaces`). For byte-level BPE
  and tiktoken the surfaces concatenate to the UTF-8 text exactly, so the byte offset of each
  token is a cumulative sum: no text, no offsets, no overlap problem. Used whenever the two sides'
  surfaces concatenate to the same bytes.
- *character offsets* from ``tok.encode(text)``: used when the surfaces do not reproduce the text
  (SentencePiece's dummy prefix, normalizers); offsets point into the original text.

Zero-width tokens at a common cut become their own chunks: a pair when a zero-width token on
each side shares a role or content (BOS<->BOS, EOS<->EOS, ``<|endoftext|>``<->``<|endoftext|>``),
otherwise a *gap* chunk with an empty span on the other side. A zero-width token that is not at a
common cut (only possible for id input with specials mid-text) stays inside its chunk.
"""

from __future__ import annotations

from functools import lru_cache
from operator import itemgetter

import numpy as np

from xtoken_nemo.align.alignment import Alignment
from xtoken_nemo.errors import XTokenError


class AlignmentError(XTokenError):
    """Two token sequences cannot be aligned as asked (e.g. texts differ on the exact path)."""


class SurfaceTable:
    """Per-tokenizer lookup tables the aligners need, built once per tokenizer.

    lengths:   [vocab_size] int64 surface length in bytes (0 for special/unused ids)
    pieces:    [vocab_size] surface bytes, ``b""`` for special/unused ids
    special:   [vocab_size] bool, id has no surface
    """

    def __init__(self, tok) -> None:
        surfaces = tok.surfaces
        self.tok = tok
        self.pieces: list[bytes] = [s if s is not None else b"" for s in surfaces]
        self.lengths = np.fromiter((len(s) for s in self.pieces), dtype=np.int64, count=len(self.pieces))
        self.special = np.fromiter((s is None for s in surfaces), dtype=bool, count=len(surfaces))
        roles: dict[int, set[str]] = {}
        for role, tid in tok.special_ids.items():
            roles.setdefault(tid, set()).add("role:" + role)
        self._roles = roles
        self._special_tokens = dict(tok.special_tokens)

    def key(self, token_id: int) -> frozenset[str]:
        """What a zero-width token may be paired on: its roles and its literal content."""
        key = set(self._roles.get(token_id, ()))
        content = self._special_tokens.get(token_id)
        if content is not None:
            key.add("content:" + content)
        return frozenset(key)

    def concat(self, ids) -> bytes:
        """Surface bytes of a sequence of ids (specials contribute nothing)."""
        n = len(ids)
        if n == 0:
            return b""
        if n == 1:
            return self.pieces[int(ids[0])]
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return b"".join(itemgetter(*ids)(self.pieces))

    def byte_positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] start and [n] end byte offsets of every token (zero width for specials)."""
        ends = np.cumsum(self.lengths[ids])
        starts = ends - self.lengths[ids]
        return starts, ends


@lru_cache(maxsize=16)
def surface_table(tok) -> SurfaceTable:
    """The cached :class:`SurfaceTable` of a tokenizer object."""
    return SurfaceTable(tok)


def _pair_zero_width(s_keys: list[frozenset], t_keys: list[frozenset]) -> list[tuple[int, int]]:
    """Moves (ds, dt) in {(1,1), (1,0), (0,1)} for the zero-width tokens at one common cut."""
    moves, i, j = [], 0, 0
    while i < len(s_keys) or j < len(t_keys):
        if i < len(s_keys) and j < len(t_keys) and s_keys[i] & t_keys[j]:
            moves.append((1, 1))
            i, j = i + 1, j + 1
        elif i < len(s_keys) and not any(s_keys[i] & k for k in t_keys[j:]):
            moves.append((1, 0))
            i += 1
        elif j < len(t_keys):
            moves.append((0, 1))
            j += 1
        else:  # student token pairs with a later teacher token: the teacher's earlier one is a gap
            moves.append((1, 0))
            i += 1
    return moves


def _cuts(start: np.ndarray, end: np.ndarray):
    """Indices of non-empty tokens, and each side's cuts: position = start of the next token,
    count = non-empty tokens before the cut. A hole in the coverage (text a normalizer dropped or
    merged, e.g. the combining mark of "e\u0301" under NFC) stays with the token before it."""
    nonempty = np.flatnonzero(end > start)
    st, e = start[nonempty], end[nonempty]
    valid = st[1:] >= e[:-1]
    pos = st[1:][valid]
    count = np.flatnonzero(valid) + 1
    return nonempty, pos, count


def align_positions(
    s_start: np.ndarray,
    s_end: np.ndarray,
    t_start: np.ndarray,
    t_end: np.ndarray,
    s_key=None,
    t_key=None,
    unit: str = "byte",
) -> Alignment:
    """Exact alignment of two tokenizations given each token's [start, end) position.

    s_start, s_end: [n] student token positions (non-decreasing; start == end: zero width)
    t_start, t_end: [m] teacher token positions, in the same unit and text
    s_key, t_key:   callables index -> frozenset used to pair zero-width tokens (None: never pair)
    """
    s_start, s_end = np.asarray(s_start, np.int64), np.asarray(s_end, np.int64)
    t_start, t_end = np.asarray(t_start, np.int64), np.asarray(t_end, np.int64)
    n, m = s_start.shape[0], t_start.shape[0]
    s_ne, s_pos, s_cnt = _cuts(s_start, s_end)
    t_ne, t_pos, t_cnt = _cuts(t_start, t_end)

    common, i_s, i_t = np.intersect1d(s_pos, t_pos, assume_unique=True, return_indices=True)
    # cut list: START, interior common cuts, END (after everything on both sides)
    ks = np.concatenate(([0], s_cnt[i_s], [s_ne.shape[0]])).astype(np.int64)
    kt = np.concatenate(([0], t_cnt[i_t], [t_ne.shape[0]])).astype(np.int64)
    s_last = int(s_end[s_ne[-1]]) if s_ne.size else 0
    t_last = int(t_end[t_ne[-1]]) if t_ne.size else 0
    pos = np.concatenate(([0], common, [max(s_last, t_last)])).astype(np.int64)
    keep = np.ones(ks.shape[0], dtype=bool)
    keep[1:] = (np.diff(ks) > 0) | (np.diff(kt) > 0)
    ks, kt, pos = ks[keep], kt[keep], pos[keep]

    # original-index region [lo, hi) of zero-width tokens at each cut
    s_ne_ext = np.concatenate(([-1], s_ne, [n]))
    t_ne_ext = np.concatenate(([-1], t_ne, [m]))
    s_lo, s_hi = s_ne_ext[ks] + 1, s_ne_ext[ks + 1]
    t_lo, t_hi = t_ne_ext[kt] + 1, t_ne_ext[kt + 1]
    # the leading cut's region starts at token 0 on both sides
    s_lo[0], t_lo[0] = 0, 0

    # text chunks: between cut c (after its zero-width region) and cut c+1 (before its region)
    text_s, text_t = s_lo[1:], t_lo[1:]
    text_span = np.stack([pos[:-1], pos[1:]], axis=1)
    special_cuts = np.flatnonzero((s_hi > s_lo) | (t_hi > t_lo))
    if special_cuts.size == 0:
        return Alignment(text_s, text_t, text_span, unit, "exact")

    parts_s, parts_t, parts_span, prev = [], [], [], 0
    for c in special_cuts.tolist():
        # text chunks ending at cuts <= c come first
        parts_s.append(text_s[prev:c])
        parts_t.append(text_t[prev:c])
        parts_span.append(text_span[prev:c])
        prev = c
        s_keys = [s_key(i) if s_key else frozenset() for i in range(int(s_lo[c]), int(s_hi[c]))]
        t_keys = [t_key(j) if t_key else frozenset() for j in range(int(t_lo[c]), int(t_hi[c]))]
        cs, ct = int(s_lo[c]), int(t_lo[c])
        ms, mt = [], []
        for ds, dt in _pair_zero_width(s_keys, t_keys):
            cs, ct = cs + ds, ct + dt
            ms.append(cs)
            mt.append(ct)
        parts_s.append(np.array(ms, np.int64))
        parts_t.append(np.array(mt, np.int64))
        parts_span.append(np.full((len(ms), 2), pos[c], np.int64))
    parts_s.append(text_s[prev:])
    parts_t.append(text_t[prev:])
    parts_span.append(text_span[prev:])
    return Alignment(np.concatenate(parts_s), np.concatenate(parts_t), np.concatenate(parts_span), unit, "exact")


def align_bytes(s_ids, t_ids, student, teacher) -> Alignment:
    """Exact alignment on surface bytes (no text needed). Caller guarantees equal concatenations."""
    s_tab, t_tab = surface_table(student), surface_table(teacher)
    s_ids, t_ids = np.asarray(s_ids, np.int64), np.asarray(t_ids, np.int64)
    s_start, s_end = s_tab.byte_positions(s_ids)
    t_start, t_end = t_tab.byte_positions(t_ids)
    return align_positions(
        s_start,
        s_end,
        t_start,
        t_end,
        lambda i: s_tab.key(int(s_ids[i])),
        lambda j: t_tab.key(int(t_ids[j])),
        unit="byte",
    )


def align_offsets(s_ids, s_offsets, t_ids, t_offsets, student, teacher) -> Alignment:
    """Exact alignment on character offsets into one text (``Encoding.offsets`` of each side)."""
    s_tab, t_tab = surface_table(student), surface_table(teacher)
    s_off = np.asarray(s_offsets, np.int64).reshape(-1, 2)
    t_off = np.asarray(t_offsets, np.int64).reshape(-1, 2)
    s_list, t_list = list(s_ids), list(t_ids)
    # a special id always counts as zero width, whatever offsets a back end reports for it
    s_sp = s_tab.special[np.asarray(s_list, np.int64)] if s_list else np.zeros(0, bool)
    t_sp = t_tab.special[np.asarray(t_list, np.int64)] if t_list else np.zeros(0, bool)
    s_start, t_start = s_off[:, 0], t_off[:, 0]
    s_end = np.where(s_sp, s_start, np.maximum(s_off[:, 1], s_start))
    t_end = np.where(t_sp, t_start, np.maximum(t_off[:, 1], t_start))
    return align_positions(
        s_start,
        s_end,
        t_start,
        t_end,
        lambda i: s_tab.key(s_list[i]),
        lambda j: t_tab.key(t_list[j]),
        unit="char",
    )
