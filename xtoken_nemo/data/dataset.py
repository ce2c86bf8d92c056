"""Training-side datasets over a preprocessed directory (see :mod:`xtoken_nemo.data.preprocess`).

Windows (the Megatron way): the student documents (``[BOS] ids EOS``) are concatenated in stored
order into one stream; window ``i`` is stream tokens ``[i*L, i*L + L + 1)`` (``L`` =
``seq_length``), giving ``tokens = w[:-1]`` and ``labels = w[1:]``. A document longer than the
window simply continues in the next window(s); the last partial window is dropped. With
``shuffle=True`` the order of windows is a seeded permutation (documents keep their order).

Per teacher, for the same window:

- ``teacher{m}_chunks`` [K, 4] int64 rows ``(s_start, s_end, t_start, t_end)`` in **label
  coordinates** of each side: the chunk's student tokens are ``labels[s_start:s_end]`` and are
  predicted by student logits at positions ``s_start..s_end-1``; likewise the teacher's chunk
  tokens are ``teacher{m}_labels[t_start:t_end]``. Only matched chunks are returned (gap chunks,
  e.g. a BOS on one side, are left out: the loss needs none), and only chunks whose student
  tokens all lie inside the window's labels: **a chunk cut by the window edge is dropped**
  (at most one at each end; its tokens still get the CE loss).
- ``teacher{m}_tokens`` / ``teacher{m}_labels`` [T] the teacher's input and target ids: the
  teacher window starts at the teacher token aligned with the student's first input token (the
  teacher start of the chunk holding it) and ends with the last kept chunk, so both models see
  the same text as context. T varies per window (use :func:`collate_distill`); chunks beyond
  ``teacher_max_length`` teacher tokens are dropped too.
- a teacher with the student's tokenizer (``identity`` in the manifest) gets the student's own
  tokens, labels and the one-token chunks ``(i, i+1, i, i+1)``: plain token-level KD.

:class:`BlendedDistillDataset` mixes several such datasets by weight, deterministically, with an
index built in numpy (:func:`blending_indices`: seconds for 10^8 windows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xtoken_nemo.data.errors import DataError
from xtoken_nemo.data.integrity import check_preprocessed
from xtoken_nemo.data.preprocess import FORMAT, FORMAT_VERSION


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise DataError(
            f"{path} is not a preprocessed dataset (no manifest.json); run `xtoken preprocess --out {path} ...` "
            "first, or let an interrupted run finish (it resumes)"
        )
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{mf} has format {manifest.get('format')} v{manifest.get('version')}; this version reads "
            f"{FORMAT} v{FORMAT_VERSION}: preprocess the data again"
        )
    return manifest


def _teacher_key(teacher) -> tuple[str | None, str]:
    """(fingerprint or None, display name) of a tokenizer object, a fingerprint or a name."""
    if hasattr(teacher, "fingerprint"):
        return teacher.fingerprint, getattr(teacher, "name", str(teacher))
    text = str(teacher)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text, text[:12]
    return None, text


def select_teachers(manifest: dict, teachers, path) -> list[int]:
    """Manifest indices of the requested teachers (names, tokenizers or fingerprints), in order."""
    entries = manifest["teachers"]
    if teachers is None:
        return list(range(len(entries)))
    chosen = []
    for teacher in teachers:
        fp, name = _teacher_key(teacher)
        hits = [
            m
            for m, e in enumerate(entries)
            if (fp is not None and e["fingerprint"] == fp) or (fp is None and name in (e["tokenizer"], e["name"]))
        ]
        if not hits:
            have = ", ".join(f"{e['tokenizer']} ({e['fingerprint'][:12]})" for e in entries)
            raise DataError(
                f"teacher '{name}' is not in the preprocessed data at {path} (it has: {have}); preprocess again "
                "with this --teacher, or fix the teacher list of the training config"
            )
        unused = [m for m in hits if m not in chosen]
        chosen.append(unused[0] if unused else hits[0])
    return chosen


class DistillDataset(torch.utils.data.Dataset):
    """Fixed-length student windows with each teacher's ids and chunk pairs for the same text.

    path:        a directory written by ``xtoken preprocess``
    seq_length:  window length L (default: the manifest's)
    teachers:    which teachers, in which order (names, tokenizers or fingerprints); each must
                 be in the manifest. None: all, in manifest order.
    student:     optional student tokenizer (name/object/fingerprint) checked against the manifest
    """

    def __init__(
        self,
        path: str | Path,
        seq_length: int | None = None,
        teachers=None,
        student=None,
        shuffle: bool = False,
        seed: int = 1234,
        teacher_max_length: int | None = None,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_length = int(seq_length or self.manifest["seq_length"])
        if self.seq_length < 1:
            raise DataError(f"seq_length must be positive, got {self.seq_length}")
        if student is not None:
            fp, name = _teacher_key(student)
            entry = self.manifest["student"]
            if (fp is not None and fp != entry["fingerprint"]) or (
                fp is None and name not in (entry["tokenizer"], entry["name"])
            ):
                raise DataError(
                    f"student tokenizer '{name}' does not match the preprocessed data at {self.path} "
                    f"(made for {entry['tokenizer']}, {entry['fingerprint'][:12]}); preprocess again"
                )
        self.teacher_indices = select_teachers(self.manifest, teachers, self.path)
        self.teacher_entries = [self.manifest["teachers"][m] for m in self.teacher_indices]
        self.teacher_max_length = teacher_max_length

        # every .bin against its .idx and the manifest: a cut file fails here, in one line,
        # not at the first read of its tail deep in training
        check_preprocessed(self.path, self.manifest)
        self._student = IndexedDataset(str(self.path / self.manifest["student"]["prefix"]))
        s_len = self._student.sequence_lengths.astype(np.int64)
        self._s_cum = np.concatenate(([0], np.cumsum(s_len)))
        self._teachers = []
        for entry in self.teacher_entries:
            if entry["identity"]:
                self._teachers.append(None)
                continue
            ids = IndexedDataset(str(self.path / entry["prefix"]))
            chunks = IndexedDataset(str(self.path / entry["chunks_prefix"]))
            if len(ids) != len(self._student) or len(chunks) != len(self._student):
                raise DataError(
                    f"{self.path}: teacher '{entry['tokenizer']}' files do not match the student's document count; "
                    "preprocess again"
                )
            t_cum = np.concatenate(([0], np.cumsum(ids.sequence_lengths.astype(np.int64))))
            self._teachers.append((ids, chunks, t_cum))
        total = int(self._s_cum[-1])
        self._num_windows = max(0, (total - 1) // self.seq_length)
        self._order = np.random.default_rng(seed).permutation(self._num_windows) if shuffle else None

    # ----- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_windows

    @property
    def teacher_names(self) -> list[str]:
        return [e["tokenizer"] for e in self.teacher_entries]

    @property
    def signature(self) -> tuple:
        """What must agree between blended datasets: student and teachers by fingerprint."""
        return (
            self.manifest["student"]["fingerprint"],
            tuple(e["fingerprint"] for e in self.teacher_entries),
            self.seq_length,
        )

    # ----- reading --------------------------------------------------------------------------
    @staticmethod
    def _stream(ds, cum: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation of all documents of an IndexedDataset."""
        if stop <= start:
            return np.zeros(0, np.int64)
        d0 = int(np.searchsorted(cum, start, side="right") - 1)
        d1 = int(np.searchsorted(cum, stop - 1, side="right") - 1)
        parts = []
        for d in range(d0, d1 + 1):
            lo = max(start, int(cum[d])) - int(cum[d])
            hi = min(stop, int(cum[d + 1])) - int(cum[d])
            parts.append(ds.get(d, offset=lo, length=hi - lo))
        return np.concatenate(parts).astype(np.int64)

    def _teacher_view(self, m: int, w0: int) -> dict:
        ids_ds, chunks_ds, t_cum = self._teachers[m]
        L = self.seq_length
        w1 = w0 + L + 1  # stream end (exclusive) of the window's labels
        d0 = int(np.searchsorted(self._s_cum, w0, side="right") - 1)
        d1 = int(np.searchsorted(self._s_cum, w1 - 1, side="right") - 1)
        rows = []
        a = None
        for d in range(d0, d1 + 1):
            arr = chunks_ds[d]
            se = arr[0::2].astype(np.int64)
            te = arr[1::2].astype(np.int64)
            ss = np.concatenate(([0], se[:-1]))
            ts = np.concatenate(([0], te[:-1]))
            base_s, base_t = int(self._s_cum[d]), int(t_cum[d])
            lo_local, hi_local = w0 - base_s, w1 - base_s
            k0 = int(np.searchsorted(se, lo_local, side="right"))  # first chunk ending after w0
            k1 = int(np.searchsorted(ss, hi_local, side="left"))  # chunks starting before w1
            if a is None:
                if k0 < len(se):
                    a = base_t + int(ts[k0])  # teacher start of the chunk holding student token w0
                else:
                    a = base_t + int(te[-1]) if len(te) else base_t
            sel = slice(k0, k1)
            rows.append(np.stack([ss[sel] + base_s, se[sel] + base_s, ts[sel] + base_t, te[sel] + base_t], axis=1))
        c = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)
        keep = (c[:, 1] > c[:, 0]) & (c[:, 3] > c[:, 2])  # matched chunks only
        keep &= (c[:, 0] >= w0 + 1) & (c[:, 1] <= w1)  # whole chunk inside the window's labels
        keep &= c[:, 2] >= a + 1  # teacher tokens inside the teacher's labels
        if self.teacher_max_length is not None:
            keep &= c[:, 3] - (a + 1) <= self.teacher_max_length
        c = c[keep]
        b = int(c[-1, 3]) if len(c) else a + 1  # teacher stream end (exclusive) of its labels
        stream = self._stream(ids_ds, t_cum, a, b)
        rel = c - np.array([w0 + 1, w0 + 1, a + 1, a + 1], dtype=np.int64)
        return {
            "tokens": torch.from_numpy(stream[:-1].copy()),
            "labels": torch.from_numpy(stream[1:].copy()),
            "chunks": torch.from_numpy(rel),
        }

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self._num_windows:
            raise IndexError(f"window {idx} out of range for {self._num_windows} windows")
        window = int(self._order[idx]) if self._order is not None else int(idx)
        L = self.seq_length
        w0 = window * L
        seq = self._stream(self._student, self._s_cum, w0, w0 + L + 1)
        tokens = torch.from_numpy(seq[:-1].copy())
        labels = torch.from_numpy(seq[1:].copy())
        sample = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.ones(L, dtype=torch.float32),
            "position_ids": torch.arange(L, dtype=torch.int64),
        }
        for m, teacher in enumerate(self._teachers):
            if teacher is None:
                ar = torch.arange(L, dtype=torch.int64)
                view = {"tokens": tokens, "labels": labels, "chunks": torch.stack([ar, ar + 1, ar, ar + 1], dim=1)}
            else:
                view = self._teacher_view(m, w0)
            for key, value in view.items():
                sample[f"teacher{m}_{key}"] = value
        return sample


def _blend_key(k, w: float):
    """Sort key of dataset sample ``k`` (a number or a float64 array) for weight ``w``."""
    return (k + 0.5) / w


def _count_below(w: float, x: float) -> int:
    """Number of samples ``k >= 0`` whose key ``(k + 0.5) / w`` (as float64) is ``< x``."""
    k = max(0, int(np.floor(x * w - 0.5)) - 1)
    while _blend_key(np.float64(k), w) < x:
        k += 1
    while k > 0 and not _blend_key(np.float64(k - 1), w) < x:
        k -= 1
    return k


def blending_indices(weights, size: int, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset, and which of its samples, each of ``size`` blended samples is.

    weights: [n] non-negative (normalized here); returns ``dataset_index`` [size] int16 and
    ``dataset_sample_index`` [size] int64 (the k-th sample taken from a dataset has index k).

    The order is the Sainte-Lague/Webster divisor sequence: the k-th sample of dataset d has the
    key ``(k + 1/2) / w_d`` and samples are taken in key order, ties to the lower dataset index.
    After every prefix of t samples each dataset holds about ``w_d * t`` of them (measured with
    3-10 random weights: within 0.73-1.12 samples; the previous rule 0.69-0.91). It equals the
    previous rule (a Python loop: sample i to ``argmax(w * (i + 1) - counts)``,
    ``blending_indices_loop`` in bench/blend_index.py) for two datasets and for equal weights; with three or more
    unequal weights 7-35% of positions differ (a sequential greedy has no exact vectorized form:
    its choice depends on the step, not on each dataset's own count as a divisor rule does).
    Vectorized: each block of ``block`` key units (about ``block`` samples) is one stable argsort
    of n pre-sorted runs; memory beyond the outputs is O(block). Deterministic (IEEE float64 keys,
    stable sort), independent of ``block``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise DataError(
            f"blend weights must be a non-empty list of non-negative numbers, not all zero; got {list(np.ravel(w))}"
        )
    if len(w) > np.iinfo(np.int16).max:
        raise DataError(f"a blend of {len(w)} datasets is more than {np.iinfo(np.int16).max}: merge some directories")
    w = w / w.sum()
    size = int(size)
    d_index = np.empty(size, dtype=np.int16)
    s_index = np.empty(size, dtype=np.int64)
    active = [d for d in range(len(w)) if w[d] > 0]
    lo = dict.fromkeys(active, 0)
    pos, x = 0, 0.0
    while pos < size:
        x += float(block)  # whole numbers: exact in float64
        hi = {d: _count_below(float(w[d]), x) for d in active}
        ks = [np.arange(lo[d], hi[d], dtype=np.int64) for d in active]
        keys = np.concatenate([_blend_key(k.astype(np.float64), float(w[d])) for k, d in zip(ks, active)])
        order = np.argsort(keys, kind="stable")[: size - pos]  # ties: concatenation (dataset) order
        owner = np.concatenate([np.full(len(k), d, dtype=np.int16) for k, d in zip(ks, active)])
        m = len(order)
        d_index[pos : pos + m] = owner[order]
        s_index[pos : pos + m] = np.concatenate(ks)[order]
        pos += m
        lo = hi
    return d_index, s_index


class BlendedDistillDataset(torch.utils.data.Dataset):
    """Weighted blend of :class:`DistillDataset` s (e.g. the shards of NemotronClimbMix).

    The order is :func:`blending_indices` (each dataset stays within about one sample of its
    share at every prefix, like Megatron's ``build_blending_indices``); within a dataset samples
    are taken in order and wrap around (another epoch) when exhausted. ``size`` defaults
    to the number of samples that exhaust no dataset. Deterministic; all datasets must have the
    same student, teachers and seq_length.
    """

    def __init__(self, datasets: list[DistillDataset], weights: list[float], size: int | None = None) -> None:
        if not datasets or len(datasets) != len(weights):
            raise DataError(
                f"a blend needs one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights"
            )
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise DataError(f"blend weights must be non-negative and not all zero, got {list(weights)}")
        sig = datasets[0].signature
        for ds in datasets[1:]:
            if ds.signature != sig:
                raise DataError(
                    f"cannot blend {ds.path} with {datasets[0].path}: student/teacher tokenizers or seq_length differ"
                )
        for ds, weight in zip(datasets, w):
            if weight > 0 and len(ds) == 0:
                raise DataError(
                    f"dataset {ds.path} has no full window of {ds.seq_length + 1} tokens but weight {weight}"
                )
        self.datasets = datasets
        self.weights = w / w.sum()
        if size is None:
            size = int(min(len(ds) / wt for ds, wt in zip(datasets, self.weights) if wt > 0))
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        ds = self.datasets[d]
        sample = ds[int(self.dataset_sample_index[idx]) % len(ds)]
        sample["dataset_id"] = torch.tensor(d)
        return sample


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    if multiple < 1:
        raise DataError(f"teacher pad multiple must be >= 1, got {multiple}")
    return -(-max(length, 1) // multiple) * multiple


def collate_distill(samples: list[dict], teacher_pad_id: int = 0, teacher_pad_multiple: int = 1) -> dict:
    """Batch samples: student tensors stacked; teacher tokens/labels right-padded with
    ``teacher_pad_id`` to T = the longest window rounded up to a multiple of
    ``teacher_pad_multiple`` (few distinct shapes for the attention kernels and the caching
    allocator); chunks padded with -1 to [B, K, 4]. Chunks index real positions only, so the
    padding (causal attention: it never affects real positions) is out of every loss."""
    out: dict = {}
    keys = samples[0].keys()
    for key in keys:
        values = [s[key] for s in samples]
        if key.startswith("teacher") and key.endswith(("_tokens", "_labels")):
            T = max(v.shape[0] for v in values)
            if teacher_pad_multiple > 1:
                T = padded_length(T, teacher_pad_multiple)
            batch = torch.full((len(values), T), teacher_pad_id, dtype=values[0].dtype)
            for b, v in enumerate(values):
                batch[b, : v.shape[0]] = v
            out[key] = batch
        elif key.startswith("teacher") and key.endswith("_chunks"):
            K = max(v.shape[0] for v in values)
            batch = torch.full((len(values), K, 4), -1, dtype=torch.int64)
            for b, v in enumerate(values):
                batch[b, : v.shape[0]] = v
            out[key] = batch
        else:
            out[key] = torch.stack(values)
    return out
