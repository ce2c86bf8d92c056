"""The run's training data: preprocessed directories (blended), split into data-parallel
micro-batches in a fixed order, so that the position in the data is one number: the step.

Global step k uses windows ``[k*G, (k+1)*G)`` of the (shuffled, blended) dataset, wrapping
around at the end (one pass = len(dataset) windows); data-parallel rank r takes the r-th slice
of G/dp windows and cuts it into micro-batches. Resuming at step k is exact.
"""

from __future__ import annotations

import logging


from xtoken_nemo.distill.config import DistillConfig

log = logging.getLogger(__name__)


def build_dataset(cfg: DistillConfig, student_tok, teacher_toks: list):
    from xtoken_nemo.data.dataset import BlendedDistillDataset, DistillDataset

    datasets = [
        DistillDataset(path, seq_length=cfg.data.seq_length, teachers=teacher_toks, student=student_tok, shuffle=cfg.data.shuffle, seed=cfg.train.seed)
        for path in cfg.data.paths
    ]
    for path, ds in zip(cfg.data.paths, datasets):
        if len(ds) == 0:
            raise RuntimeError(f"{path} holds fewer tokens than one window of {cfg.data.seq_length}: add data or lower data.seq_length")
    if len(datasets) == 1:
        return datasets[0]
    weights = cfg.data.weights or [1.0] * len(datasets)
    size = max(len(d) for d in datasets) * len(datasets)
    return BlendedDistillDataset(datasets, weights, size=size)


class MicroBatches:
    """Micro-batches of one global step for this data-parallel rank."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.num_micro = self.per_rank // micro_batch

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch + self.dp_rank * self.per_rank
        return [(start + i) % len(self.dataset) for i in range(self.per_rank)]

    def for_step(self, step: int) -> list[dict]:
        from xtoken_nemo.data.dataset import collate_distill

        idx = self.indices(step)
        out = []
        for j in range(self.num_micro):
            samples = [self.dataset[i] for i in idx[j * self.micro_batch : (j + 1) * self.micro_batch]]
            # teacher padding lies beyond every chunk (masked out of the KD loss): any id serves
            out.append(collate_distill(samples, teacher_pad_id=0))
        return out
