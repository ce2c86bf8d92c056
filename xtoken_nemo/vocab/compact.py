"""W on compact vocabularies (:mod:`xtoken_nemo.tokenizers.compact`, the CPU demo).

A compact tokenizer keeps the full one's segmentation and surfaces, so W built on the full
tokenizers, restricted to the kept ids, is W of the compact ones: :func:`projection_support` says
which teacher ids the teacher's compact vocabulary must keep so that no kept student row loses
mass, and :func:`restrict_projection` renumbers W's rows and columns to the compact ids.
"""

from __future__ import annotations

import torch

from xtoken_nemo.errors import TokenizerError
from xtoken_nemo.tokenizers.compact import CompactTokenizer
from xtoken_nemo.vocab.projection import ProjectionMatrix


def restrict_projection(W: ProjectionMatrix, student: CompactTokenizer, teacher: CompactTokenizer) -> ProjectionMatrix:
    """W [V_S, V_T] built on the full tokenizers -> W [n_S, n_T] on the compact ones.

    Every teacher id a kept student row reaches must be kept (build the teacher's compact
    vocabulary with :func:`projection_support`), so no row loses mass."""
    W.check_tokenizers(student.base, teacher.base)
    rows = torch.tensor(student.kept_ids, dtype=torch.int64)
    indices, values = W.indices[rows].clone(), W.values[rows].clone()
    lookup = torch.full((teacher.base.vocab_size,), -1, dtype=torch.int64)
    lookup[torch.tensor(teacher.kept_ids, dtype=torch.int64)] = torch.arange(teacher.vocab_size)
    used = indices >= 0
    mapped = torch.where(used, lookup[indices.clamp(min=0)], indices)
    lost = used & (mapped < 0)
    if bool(lost.any()):
        r = int(lost.nonzero()[0, 0])
        t = int(indices[lost][0])
        raise TokenizerError(
            f"W row of student token {student.token_text(r)!r} reaches teacher id {t} "
            f"({teacher.base.token_text(t)!r}) outside the compact teacher vocabulary '{teacher.name}'; "
            "build it with projection_support()"
        )
    meta = dict(W.metadata)
    meta.update(
        student_name=student.name,
        student_fingerprint=student.fingerprint,
        teacher_name=teacher.name,
        teacher_fingerprint=teacher.fingerprint,
        restricted_from=f"{W.metadata.get('student_name', '?')} x {W.metadata.get('teacher_name', '?')}",
    )
    return ProjectionMatrix(mapped, values, teacher.vocab_size, meta)


def projection_support(W: ProjectionMatrix, student_base_ids: set[int]) -> set[int]:
    """Teacher ids that W's rows for ``student_base_ids`` reach."""
    rows = torch.tensor(sorted(student_base_ids), dtype=torch.int64)
    cols = W.indices[rows]
    return set(cols[cols >= 0].tolist())
