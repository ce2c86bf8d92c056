"""J-KL (joint-chunk KL): the prefix support, the reference term, the vocab-parallel term
(TP=1 == reference, TP=2 on gloo == TP=1, values and gradients) and the oracle: a tiny fp64
teacher run explicitly on context + the teacher tokenization of every supported student token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtoken_nemo.losses.common import ChunkSpans
from xtoken_nemo.losses.jkl import jkl_teacher_log_probs, jkl_term_parallel, joint_entries
from xtoken_nemo.losses.reference import jkl_teacher_support, jkl_term
from xtoken_nemo.vocab.prefix_support import PrefixSupport, PrefixSupportError, build_prefix_support

V_S, V_T = 37, 29  # odd: TP=2 pads both vocabularies by one column


# ----------------------------------------------------------------------------------------------
# a synthetic case: support, chunks, logits
# ----------------------------------------------------------------------------------------------
def synthetic_case(seed: int = 0, dtype=torch.float64) -> dict:
    """Teacher prefixes (1,), (2,), (1, 3), (4, 5) with a few entries each; chunks of every kind:
    1-to-1, 1-to-2 and 1-to-3 (joint), 2-to-1 and 2-to-2 (not joint), a joint chunk whose prefix
    has no entry."""
    g = torch.Generator().manual_seed(seed)
    by_prefix = {
        (1,): [(0, 10), (3, 11), (7, 12), (8, 13)],
        (2,): [(2, 14), (9, 15)],
        (1, 3): [(5, 16), (6, 17), (0, 18)],
        (4, 5): [(1, 19)],
    }
    support = PrefixSupport.from_prefix_map(by_prefix, V_S, V_T)
    # (student positions, teacher pieces) per chunk; pieces are the teacher targets of the span
    plan = [
        (1, [6]),  # 1-to-1
        (1, [1, 3]),  # joint, level 1 under (1,): all four entries (x=3 is the realised last piece)
        (2, [2, 2]),  # 2-to-2: not joint
        (1, [1, 3, 5]),  # joint, k=3: level 1 (1,) without x=3, level 2 (1, 3)
        (1, [7, 7]),  # joint but prefix (7,) has no entry
        (2, [4]),  # 2-to-1
        (1, [4, 5, 1]),  # joint, k=3: level 1 (4,) none, level 2 (4, 5)
        (1, [2, 9]),  # joint under (2,)
    ]
    s_starts, t_starts, targets = [], [], []
    s_pos = t_pos = 0
    for s_len, pieces in plan:
        s_starts.append(s_pos)
        t_starts.append(t_pos)
        s_pos += s_len
        t_pos += len(pieces)
        targets += pieces
    s_spans = ChunkSpans(np.array(s_starts), np.array(s_starts) + np.array([p[0] for p in plan]))
    t_spans = ChunkSpans(np.array(t_starts), np.array(t_starts) + np.array([len(p[1]) for p in plan]))
    return dict(
        support=support,
        s_spans=s_spans,
        t_spans=t_spans,
        targets=torch.tensor(targets),
        student=torch.randn(s_pos, V_S, generator=g, dtype=dtype) * 2,
        teacher=torch.randn(t_pos, V_T, generator=g, dtype=dtype) * 2,
    )


def as_lists(spans: ChunkSpans) -> list[list[int]]:
    return [list(range(a, b)) for a, b in zip(spans.starts.tolist(), spans.ends.tolist())]


def reference_term(case: dict, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return jkl_term(
        student,
        case["teacher"],
        as_lists(case["s_spans"]),
        as_lists(case["t_spans"]),
        case["targets"],
        case["support"],
        temperature,
        reduction="none",
    )


def parallel_term(case: dict, student: torch.Tensor, temperature: float = 1.0, block: int = 256, group=None):
    """Student chunk rows [N, V_S/tp] and teacher [T, V_T/tp] are this rank's shards."""
    entries = joint_entries(case["support"], case["s_spans"], case["t_spans"], case["targets"])
    return jkl_term_parallel(
        student, case["teacher_shard"], entries, V_S, V_T, temperature, group=group, block_size=block
    )


# ----------------------------------------------------------------------------------------------
# the support
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_qwen():
    from xtoken_nemo.tokenizers import load_tokenizer

    student, teacher = load_tokenizer("llama3"), load_tokenizer("qwen3")
    return student, teacher, build_prefix_support(student, teacher, progress=False)


def test_support_row_of_47_is_40_to_49_under_4(llama_qwen):
    student, teacher, support = llama_qwen
    pieces = teacher.encode_batch(["47"])[0]
    assert [teacher.token_text(t) for t in pieces] == ["4", "7"]
    row = support.entries(tuple(pieces[:1]))
    assert sorted(student.token_text(v) for _, v in row) == [f"4{d}" for d in range(10)]
    assert all(teacher.token_text(x) == student.token_text(v)[1] for x, v in row)
    assert support.entries((teacher.encode_batch(["Zq"])[0][0], 10**9 % V_T)) == []


def test_support_is_deterministic_saved_with_fingerprints(llama_qwen, tmp_path):
    student, teacher, support = llama_qwen
    again = build_prefix_support(student, teacher, progress=False)
    for name in ("prefix_offsets", "prefix_pieces", "entry_offsets", "entry_pieces", "entry_students"):
        assert torch.equal(getattr(support, name), getattr(again, name)), name
    path = tmp_path / "support.safetensors"
    support.save(path)
    loaded = PrefixSupport.load(path, student, teacher)
    assert torch.equal(loaded.entry_students, support.entry_students)
    with pytest.raises(PrefixSupportError, match="built for student tokenizer"):
        PrefixSupport.load(path, teacher, teacher)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PrefixSupportError, match="corrupt or truncated"):
        PrefixSupport.load(path)
    with pytest.raises(PrefixSupportError, match="does not exist"):
        PrefixSupport.load(tmp_path / "missing.safetensors")


def test_every_multi_piece_student_token_is_one_entry(llama_qwen):
    """Independent of the builder: a student token is under prefix P with last piece x exactly
    when the teacher tokenizes its text as P + (x,)."""
    student, teacher, support = llama_qwen
    sample = [v for v in range(0, student.vocab_size, 97) if student.surfaces[v]]
    texts = [student.surfaces[v].decode("utf-8", errors="strict") for v in sample if _utf8(student.surfaces[v])]
    ids = [v for v in sample if _utf8(student.surfaces[v])]
    checked = 0
    for v, pieces in zip(ids, teacher.encode_batch(texts)):
        if len(pieces) < 2 or student.surfaces[v] in _teacher_surfaces(teacher):
            continue
        assert (pieces[-1], v) in support.entries(tuple(pieces[:-1])), student.token_text(v)
        checked += 1
    assert checked > 50


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_SURFACES: dict = {}


def _teacher_surfaces(teacher) -> set:
    if teacher.name not in _SURFACES:
        _SURFACES[teacher.name] = {s for s in teacher.surfaces if s is not None}
    return _SURFACES[teacher.name]


# ----------------------------------------------------------------------------------------------
# reference and vocab-parallel term
# ----------------------------------------------------------------------------------------------
def test_joint_entries_follow_the_partition():
    case = synthetic_case()
    e = joint_entries(case["support"], case["s_spans"], case["t_spans"], case["targets"])
    assert e.rows.tolist() == [1, 3, 4, 6, 7]  # joint chunks; chunk 4 has no entry but a row
    by_row = {}
    for r, v in zip(e.entry_row.tolist(), e.entry_student.tolist()):
        by_row.setdefault(e.rows[r].item(), []).append(v)
    assert sorted(by_row[1]) == [10, 11, 12, 13]
    assert sorted(by_row[3]) == [10, 12, 13, 16, 17, 18]  # 11 (x = 3, the realised next piece) is REST
    assert sorted(by_row[6]) == [19]
    assert sorted(by_row[7]) == [14, 15]
    assert 4 not in by_row


def test_reference_is_a_proper_kl_and_zero_at_the_teacher():
    case = synthetic_case()
    term = reference_term(case, case["student"])
    assert (term[[0, 2, 4, 5]] == 0).all()  # not joint, or no entry
    assert (term[[1, 3, 6, 7]] > 0).all()
    # a student that copies the teacher's probabilities on the support and REST has term 0
    student = case["student"].clone()
    chunks, t_chunks = as_lists(case["s_spans"]), as_lists(case["t_spans"])
    for n in (1, 3, 6, 7):
        entries = jkl_teacher_support(case["teacher"], t_chunks[n], case["targets"], case["support"])
        q = torch.stack([lq for _, lq in entries]).exp()
        ids = [v for v, _ in entries]
        rest = [v for v in range(V_S) if v not in ids]
        row = torch.full((V_S,), float(torch.log((1 - q.sum()) / len(rest))), dtype=torch.float64)
        row[ids] = q.log()
        student[chunks[n][0]] = row
    assert reference_term(case, student)[[1, 3, 6, 7]].abs().max() < 1e-12


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_parallel_tp1_equals_reference_values_and_gradients(temperature):
    case = synthetic_case()
    case["teacher_shard"] = case["teacher"]
    first = torch.from_numpy(case["s_spans"].starts)
    s_ref = case["student"].clone().requires_grad_(True)
    ref = reference_term(case, s_ref, temperature)
    s_par = case["student"][first].clone().requires_grad_(True)
    par = parallel_term(case, s_par, temperature, block=3)  # blocks of 3 rows: the block loop runs
    torch.testing.assert_close(par, ref, rtol=0, atol=1e-12)
    w = torch.linspace(0.5, 1.5, len(first), dtype=torch.float64)
    (ref * w).sum().backward()
    (par * w).sum().backward()
    assert s_par.grad.layout == torch.sparse_coo  # row-sparse: only the joint chunks' rows
    torch.testing.assert_close(s_par.grad.to_dense(), s_ref.grad[first], rtol=0, atol=1e-12)


def test_parallel_gradcheck_fp64():
    case = synthetic_case(seed=3)
    case["teacher_shard"] = case["teacher"]
    first = torch.from_numpy(case["s_spans"].starts)
    s = case["student"][first].clone().requires_grad_(True)
    # gradcheck wants a strided gradient on its input: densify the term's row-sparse one
    assert torch.autograd.gradcheck(lambda x: parallel_term(case, _Densify.apply(x), 1.5, block=2).sum(), (s,))


class _Densify(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient into a strided one."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.layout != torch.strided else grad


def test_no_joint_chunk_is_zero():
    case = synthetic_case()
    spans = ChunkSpans(np.array([0, 1]), np.array([1, 2]))
    assert joint_entries(case["support"], spans, spans, case["targets"]) is None
    out = jkl_term_parallel(case["student"][:2], case["teacher"], None, V_S, V_T)
    assert out.tolist() == [0.0, 0.0]


def _tp2_worker(rank: int, world_size: int, seed: int):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for dtype in (torch.float64, torch.float32):
        case = synthetic_case(seed, dtype)
        first = torch.from_numpy(case["s_spans"].starts)
        s_pad = torch.nn.functional.pad(case["student"][first], (0, 1))  # 38 columns, 19 per rank
        t_pad = torch.nn.functional.pad(case["teacher"], (0, 1))  # 30 columns, 15 per rank
        case["teacher_shard"] = t_pad.chunk(2, dim=1)[rank].contiguous()
        s = s_pad.chunk(2, dim=1)[rank].contiguous().requires_grad_(True)
        term = parallel_term(case, s, 1.0, block=2, group=group)
        (term * torch.arange(1, len(first) + 1, dtype=term.dtype)).sum().backward()
        out[str(dtype)] = dict(term=term.detach(), grad=s.grad.to_dense())
    return out


@pytest.fixture(scope="module")
def tp2():
    from distributed_utils import run_distributed

    return run_distributed(_tp2_worker, world_size=2, tp=2, args=(5,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tp2_equals_tp1_values_and_gradients(tp2, dtype):
    case = synthetic_case(5, dtype)
    case["teacher_shard"] = case["teacher"]
    first = torch.from_numpy(case["s_spans"].starts)
    s = case["student"][first].clone().requires_grad_(True)
    term = parallel_term(case, s, 1.0)
    (term * torch.arange(1, len(first) + 1, dtype=term.dtype)).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for rank in (0, 1):
        torch.testing.assert_close(tp2[rank][str(dtype)]["term"], term.detach(), rtol=0, atol=tol)
    grad = torch.cat([tp2[0][str(dtype)]["grad"], tp2[1][str(dtype)]["grad"]], dim=1)
    assert (grad[:, V_S:] == 0).all()  # the padded column
    torch.testing.assert_close(grad[:, :V_S], s.grad.to_dense(), rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------------
# the oracle: explicit teacher forwards on context + the teacher pieces of every supported token
# ----------------------------------------------------------------------------------------------
class TinyCausalLM(torch.nn.Module):
    """One causal attention layer and an MLP over token + position embeddings, fp64."""

    def __init__(self, vocab: int, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(256, width)
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.GELU(), torch.nn.Linear(32, width))
        self.head = torch.nn.Linear(width, vocab)
        self.double()

    def forward(self, ids: list[int]) -> torch.Tensor:
        """[L] ids -> [L, V] logits (position i predicts token i + 1)."""
        x = self.emb(torch.tensor([ids])) + self.pos(torch.arange(len(ids)))[None]
        mask = torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), 1)
        h = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return self.head(h + self.mlp(h))[0] * 3.0


def test_oracle_teacher_side_equals_explicit_forwards(llama_qwen):
    from xtoken_nemo.align.api import align_text

    student, teacher, support = llama_qwen
    text = "Order 47 costs 1,259 dollars and 308 cents, paid on day 26."
    aligned = align_text(text, student, teacher, add_bos=False)
    chunks = aligned.alignment.chunks[1:]  # label coordinates need a token before the chunk
    t_ids = aligned.teacher_ids
    model = TinyCausalLM(teacher.vocab_size).eval()
    with torch.no_grad():
        logits = model(t_ids)  # [L, V_T]: position p predicts t_ids[p + 1]
    targets = torch.tensor(t_ids[1:] + [0])
    s_spans = ChunkSpans(chunks[:, 0] - 1, chunks[:, 1] - 1)
    t_spans = ChunkSpans(chunks[:, 2] - 1, chunks[:, 3] - 1)
    entries = joint_entries(support, s_spans, t_spans, targets)
    log_q = jkl_teacher_log_probs(logits, entries, teacher.vocab_size)
    texts = {student.token_text(v) for v in entries.entry_student.tolist()}
    # "1,259" is 1 , 259 for the student and 2 5 9 for the teacher; under "3" of "308" the "30"
    # continues the realised path (its mass is in "300".."309") and is REST
    assert {"47", "40", "49", "25", "259", "31", "308"} <= texts and "30" not in texts, texts
    checked = 0
    with torch.no_grad():
        for e in range(entries.num_entries):
            chunk = int(entries.rows[entries.entry_row[e]])
            a = int(t_spans.starts[chunk])  # label position of the chunk's first piece
            v = int(entries.entry_student[e])
            pieces = teacher.encode_batch([student.token_text(v)])[0]  # the tokenizer, not the support
            explicit = torch.log_softmax(model(t_ids[: a + 1] + pieces), dim=-1)
            log_chain = sum(explicit[a + i, p] for i, p in enumerate(pieces))
            assert abs(float(log_q[e]) - float(log_chain)) < 1e-9, (student.token_text(v), float(log_q[e]))
            checked += 1
    assert checked == entries.num_entries >= 30
    # and every student token whose pieces extend a realised prefix by one is in the support
    for r, chunk in enumerate(entries.rows.tolist()):
        a, b = int(t_spans.starts[chunk]), int(t_spans.ends[chunk])
        pieces = targets[a:b].tolist()
        got = set(entries.entry_student[entries.entry_row == r].tolist())
        want = set()
        for j in range(1, len(pieces)):
            for x, v in support.entries(tuple(pieces[:j])):
                if j == len(pieces) - 1 or x != pieces[j]:
                    want.add(v)
        assert got == want


# ----------------------------------------------------------------------------------------------
# the mode in the trainer's loss: P-KL plus the weighted joint term
# ----------------------------------------------------------------------------------------------
def _random_w(seed: int = 0):
    from xtoken_nemo.vocab import ProjectionMatrix

    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, V_T, (V_S, 3), generator=g)
    values = torch.rand(V_S, 3, generator=g)
    return ProjectionMatrix(indices, values / values.sum(1, keepdim=True), V_T)


@pytest.mark.parametrize("merge", ["chain", "first"])
def test_jkl_mode_is_pkl_plus_the_weighted_joint_term(merge):
    from xtoken_nemo.distill import kd
    from xtoken_nemo.distill.config import TeacherConfig
    from xtoken_nemo.losses import prepare_projection

    case = synthetic_case(seed=2, dtype=torch.float32)
    W = _random_w()
    s_spans, t_spans = case["s_spans"], case["t_spans"]
    table = torch.from_numpy(np.stack([s_spans.starts, s_spans.ends, t_spans.starts, t_spans.ends], 1))[None]
    s_len = case["student"].shape[0]
    s_labels = torch.randint(0, V_S, (1, s_len), generator=torch.Generator().manual_seed(1))
    t_labels = case["targets"][None]

    def run(mode: str, weight: float):
        cfg = TeacherConfig(name="q", mode=mode, merge=merge, joint_weight=weight)
        spec = kd.TeacherLossSpec(cfg, V_T, projection=prepare_projection(W, V_S, V_T), W=W)
        if mode == "jkl":
            spec.support = case["support"]
        s = case["student"][None].clone().requires_grad_(True)
        out = kd.teacher_kd_loss(spec, s, s_labels, V_S, case["teacher"][None], t_labels, table, 4, t_labels)
        out.trainable.backward()
        return out, s.grad

    pkl, g_pkl = run("pkl", 1.0)
    zero, g_zero = run("jkl", 0.0)
    for name in ("trainable", "constant", "uncovered"):
        assert torch.equal(getattr(zero, name), getattr(pkl, name)), name
    assert torch.equal(g_zero, g_pkl)
    jkl, g_jkl = run("jkl", 0.5)
    joint = reference_term(case, case["student"].double())
    torch.testing.assert_close(
        jkl.trainable.double(), pkl.trainable.double() + 0.5 * joint.mean(), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(jkl.constant, pkl.constant) and torch.equal(jkl.uncovered, pkl.uncovered)
    assert not torch.equal(g_jkl, g_pkl)


def test_merged_continuation_bias_is_the_teachers_merging_mass(llama_qwen):
    """The stated bias (docs/method.md, "Merged continuations"): J-KL's q_T(v) is the probability
    that the teacher's pieces begin with v's; the probability that the student's next token is v
    is smaller by the teacher's mass on next pieces the student tokenizer would merge into v.
    Measured for the realised tokens of a number-heavy text with a tiny teacher: for each, every
    teacher piece y after the chunk is classified by encoding text(v) + text(y) with the student
    tokenizer."""
    from xtoken_nemo.align.api import align_text

    student, teacher, support = llama_qwen
    text = "Order 47 costs 259 dollars; 86 is next, then 5 and 71."
    aligned = align_text(text, student, teacher, add_bos=False)
    chunks = aligned.alignment.chunks[1:]
    t_ids = aligned.teacher_ids
    model = TinyCausalLM(teacher.vocab_size, seed=3).eval()
    with torch.no_grad():
        logits = model(t_ids)
    targets = torch.tensor(t_ids[1:] + [0])
    s_spans = ChunkSpans(chunks[:, 0] - 1, chunks[:, 1] - 1)
    t_spans = ChunkSpans(chunks[:, 2] - 1, chunks[:, 3] - 1)
    entries = joint_entries(support, s_spans, t_spans, targets)
    log_q = jkl_teacher_log_probs(logits, entries, teacher.vocab_size)
    s_ids = aligned.student_ids
    pieces_text = [teacher.token_text(y) for y in range(teacher.vocab_size)]
    measured = {}
    for r, chunk in enumerate(entries.rows.tolist()):
        realised = s_ids[int(s_spans.starts[chunk]) + 1]  # the chunk's student token
        (e,) = ((entries.entry_row == r) & (entries.entry_student == realised)).nonzero()[:, 0].tolist()
        word = student.token_text(realised)
        first_ids = [ids[0] for ids in student.encode_batch([word + y for y in pieces_text])]
        merges = torch.tensor([f != realised for f in first_ids])
        after = int(t_spans.ends[chunk])  # the teacher position after the chunk: its next piece
        p_next = torch.softmax(logits[after], dim=-1)
        q = float(log_q[e].exp())
        exact = q * float(p_next[~merges].sum())  # P(the student's next token is v) under the teacher
        m = float(p_next[merges].sum())
        assert q - exact == pytest.approx(q * m, rel=1e-9, abs=1e-15) and q >= exact
        measured[word] = m
    assert set(measured) == {"47", "259", "86", "71"}
    assert measured["259"] == 0.0  # a fourth digit starts a new Llama group: nothing merges
    assert all(measured[w] > 0 for w in ("47", "86", "71"))  # a third digit would: the bias is real
