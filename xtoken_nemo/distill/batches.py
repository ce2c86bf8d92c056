"""The run's training data: preprocessed directories (blended), split into data-parallel
micro-batches in a fixed order, so that the position in the data is one number: the step.

Global step k uses windows ``[k*G, (k+1)*G)`` of the (shuffled, blended) dataset, wrapping
around at the end (one pass = len(dataset) windows); data-parallel rank r takes the r-th slice
of G/dp windows and cuts it into micro-batches. Resuming at step k is exact.

With ``data.num_workers > 0`` the windows are read (memory-mapped, shuffled: random reads) and
collated by the worker processes of a ``torch.utils.data.DataLoader``, as Megatron does, while
the training thread computes: a :class:`StepBatchSampler` hands out the micro-batches' window
indices from a given step on, so the loader starts at the resume step and never replays earlier
steps; step k yields the same micro-batches as the in-process path (``num_workers=0``).
"""

from __future__ import annotations

import itertools
import logging
from functools import partial

import torch

from xtoken_nemo.data.dataset import BlendedDistillDataset, DistillDataset, collate_distill
from xtoken_nemo.data.errors import DataError
from xtoken_nemo.distill.config import ConfigError, DistillConfig

log = logging.getLogger(__name__)


def build_dataset(cfg: DistillConfig, student_tok, teacher_toks: list):
    datasets = [
        DistillDataset(
            path,
            seq_length=cfg.data.seq_length,
            teachers=teacher_toks,
            student=student_tok,
            shuffle=cfg.data.shuffle,
            seed=cfg.train.seed,
        )
        for path in cfg.data.paths
    ]
    for path, ds in zip(cfg.data.paths, datasets):
        if len(ds) == 0:
            raise DataError(
                f"{path} holds fewer tokens than one window of {cfg.data.seq_length}: add data or lower data.seq_length"
            )
    if len(datasets) == 1:
        return datasets[0]
    weights = cfg.data.weights or [1.0] * len(datasets)
    size = max(len(d) for d in datasets) * len(datasets)
    return BlendedDistillDataset(datasets, weights, size=size)


class StepBatchSampler:
    """Window indices of this data-parallel rank's micro-batches, step after step, from
    ``start_step`` on (endless: the loop decides when training stops). A batch sampler for
    ``torch.utils.data.DataLoader``: each item is one micro-batch's list of dataset indices."""

    def __init__(self, batches: MicroBatches, start_step: int = 0) -> None:
        self.batches = batches
        self.start_step = start_step

    def __iter__(self):
        mb = self.batches.micro_batch
        for step in itertools.count(self.start_step):
            idx = self.batches.indices(step)
            for j in range(self.batches.num_micro):
                yield idx[j * mb : (j + 1) * mb]


def _resolve(value, default):
    return default if value is None else value


class MicroBatches:
    """Micro-batches of one global step for this data-parallel rank.

    num_workers:          0 reads in the calling process (no DataLoader); > 0 through a
                          DataLoader with this many persistent worker processes
    prefetch_factor:      micro-batches each worker keeps ready (num_workers > 0)
    pin_memory:           page-locked batches (CUDA), so the host-to-device copies can be async
    teacher_pad_multiple: teacher tokens/labels padded to a multiple of this (see collate_distill)

    ``for_step(step)`` (a list) and ``iterator(step)`` (lazy, for the forward-backward schedule,
    which takes ``num_micro`` items) give the same micro-batches for the same step whatever was
    asked before; asking for the step after the previous one continues the prefetching loader,
    any other step restarts it there (a resume: the workers stay, nothing is replayed).
    """

    def __init__(
        self,
        dataset,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        teacher_pad_multiple: int = 1,
    ):
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.num_micro = self.per_rank // micro_batch
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (0: read in the training process)")
        if prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor={prefetch_factor} must be >= 1")
        if teacher_pad_multiple < 1:
            raise ConfigError(f"data.teacher_pad_multiple={teacher_pad_multiple} must be >= 1 (1: no padding)")
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory, self.teacher_pad_multiple = pin_memory, teacher_pad_multiple
        self._loader = None
        self._sampler = None
        self._it = None
        self._next_step = None  # the step the running loader iterator yields next

    @classmethod
    def from_config(cls, cfg: DistillConfig, dataset, dp_rank: int, dp_size: int) -> MicroBatches:
        """From ``cfg.train`` (batch sizes) and ``cfg.data`` (loader, padding); ``None`` fields
        resolve by device: 2 workers, pinned memory and teacher padding to 128 on CUDA; in-process
        and unpadded on CPU."""
        on_cuda = torch.cuda.is_available()
        d = cfg.data
        return cls(
            dataset,
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            dp_rank,
            dp_size,
            num_workers=_resolve(d.num_workers, 2 if on_cuda else 0),
            prefetch_factor=d.prefetch_factor,
            pin_memory=_resolve(d.pin_memory, on_cuda),
            teacher_pad_multiple=_resolve(d.teacher_pad_multiple, 128 if on_cuda else 1),
        )

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch + self.dp_rank * self.per_rank
        return [(start + i) % len(self.dataset) for i in range(self.per_rank)]

    def _collate(self):
        # teacher padding lies beyond every chunk (masked out of the KD loss): any id serves
        return partial(collate_distill, teacher_pad_id=0, teacher_pad_multiple=self.teacher_pad_multiple)

    # ----- in-process (num_workers=0) ----------------------------------------------------------
    def _read_step(self, step: int) -> list[dict]:
        collate = self._collate()
        idx = self.indices(step)
        out = []
        for j in range(self.num_micro):
            samples = [self.dataset[i] for i in idx[j * self.micro_batch : (j + 1) * self.micro_batch]]
            out.append(collate(samples))
        return out

    # ----- DataLoader (num_workers>0) ----------------------------------------------------------
    def _start(self, step: int) -> None:
        if self._loader is None:
            self._sampler = StepBatchSampler(self, step)
            self._loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._sampler,
                num_workers=self.num_workers,
                collate_fn=self._collate(),
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=True,
            )
        else:
            log.info("data loader restarts at step %d (was at %s)", step, self._next_step)
        self._sampler.start_step = step
        # persistent workers: a second iter() drops what was prefetched and reuses the processes
        self._it = iter(self._loader)
        self._next_step = step

    def _loader_step(self, step: int):
        if self._it is None or self._next_step != step:
            self._start(step)
        self._next_step = None  # until this step's micro-batches are all taken
        for j in range(self.num_micro):
            batch = next(self._it)
            if j == self.num_micro - 1:
                self._next_step = step + 1
            yield batch

    # ----- public ----------------------------------------------------------------------------
    def iterator(self, step: int):
        """Iterator over step ``step``'s ``num_micro`` micro-batches (lazy with workers: the
        first forward starts before the last micro-batch of the step is read)."""
        if self.num_workers == 0:
            return iter(self._read_step(step))
        return self._loader_step(step)

    def for_step(self, step: int) -> list[dict]:
        return list(self.iterator(step))

    def close(self) -> None:
        """Stop the worker processes (also done when this object is garbage collected)."""
        it, self._it, self._loader, self._next_step = self._it, None, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
