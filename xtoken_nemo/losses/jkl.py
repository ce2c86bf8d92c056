"""J-KL, the joint-chunk term, on vocab-sharded logits (docs/method.md, "J-KL").

A *joint chunk* is an aligned chunk whose student side is one token and whose teacher side is
k >= 2 pieces t_1 .. t_k (Llama's "47" against Qwen3's "4", "7"). Its outcomes are the student
tokens of the prefix support (:class:`~xtoken_nemo.vocab.prefix_support.PrefixSupport`) under the
realised teacher prefixes (t_1 .. t_j), j = 1 .. k-1, each with its last piece x, plus one REST
bucket:

    q_T(v) = prod_{i<j} p_T^{(i)}(t_{i+1}) * p_T^{(j)}(x)     teacher chain product, teacher-forced
    p_S(v) = the student's probability of v at its one position
    term   = sum_v q_T(v) log(q_T(v) / p_S(v)) + R_T log(R_T / R_S),   R = 1 - the side's support sum

where p_T^{(i)} is the teacher's distribution at the chunk's i-th position. At a level j < k-1 the
entry whose last piece is the realised t_{j+1} is left out (its event continues down the realised
path and lies in the deeper levels' mass); its student token falls into REST. The outcomes are
then disjoint leaves of the teacher's piece tree, so the teacher side sums to 1 and the term is a
proper KL. Every other chunk (1-to-1, many-to-many, several student tokens) has no joint term.

The host builds the per-micro-batch index (:func:`joint_entries`, from the host chunk table and
the teacher's host labels); on the device the term needs log-probabilities at a few (row, id)
pairs of each side: :class:`_PairLogProbs` computes them vocab-parallel in blocks of rows
(forward: one max, one sum-exp and one gather all-reduce per block; backward: recomputes each
block's softmax, no collective). The unsharded oracle is
:func:`xtoken_nemo.losses.reference.jkl_term`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from xtoken_nemo.errors import LossInputError
from xtoken_nemo.losses import comm
from xtoken_nemo.losses.common import (
    DEFAULT_BLOCK,
    MASK_VALUE,
    PROB_FLOOR,
    ChunkSpans,
    compute_dtype,
    to_device,
)
from xtoken_nemo.losses.shard import Shard, check_block, make_shard, token_blocks
from xtoken_nemo.vocab.prefix_support import PrefixSupport


class JointEntries(NamedTuple):
    """The joint chunks of one micro-batch and their support (host int64 tensors).

    rows:          [J] the chunk (row of the merged chunk logits, in [0, N)) of each joint chunk
    teacher_pos:   [G] teacher (flat position, id) pairs whose log-probabilities the term reads:
    teacher_ids:   [G]   the realised chain (t_{i+1} at position i) and every entry's last piece
    chain_pair:    [C] chain pair i of a chunk adds its log-prob to the prefix slot of every
    chain_slot:    [C]   level j > i of that chunk
    entry_row:     [E] the entry's joint chunk, in [0, J)
    entry_student: [E] its student token
    entry_pair:    [E] the pair of its last piece (teacher position t_start + j)
    entry_slot:    [E] its prefix slot (the chain product of t_1 .. t_j)
    num_slots:     number of prefix slots
    """

    rows: torch.Tensor
    teacher_pos: torch.Tensor
    teacher_ids: torch.Tensor
    chain_pair: torch.Tensor
    chain_slot: torch.Tensor
    entry_row: torch.Tensor
    entry_student: torch.Tensor
    entry_pair: torch.Tensor
    entry_slot: torch.Tensor
    num_slots: int

    @property
    def num_entries(self) -> int:
        return int(self.entry_student.numel())


def joint_entries(
    support: PrefixSupport,
    student_spans: ChunkSpans,
    teacher_spans: ChunkSpans,
    teacher_targets: torch.Tensor | np.ndarray,
) -> JointEntries | None:
    """The :class:`JointEntries` of N chunks (both sides as spans of flat positions), with
    ``teacher_targets`` [T] the host ids of the teacher's next tokens (the pieces of a chunk
    spanning positions a .. a+k-1 are ``teacher_targets[a:a+k]``). None when no chunk is joint or
    no joint chunk has a support entry. A Python loop over the joint chunks (k - 1 dictionary
    lookups each); every other chunk costs nothing."""
    targets = np.asarray(teacher_targets.cpu() if isinstance(teacher_targets, torch.Tensor) else teacher_targets)
    s_len = np.asarray(student_spans.ends) - np.asarray(student_spans.starts)
    t_start = np.asarray(teacher_spans.starts)
    t_len = np.asarray(teacher_spans.ends) - t_start
    joint = np.nonzero((s_len == 1) & (t_len >= 2))[0]
    rows: list[int] = []
    pos: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    chain_pair: list[np.ndarray] = []
    chain_slot: list[np.ndarray] = []
    e_row: list[np.ndarray] = []
    e_student: list[np.ndarray] = []
    e_pair: list[np.ndarray] = []
    e_slot: list[np.ndarray] = []
    num_pairs = num_slots = 0
    for chunk in joint.tolist():
        a, k = int(t_start[chunk]), int(t_len[chunk])
        pieces = targets[a : a + k]
        if (pieces < 0).any():  # a masked label inside a chunk: no realised pieces to follow
            continue
        r = len(rows)
        rows.append(chunk)
        first_chain = num_pairs
        pos.append(np.arange(a, a + k - 1, dtype=np.int64))
        ids.append(pieces[: k - 1].astype(np.int64))
        num_pairs += k - 1
        prefix = tuple(pieces.tolist())
        for j in range(1, k):
            slot = num_slots
            num_slots += 1
            chain_pair.append(np.arange(first_chain, first_chain + j, dtype=np.int64))
            chain_slot.append(np.full(j, slot, dtype=np.int64))
            row = support.row_of(prefix[:j])
            if row < 0:
                continue
            last, students = support.row(row)
            if j < k - 1:  # the realised next piece continues the path: not a leaf at this level
                keep = last != prefix[j]
                last, students = last[keep], students[keep]
            n = last.shape[0]
            pos.append(np.full(n, a + j, dtype=np.int64))
            ids.append(last)
            e_row.append(np.full(n, r, dtype=np.int64))
            e_student.append(students)
            e_pair.append(np.arange(num_pairs, num_pairs + n, dtype=np.int64))
            e_slot.append(np.full(n, slot, dtype=np.int64))
            num_pairs += n
    if not e_row:
        return None

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))

    return JointEntries(
        torch.tensor(rows, dtype=torch.int64),
        cat(pos),
        cat(ids),
        cat(chain_pair),
        cat(chain_slot),
        cat(e_row),
        cat(e_student),
        cat(e_pair),
        cat(e_slot),
        num_slots,
    )


# ----------------------------------------------------------------------------------------------
# log-probabilities at (row, id) pairs of vocab-sharded logits
# ----------------------------------------------------------------------------------------------
def _load_rows(x: torch.Tensor, rows: torch.Tensor, shard: Shard, temperature: float, dtype) -> torch.Tensor:
    """[Bk, n] rows of x in the compute dtype, / T, padded columns at MASK_VALUE: one new buffer
    (prep_block's out-of-place steps would make up to three)."""
    y = x[rows].to(dtype)
    if temperature != 1.0:
        y.div_(temperature)
    if shard.valid < shard.width:
        y[:, shard.valid :] = MASK_VALUE
    return y


class _PairLogProbs(torch.autograd.Function):
    """[G] log softmax(x[rows[pair_row]] / T)[ids], replicated, for x [R, V_pad/tp] sharded by
    columns. Forward in blocks of the U distinct rows; keeps only their log-normalizers [U]. The
    backward recomputes each block's softmax: d/dx = (onehot(ids) - softmax) * g / T per pair,
    summed per row; each rank writes its own columns (the gradient g is replicated), so it needs
    no collective."""

    @staticmethod
    def forward(ctx, x, rows, pair_row, ids, shard, temperature, group, block):  # type: ignore[override]
        cdt = compute_dtype(x)
        lse = x.new_empty(rows.shape[0], dtype=cdt)
        for a, b in token_blocks(rows.shape[0], block):
            y = _load_rows(x, rows[a:b], shard, temperature, cdt)  # [Bk, n]
            m = y.max(dim=-1).values
            comm.all_reduce_(m, "max", group)
            z = y.sub_(m[:, None]).exp_().sum(-1)  # in place: one [Bk, n] buffer per block
            comm.all_reduce_(z, "sum", group)
            lse[a:b] = m + z.log()
        local = ids - shard.start
        own = (local >= 0) & (local < shard.valid)
        col = local.clamp(0, shard.width - 1)
        picked = x[rows[pair_row], col].to(cdt) / temperature
        picked = torch.where(own, picked, picked.new_zeros(()))
        comm.all_reduce_(picked, "sum", group)  # each id is owned by exactly one rank
        ctx.save_for_backward(x, rows, pair_row, lse, col, own)
        ctx.cfg = (shard, temperature, block)
        return picked - lse[pair_row]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, rows, pair_row, lse, col, own = ctx.saved_tensors
        shard, temperature, block = ctx.cfg
        g = torch.where(own, grad.to(lse.dtype), lse.new_zeros(()))  # the one-hot part, on the id's owner
        per_row = torch.zeros_like(lse).index_add_(0, pair_row, grad.to(lse.dtype))  # [U] sum over the row's pairs
        vals = x.new_empty(rows.shape[0], x.shape[1])  # [U, n]: the gradient of the rows used, nothing else
        for a, b in token_blocks(rows.shape[0], block):
            blk = _load_rows(x, rows[a:b], shard, temperature, lse.dtype).sub_(lse[a:b, None]).exp_()
            blk.mul_(-per_row[a:b, None])
            # the pairs of this block (others add 0 at a clamped place): no boolean-mask indexing,
            # which would read a count on the host
            mine = (pair_row >= a) & (pair_row < b)
            blk.index_put_(((pair_row - a).clamp(0, b - a - 1), col), torch.where(mine, g, g.new_zeros(())), True)
            if temperature != 1.0:
                blk.div_(temperature)
            vals[a:b] = blk
        # row-sparse (the rows are distinct): autograd adds it into the dense gradient of the
        # logits that P-KL's backward returns, instead of a second [R, n] dense buffer
        out = torch.sparse_coo_tensor(rows[None], vals, x.shape, is_coalesced=True)
        return out, None, None, None, None, None, None, None


def pair_log_probs_parallel(
    logits: torch.Tensor,
    positions: torch.Tensor,
    ids: torch.Tensor,
    shard: Shard,
    temperature: float = 1.0,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """[G] replicated log p(ids[g] | row positions[g]) of vocab-sharded logits [R, V_pad/tp] at
    temperature T; ``positions``/``ids`` host int64 [G]. Differentiable w.r.t. ``logits``."""
    uniq, pair_row = np.unique(positions.numpy(), return_inverse=True)
    rows, pair_row, ids = to_device(
        logits.device, torch.from_numpy(uniq), torch.from_numpy(pair_row.reshape(-1)), ids.to(torch.int64)
    )
    return _PairLogProbs.apply(logits, rows, pair_row, ids, shard, float(temperature), group, check_block(block_size))


# ----------------------------------------------------------------------------------------------
# the term
# ----------------------------------------------------------------------------------------------
ROW_BLOCK_DIVISOR = 4
"""The term loads its rows in blocks of ``block_size // 4``: a quarter of the losses' [block, V]
buffer per side, so that beside P-KL (which the mode runs too) the term adds well under one such
buffer (bench/losses.py, ``jkl``)."""


def _row_block(block_size: int) -> int:
    return max(1, check_block(block_size) // ROW_BLOCK_DIVISOR)


def jkl_teacher_log_probs(
    teacher_flat: torch.Tensor,
    entries: JointEntries,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """[E] log q_T of every entry (the chain product of its prefix times its last piece), replicated,
    no gradient; teacher_flat [T, V_T_pad/tp] per-position logits."""
    group = comm.resolve_group(group)
    shard = make_shard(teacher_flat.shape[-1], teacher_vocab_size, group, "teacher")
    with torch.no_grad():
        lp = pair_log_probs_parallel(
            teacher_flat.detach(),
            entries.teacher_pos,
            entries.teacher_ids,
            shard,
            temperature,
            group,
            _row_block(block_size),
        )
        chain_pair, chain_slot, entry_pair, entry_slot = to_device(
            lp.device, entries.chain_pair, entries.chain_slot, entries.entry_pair, entries.entry_slot
        )
        prefix = lp.new_zeros(entries.num_slots).index_add_(0, chain_slot, lp[chain_pair])
        return prefix[entry_slot] + lp[entry_pair]


def partition_kl(log_q: torch.Tensor, log_p: torch.Tensor, entry_row: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[J] KL over each row's entries plus one REST bucket: sum_e q (log q - log p) + R_q log(R_q / R_p),
    R = 1 - the row's entry sum; log_q/log_p/entry_row [E]. The teacher's REST is clamped at 0
    (rounding), the student's at PROB_FLOOR (it is > 0 in exact math: the student's softmax gives
    every token outside the support some mass)."""
    q = log_q.exp()
    rest_q = (1.0 - q.new_zeros(num_rows).index_add(0, entry_row, q)).clamp_min(0.0)
    rest_p = (1.0 - log_p.new_zeros(num_rows).index_add(0, entry_row, log_p.exp())).clamp_min(PROB_FLOOR)
    support = log_p.new_zeros(num_rows).index_add(0, entry_row, torch.xlogy(q, q) - q * log_p)
    return support + torch.xlogy(rest_q, rest_q) - rest_q * rest_p.log()


def jkl_term_parallel(
    student_chunks: torch.Tensor,
    teacher_flat: torch.Tensor,
    entries: JointEntries | None,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    group: object | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """[N] the joint term per chunk (0 on chunks that are not joint), replicated.

    student_chunks [N, V_S_pad/tp]: each chunk's student logits (its first, here only, position);
    teacher_flat [T, V_T_pad/tp]: the teacher's per-position logits (no gradient); entries from
    :func:`joint_entries` (None: no joint chunk, the term is 0). Gradient flows to
    ``student_chunks`` at the joint rows only.
    """
    n = student_chunks.shape[0]
    cdt = compute_dtype(student_chunks)
    if entries is None:
        return student_chunks.new_zeros(n, dtype=cdt)
    if int(entries.rows.max()) >= n:
        raise LossInputError(f"joint entries name chunk {int(entries.rows.max())} but there are {n} chunks")
    group = comm.resolve_group(group)
    s_shard = make_shard(student_chunks.shape[-1], student_vocab_size, group, "student")
    if int(entries.entry_student.max()) >= student_vocab_size:
        raise LossInputError("the prefix support names student ids beyond the student vocab; rebuild it")
    log_q = jkl_teacher_log_probs(teacher_flat, entries, teacher_vocab_size, temperature, group, block_size)
    log_p = pair_log_probs_parallel(
        student_chunks,
        entries.rows[entries.entry_row],
        entries.entry_student,
        s_shard,
        temperature,
        group,
        _row_block(block_size),
    )
    entry_row, rows = to_device(log_p.device, entries.entry_row, entries.rows)
    per_joint = partition_kl(log_q.to(cdt), log_p, entry_row, int(entries.rows.numel()))
    return log_p.new_zeros(n).index_add(0, rows, per_joint)
