"""The demo's teacher logits cache (xtoken_nemo.distill.teacher_cache): rows served from it are the
rows the teacher computes, only the missing rows are computed, a teacher whose forward depends on
the rest of the batch is caught by the check, and the fast demo trains the same students, bit for
bit, with and without it while actually using it."""

from __future__ import annotations

import json
import shutil

import torch

from xtoken_nemo.demo.pipeline import run_demo
from xtoken_nemo.distill.teacher_cache import TeacherLogitsCache

V = 5


class RowWise:
    """A batch-invariant 'teacher': each row's logits depend on that row's tokens only."""

    def __init__(self) -> None:
        self.rows_seen = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.rows_seen += tokens.shape[0]
        x = tokens.to(torch.float32)
        return torch.stack([torch.cumsum(x, 1) * (k + 1) + torch.sin(x) for k in range(V)], dim=-1)


def test_cache_serves_seen_rows_and_computes_only_the_rest():
    forward, cache = RowWise(), TeacherLogitsCache()
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    first = cache.logits("t", a, forward)
    assert torch.equal(first, forward(a)) and forward.rows_seen == 6  # 3 in the cache, 3 here
    forward.rows_seen = 0

    b = torch.tensor([[7, 8, 9], [0, 0, 1], [1, 2, 3]])  # two seen rows, one new
    got = cache.logits("t", b, forward)
    assert torch.equal(got, forward(b))
    assert forward.rows_seen == 1 + 3  # the new row only (+ the reference above)
    assert (cache.stats.hit_rows, cache.stats.miss_rows) == (2, 4)

    # another teacher, another padded length: not the same entries
    cache.logits("u", a, RowWise())
    cache.logits("t", torch.nn.functional.pad(a, (0, 1)), RowWise())
    assert cache.stats.hit_rows == 2 and len(cache) == 3 + 1 + 3 + 3

    # a served batch is a new tensor: changing it leaves the cache as it was
    got.add_(100.0)
    assert torch.equal(cache.logits("t", b, forward), forward(b))


def test_check_compares_a_fully_cached_batch_and_refuses_a_batch_dependent_teacher():
    rows = torch.tensor([[1, 2], [3, 4]])
    cache = TeacherLogitsCache()
    assert torch.equal(cache.logits("t", rows, RowWise(), check=True), RowWise()(rows))
    assert cache.stats.checked_batches == 0  # nothing was cached yet: computed, nothing to check
    cache.logits("t", rows, RowWise(), check=True)
    assert (cache.stats.checked_batches, cache.stats.failed_checks) == (1, 0)

    def batch_dependent(tokens):  # a row's logits depend on the batch size
        return RowWise()(tokens) + tokens.shape[0]

    cache.logits("d", rows[:1], batch_dependent)
    cache.logits("d", rows[1:], batch_dependent)
    got = cache.logits("d", rows, batch_dependent, check=True)
    assert torch.equal(got, batch_dependent(rows))  # the computed batch, not the cached rows
    assert cache.stats.failed_checks == 1 and all(k[0] != "d" for k in cache._rows)
    misses = cache.stats.miss_rows
    cache.logits("d", rows, batch_dependent)  # refused: computed, never cached again
    assert cache.stats.miss_rows == misses and all(k[0] != "d" for k in cache._rows)
    assert cache.stats.hit_rows == 2  # only teacher t's fully cached batch


def test_cache_bytes_are_bounded():
    cache = TeacherLogitsCache(max_bytes=2 * 3 * V * 4)  # two rows of 3 positions
    cache.logits("t", torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), RowWise())
    assert len(cache) == 2 and cache.nbytes == 2 * 3 * V * 4


def test_fast_demo_same_students_with_and_without_the_cache(tmp_path):
    """One seed of the fast demo with the cache (the default), then its student runs again without
    it: every loss of every step, the checkpoints' evaluation and the results are the same, and
    the cached runs took rows from the cache (and checked them)."""
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    seeds = (1,)
    lines: list[str] = []
    with_cache = run_demo(cached, fast=True, progress=False, echo=lines.append, seeds=seeds)

    shutil.copytree(cached, plain)
    students = [p for p in (plain / "runs").iterdir() if p.name.endswith("-s1") and "init" not in p.name]
    assert len(students) == 14  # 10 runs of the first task, 4 of the second (digits-*)
    for run in students:
        shutil.rmtree(run)
    without = run_demo(plain, fast=True, progress=False, echo=lines.append, seeds=seeds, teacher_cache=False)

    hits = checked = 0
    for run in students:
        a = json.loads((cached / "runs" / run.name / "history.json").read_text())
        b = json.loads((plain / "runs" / run.name / "history.json").read_text())
        assert a["history"] == b["history"], run.name
        assert json.loads((cached / "runs" / run.name / "eval.json").read_text()) == json.loads(
            (plain / "runs" / run.name / "eval.json").read_text()
        )
        assert "teacher_cache" not in b
        if run.name.endswith("ce-only-s1"):
            assert "teacher_cache" not in a
            continue
        stats = a["teacher_cache"]
        assert stats["failed_checks"] == 0, run.name
        hits += stats["hit_rows"]
        checked += stats["checked_batches"]
    assert hits > 0 and checked > 0

    def numbers(results):  # everything but the time each run took
        return {name: {k: v for k, v in e.items() if k != "train_seconds"} for name, e in results["runs"].items()}

    assert numbers(with_cache) == numbers(without) and with_cache["claims"] == without["claims"]
