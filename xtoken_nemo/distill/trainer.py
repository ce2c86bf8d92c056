"""The training loop: student + frozen teachers on megatron-core, resumable and preemptible.

One process (CPU, or one GPU: the debug mode) or ``torchrun --nproc-per-node N`` (TP x DP).
Per global step: ``num_micro`` micro-batches through megatron-core's forward-backward schedule
(gradient accumulation), then the megatron optimizer step (AdamW, clipping) and the
warmup+cosine schedule. Checkpoints every ``checkpoint.save_interval`` steps, at the end, and on
SIGTERM/SIGUSR1 (SLURM preemption); a run restarted on the same directory resumes exactly.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.profiler import record_function

from xtoken_nemo.compat.cuda_redirect import cuda_to_cpu, outside_cuda_redirect
from xtoken_nemo.distill import kd, model_setup  # called through the module: tests wrap these functions
from xtoken_nemo.distill.batches import MicroBatches, build_dataset
from xtoken_nemo.distill.config import DistillConfig
from xtoken_nemo.distill.kd import KDOptions
from xtoken_nemo.distill.preemption import PreemptionFlag
from xtoken_nemo.distill.progress import ProgressLog
from xtoken_nemo.distill.run_checkpoints import finalize_pending_save, resume_latest, save_checkpoint
from xtoken_nemo.distill.teacher_cache import TeacherLogitsCache, teacher_key
from xtoken_nemo.distill.teacher_loss import build_teacher_spec, check_teacher_tokenizer
from xtoken_nemo.errors import XTokenError
from xtoken_nemo.losses import adaptive_alphas_host, uld_hist
from xtoken_nemo.losses.checks import nonfinite_checks_deferred
from xtoken_nemo.losses.hybrid import uld_by_histogram
from xtoken_nemo.models.build import causal_mask
from xtoken_nemo.models.checkpoint import write_metadata
from xtoken_nemo.models.config import DEFAULT_VOCAB_DIVISOR
from xtoken_nemo.models.runtime import collective_device, ensure_model_parallel, install_shims
from xtoken_nemo.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

#: |L_KD| at or below this drops the KD term (as :func:`xtoken_nemo.losses.weighting.dynamic_kd_scale`)
DYNAMIC_MIN_KD = 1e-12


class TrainingError(XTokenError):
    """The run cannot continue (too many non-finite steps, inconsistent resume, ...)."""


@dataclass
class RunState:
    """What a checkpoint stores besides weights and optimizer: exact-resume bookkeeping."""

    step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    scheduler: dict = field(default_factory=dict)
    # train.kd_scale_source="previous_step": the last completed step's global-batch statistics,
    # applied by the next step (None: no step yet; that step uses its micro-batches' own)
    kd_scale: float | None = None  # sum L_CE / sum |L_KD| over the step's micro-batches and DP ranks
    alphas: list[float] | None = None  # softmax over teachers of the step's mean confidences / temperature


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------
def process_group_options(timeout_minutes: float, cuda: bool, local_rank: int) -> dict:
    """Keyword arguments of ``init_process_group`` for a torchrun worker.

    An explicit timeout: a rank that died or hangs fails the others after ``timeout_minutes``
    instead of torch's default (10 min NCCL, 30 min gloo). ``device_id`` binds the NCCL
    communicator to this rank's GPU at start-up (eager init: a bad GPU or NCCL set-up fails here,
    not in the first collective, and no rank guesses its device from the current one).
    """
    options = {"backend": "nccl" if cuda else "gloo", "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if cuda:
        options["device_id"] = torch.device("cuda", local_rank)
    return options


def init_distributed(tp: int, seed: int, timeout_minutes: float = 30.0) -> bool:
    """torch.distributed from torchrun's environment (or a one-process group) + parallel_state.

    Returns True when this call created the process group (the caller then destroys it).
    """
    install_shims()
    created = not torch.distributed.is_initialized()
    if created and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(**process_group_options(timeout_minutes, cuda, local_rank))
    ensure_model_parallel(tp, seed, timeout_minutes)
    return created


def destroy_distributed() -> None:
    """Tear down parallel_state and the process group (NCCL warns about leaked communicators and
    may hang at interpreter exit otherwise)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _params_dtype(cfg: DistillConfig) -> torch.dtype:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
class Trainer:
    """``progress``: a tqdm bar on rank 0 when stderr is a terminal (progress lines in the log
    otherwise). ``preemption``: a flag installed by the caller before the heavy imports (``xtoken
    train`` does); without one the trainer installs its own first thing, before building models.
    ``teacher_cache``: a :class:`~xtoken_nemo.distill.teacher_cache.TeacherLogitsCache` shared by the
    runs of one process (the CPU demo), so the frozen teachers' forward is paid once per sequence;
    None (``xtoken train``): the teachers run on every batch."""

    def __init__(
        self,
        cfg: DistillConfig,
        progress: bool = True,
        preemption: PreemptionFlag | None = None,
        teacher_cache: TeacherLogitsCache | None = None,
    ) -> None:
        # first thing: a signal that arrives while the models load is remembered, not lost
        self.preemption = preemption if preemption is not None else PreemptionFlag()
        self._owns_preemption = not self.preemption.installed
        if self._owns_preemption:
            self.preemption.install()
        from megatron.core import parallel_state

        self.cfg = cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world)
        self.owns_process_group = init_distributed(
            cfg.train.tensor_parallel, cfg.train.seed, cfg.train.dist_timeout_minutes
        )
        self.rank = torch.distributed.get_rank()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.progress = progress and self.rank == 0
        self.dtype = _params_dtype(cfg)
        self.teacher_cache = teacher_cache
        self._build()

    # ..........................................................................................
    def _build(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        self.kd_options = KDOptions.from_config(cfg.train)
        self.student_tok = load_tokenizer(cfg.student.tokenizer)
        self.teacher_toks = [load_tokenizer(t.model.tokenizer) for t in cfg.teachers]
        for tc, tok in zip(cfg.teachers, self.teacher_toks):
            check_teacher_tokenizer(tc, self.student_tok, tok)  # before any model loads

        kernels = cfg.parallel.kernel_options()  # resolved per model against this machine (one log line)
        student, self.student_arch, s_padded = model_setup.build_model(
            cfg.student, self.student_tok.vocab_size, self.tp, self.dtype, trainable=True, kernels=kernels
        )
        self.student_vocab = self.student_tok.vocab_size
        self.student_padded = s_padded
        self.teachers, self.teacher_specs, self.teacher_archs = [], [], []
        self.teacher_keys, self._teacher_cache_checked = [], set()  # teacher_cache only
        for tc, tok in zip(cfg.teachers, self.teacher_toks):
            model, arch, t_padded = model_setup.build_model(
                tc.model, tok.vocab_size, self.tp, self.dtype, trainable=False, kernels=kernels
            )
            spec = build_teacher_spec(tc, self.student_tok, tok, s_padded // self.tp, t_padded // self.tp)
            self.teachers.append(model)
            self.teacher_specs.append(spec)
            self.teacher_archs.append(arch)
            if self.teacher_cache is not None:
                device = next(model.parameters()).device
                self.teacher_keys.append(
                    teacher_key(tc.model, t_padded, self.tp_rank, self.tp, self.dtype, device, cfg.parallel)
                )

        use_dist_opt = cfg.optim.use_distributed_optimizer and _distributed_optimizer_works()
        ddp_options, ddp_off = cfg.parallel.ddp_options(self.dp_size, use_dist_opt)
        if ddp_off and self.rank == 0:
            _log_once(
                logging.INFO, "communication options turned off: " + "; ".join(f"{k}: {v}" for k, v in ddp_off.items())
            )
        with cuda_to_cpu():
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt, **ddp_options
            )
            self.model = DistributedDataParallel(student.config, ddp_config, student)
            opt_config = OptimizerConfig(
                optimizer="adam",
                lr=cfg.optim.lr,
                min_lr=cfg.optim.min_lr,
                weight_decay=cfg.optim.weight_decay,
                adam_beta1=cfg.optim.adam_beta1,
                adam_beta2=cfg.optim.adam_beta2,
                adam_eps=cfg.optim.adam_eps,
                clip_grad=cfg.optim.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=use_dist_opt,
                overlap_param_gather=ddp_config.overlap_param_gather,
            )
            self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        _hook_grad_sync_into_schedule(student, self.model, ddp_config)
        self.student = student
        steps = cfg.train.train_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            lr_warmup_steps=int(round(cfg.optim.warmup_fraction * steps)),
            lr_decay_steps=steps,
            lr_decay_style="cosine",
            start_wd=cfg.optim.weight_decay,
            end_wd=cfg.optim.weight_decay,
            wd_incr_steps=steps,
            wd_incr_style="constant",
        )
        self.dataset = build_dataset(cfg, self.student_tok, self.teacher_toks)
        self.batches = MicroBatches.from_config(cfg, self.dataset, self.dp_rank, self.dp_size)
        if student.config.sequence_parallel:
            # the embedding output is scattered along the sequence over the TP ranks
            for what, length in (
                ("data.seq_length", cfg.data.seq_length),
                ("data.teacher_pad_multiple", self.batches.teacher_pad_multiple),
            ):
                if length % self.tp:
                    raise TrainingError(
                        f"sequence parallelism at TP={self.tp} needs sequence lengths divisible by {self.tp}: "
                        f"{what}={length}; change it or set parallel.sequence_parallel=false"
                    )
        self.state = RunState()
        self._step_kd_scale, self._step_alphas = None, None  # set by train_step
        # the histogram ULD's contested-entry share (None: exact size, one host read per block);
        # doubled when a step overflows it, for the rest of the run (uld_hist.contested_buffer)
        self.uld_share = uld_hist.CONTESTED_SHARE
        self._uld_can_overflow = self.uld_share is not None and any(
            spec.common is not None  # H-KL, GOLD, ULD: the hybrid losses
            and uld_by_histogram(spec.config.uld_method, spec.config.uld_topk)
            for spec in self.teacher_specs
        )

    # ..........................................................................................
    def _forward_step(self, data_iterator, model):
        # the model forward and the losses are device-agnostic: outside the CPU runs' CUDA->CPU
        # redirect, whose Python hook would otherwise see every op of the step (no-op on CUDA)
        with outside_cuda_redirect():
            return self._forward_and_loss(next(data_iterator), model)

    def _forward_and_loss(self, batch: dict, model):
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        B, S = tokens.shape
        device = next(self.student.parameters()).device
        position_ids = torch.arange(S, device=device)[None].expand(B, S)
        with record_function("xtoken/student_forward"):
            student_logits = model(tokens.to(device), position_ids, causal_mask(B, S, device))
        teacher_outputs = []
        with torch.no_grad():
            for m, (teacher, spec) in enumerate(zip(self.teachers, self.teacher_specs)):
                t_tokens = batch[f"teacher{m}_tokens"]
                with record_function(f"xtoken/teacher_forward/{spec.config.name}"):
                    forward = partial(_teacher_forward, teacher, device=device)
                    if self.teacher_cache is None:
                        t_logits = forward(t_tokens)
                    else:
                        check = m not in self._teacher_cache_checked
                        before = self.teacher_cache.stats.checked_batches
                        t_logits = self.teacher_cache.logits(self.teacher_keys[m], t_tokens, forward, check=check)
                        if self.teacher_cache.stats.checked_batches > before:
                            self._teacher_cache_checked.add(m)
                # bf16 on GPU as they come: the losses accumulate in fp32 block by block
                # (logits, labels on the device, host chunk table, host labels: jkl reads the
                # realised pieces on the host without waiting for the device)
                t_labels = batch[f"teacher{m}_labels"]
                teacher_outputs.append((t_logits, t_labels.to(device), batch[f"teacher{m}_chunks"], t_labels))
        t = self.cfg.train
        # NaN/inf is not raised here (one rank raising while the others wait in a collective would
        # hang the job): it is flagged, and train_step skips the step on every rank at once
        with nonfinite_checks_deferred(), uld_hist.contested_buffer(self.uld_share) as contested:
            losses = kd.distillation_loss(
                student_logits,
                labels.to(device),
                loss_mask.to(device),
                self.student_vocab,
                self.teacher_specs,
                teacher_outputs,
                self.kd_options,
                kd_scale=self._step_kd_scale,
                alphas=self._step_alphas,
            )
        # a sum is finite iff every entry is: one pass per tensor, no [tokens, V] boolean temporaries
        finite = torch.isfinite(losses.total.detach())
        for logits in [student_logits] + [o[0] for o in teacher_outputs]:
            finite = finite & torch.isfinite(torch.sum(logits.detach(), dtype=torch.float32))
        # metrics stay device tensors (train_step reduces them once per global step); copies,
        # because megatron's schedule divides the returned loss by num_microbatches in place
        metrics = {
            "ce": losses.ce.detach().clone(),
            "total": losses.total.detach().clone(),
            "nonfinite": (~finite).float(),
        }
        if self._uld_can_overflow:  # internal: contested entries that did not fit (train_step recomputes)
            none = losses.ce.detach().new_zeros((), dtype=torch.float32)
            metrics["_uld_overflow"] = none if contested.overflow is None else contested.overflow.float()
        if losses.kd is not None:
            metrics["kd"] = losses.kd.detach()
            metrics["kd_scale"] = losses.kd_scale.detach()  # the factor applied
            metrics["_kd_abs"] = losses.kd_abs  # internal: the step's global ratio (not logged)
            if t.alpha_mode != "static":  # internal: the step's mean confidences (next step's alphas)
                for name in (spec.config.name for spec in self.teacher_specs):
                    present = name in losses.confidences
                    zero = losses.ce.detach().new_zeros((), dtype=torch.float32)
                    metrics[f"_conf/{name}"] = losses.confidences[name] if present else zero
                    metrics[f"_conf_n/{name}"] = zero + (1.0 if present else 0.0)
            for name, value in losses.per_teacher.items():
                metrics[f"kd/{name}"] = value.detach()  # the part that trains (in kd and kd_scale)
            for name, value in losses.per_teacher_const.items():
                metrics[f"kd_const/{name}"] = value  # gradient-free constant, reported only
            for name, value in losses.per_teacher_uncovered.items():
                metrics[f"kd_uncovered/{name}"] = value  # teacher mass the student cannot reach
            for name, value in losses.per_teacher_paper.items():
                metrics[f"kd_paper/{name}"] = value  # NVIDIA's P-KL value (train.kd_scale_value="paper")
            for name, value in losses.alphas.items():
                metrics[f"alpha/{name}"] = value
        return losses.total, partial(self._loss_func, metrics)

    def _reduce_step_metrics(self, outputs: list[dict], flags: dict[str, bool]) -> tuple[dict, dict]:
        """Per-micro-batch metric tensors -> step metrics (mean over micro-batches and data-parallel
        ranks) and global flags (true on any rank), in ONE all-reduce and ONE device-to-host copy
        per global step. Every rank has the same keys (same config), so the vectors line up.

        Returns (metrics as floats, flags as bools); ``flags`` holds host-side local flags
        (preemption) and gets the micro-batches' ``nonfinite`` added.
        """
        keys = sorted({k for o in outputs for k in o} - {"nonfinite"})
        device = collective_device()
        means = [torch.stack([o[k].float().reshape(()).to(device) for o in outputs]).mean() for k in keys]
        nonfinite = torch.stack([o["nonfinite"].reshape(()).to(device) for o in outputs]).amax()
        host_flags = torch.tensor([1.0 if flags[k] else 0.0 for k in sorted(flags)], device=device)
        vector = torch.cat(
            [torch.stack(means) if means else torch.zeros(0, device=device), nonfinite.reshape(1), host_flags]
        )
        world = 1
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(vector)  # sum: TP ranks hold equal values, DP ranks differ
            world = torch.distributed.get_world_size()
        values = vector.tolist()  # the step's one device-to-host synchronization
        metrics = {k: v / world for k, v in zip(keys, values)}
        reduced_flags = {"nonfinite": values[len(keys)] > 0}
        reduced_flags.update({k: v > 0 for k, v in zip(sorted(flags), values[len(keys) + 1 :])})
        return metrics, reduced_flags

    # ..........................................................................................
    # the dynamic KD/CE scale and adaptive alphas from the previous step's global batch
    def _batch_stats_for_step(self, num_micro: int) -> tuple[float | None, list[float] | None]:
        """(kd_scale, alphas) this step applies on every micro-batch, or None for "each
        micro-batch's own" (``train.kd_scale_source="micro_batch"``, the first step, or a step of
        one micro-batch in all: its own ratio is then the global one). Host floats kept in
        :class:`RunState`, so every rank applies the same values and a resumed run the same as
        an uninterrupted one."""
        t = self.cfg.train
        if t.kd_scale_source != "previous_step" or num_micro * self.dp_size == 1:
            return None, None
        kd_scale = self.state.kd_scale if t.kd_scaling == "dynamic" else None
        alphas = self.state.alphas if t.alpha_mode != "static" else None
        return kd_scale, alphas

    def _update_batch_stats(self, metrics: dict, update: bool) -> None:
        """Pop the internal keys of the reduced metrics; store the step's global ratio
        ``mean L_CE / mean |L_KD|`` (every rank has the same micro-batch count, so this is sum /
        sum over the global batch) and the softmax of its mean confidences in the run state; log
        the ratio as ``kd_ratio`` (what the next step applies). Host arithmetic only."""
        kd_abs = metrics.pop("_kd_abs", None)
        conf = {k.split("/", 1)[1]: metrics.pop(k) for k in [k for k in metrics if k.startswith("_conf/")]}
        counts = {k.split("/", 1)[1]: metrics.pop(k) for k in [k for k in metrics if k.startswith("_conf_n/")]}
        if kd_abs is None:
            return
        ratio = metrics["ce"] / kd_abs if kd_abs > DYNAMIC_MIN_KD else 0.0  # as dynamic_kd_scale
        metrics["kd_ratio"] = ratio
        if not update or not math.isfinite(ratio):
            return
        if self.cfg.train.kd_scaling == "dynamic":
            self.state.kd_scale = ratio
        names = [spec.config.name for spec in self.teacher_specs]
        if conf and all(counts.get(n, 0.0) > 0 for n in names):
            means = [conf[n] / counts[n] for n in names]
            # host floats (no device sync); None if not finite: keep the previous alphas
            alphas = adaptive_alphas_host(means, self.cfg.train.alpha_temperature)
            if alphas is not None:
                self.state.alphas = alphas

    @staticmethod
    def _loss_func(metrics: dict, output_tensor: torch.Tensor):
        return output_tensor, metrics

    # ..........................................................................................
    def train_step(self, step: int) -> dict:
        """One global step; returns averaged metrics (ce, kd, total, grad_norm, lr, ...) and
        ``preempted`` (a signal reached some rank before this step's reduction). A step whose
        histogram ULD overflowed its contested-entry buffer is recomputed on the same
        micro-batches with a doubled share (:meth:`_grow_uld_share`), not skipped."""
        num_micro = self.batches.num_micro
        S = self.cfg.data.seq_length
        self._step_kd_scale, self._step_alphas = self._batch_stats_for_step(num_micro)
        lr = self.optimizer.param_groups[0]["lr"]  # the scheduler set it for this step
        with cuda_to_cpu():
            # lazy with data workers: the first forward does not wait for the step's last read
            data = self.batches.iterator(step)
            kept: list[dict] = []  # the step's micro-batches, for a recompute after a ULD overflow
            if self._uld_can_overflow:
                data = _keeping(data, kept)
            metrics, flags = self._forward_backward(data, num_micro, S)
            # every rank takes the same branch: the flags and the overflow are global
            while (overflow := metrics.pop("_uld_overflow", 0.0)) > 0:
                # NaN went into the loss and the gradients: not a non-finite step, a buffer too small
                self._grow_uld_share(step, overflow * num_micro * self.dp_size)
                metrics, flags = self._forward_backward(iter(kept), num_micro, S)
            if flags["nonfinite"]:
                self.state.consecutive_nonfinite += 1
                self.state.skipped_steps += 1
                metrics.update(skipped=1.0, grad_norm=float("nan"))
                self.model.zero_grad_buffer()  # NaN gradients never reach the optimizer
                self.optimizer.zero_grad()
                log.warning(
                    "step %d: NaN/inf in the logits or the loss on some rank; "
                    "step skipped on every rank (%d in a row, %d in all)",
                    step + 1,
                    self.state.consecutive_nonfinite,
                    self.state.skipped_steps,
                )
                if self.state.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite:
                    raise TrainingError(
                        f"{self.state.consecutive_nonfinite} steps in a row had NaN/inf logits or loss "
                        f"(last at step {step + 1}); "
                        "stopping. Lower optim.lr, check the data and the teacher checkpoints, or raise "
                        "train.max_consecutive_nonfinite"
                    )
            else:
                # gradients were reduced by finalize_model_grads inside the schedule (every rank,
                # every step, skipped or not: the collectives never depend on the values)
                with record_function("xtoken/optimizer_step"):
                    ok, grad_norm, _ = self.optimizer.step()
                if not ok:
                    raise TrainingError(f"optimizer step {step + 1} failed (grad norm {grad_norm})")
                self.state.consecutive_nonfinite = 0
                metrics.update(skipped=0.0, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
            # after a skipped (non-finite) step the last finite step's statistics stay
            self._update_batch_stats(metrics, update=not flags["nonfinite"])
        self.scheduler.step(increment=1)
        metrics["lr"] = lr
        metrics["preempted"] = float(flags["preempted"])
        return metrics

    def _forward_backward(self, data, num_micro: int, seq_length: int) -> tuple[dict, dict]:
        """Zeroed gradients, then megatron's forward-backward schedule over ``num_micro``
        micro-batches from ``data``; the reduced metrics and flags (:meth:`_reduce_step_metrics`)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data,
            model=[self.model],
            num_microbatches=num_micro,
            seq_length=seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=False,
        )
        return self._reduce_step_metrics(outputs, {"preempted": self.preemption.raised})

    def _grow_uld_share(self, step: int, entries: float) -> None:
        """Double the ULD contested-entry share after an overflow of ``entries`` (over the global
        batch); at 1 every entry fits, so the recomputes of a step end."""
        if self.uld_share >= 1.0:
            raise TrainingError(f"step {step + 1}: ULD's contested-entry buffer overflowed at share 1")
        self.uld_share = uld_hist.grown_share(self.uld_share)
        if self.rank == 0:
            log.warning(
                "step %d: ULD's contested-entry buffer overflowed (%d entries); share raised to %g, step recomputed",
                step + 1,
                round(entries),
                self.uld_share,
            )

    # ..........................................................................................
    def resume(self) -> bool:
        """Load the newest checkpoint that loads (an unreadable latest one falls back to the one
        before it unless ``checkpoint.fallback_on_corrupt`` is off)."""
        ckpt = self.cfg.checkpoint
        if not ckpt.resume:
            return False
        found = resume_latest(
            ckpt.dir, self.student, self.optimizer, fallback=ckpt.fallback_on_corrupt, parallel=ckpt.fully_parallel
        )
        if found is None:
            return False
        _, run_state = found
        self.state = RunState(**run_state)
        self.scheduler.load_state_dict(self.state.scheduler)
        if self.rank == 0:
            log.warning("resumed from %s at step %d", ckpt.dir, self.state.step)
        return True

    def save(self, final: bool = False) -> Path:
        """Checkpoint the current step (``final``: the last save of this process, never async:
        the job is about to end or be requeued)."""
        ckpt = self.cfg.checkpoint
        self.state.scheduler = self.scheduler.state_dict()
        return save_checkpoint(
            ckpt.dir,
            self.state.step,
            self.student,
            self.optimizer,
            self.state.__dict__.copy(),
            write_extra=self._write_model_record,
            parallel=ckpt.fully_parallel,
            async_save=ckpt.async_save and not final,
            keep_last=ckpt.keep_last,
        )

    def _write_model_record(self, directory: Path) -> None:
        """The student's architecture record (xtoken_model.json) and the run config, so that the
        checkpoint directory loads with `xtoken score` / `xtoken export`."""
        write_metadata(
            directory,
            self.student_arch,
            self.student_padded,
            DEFAULT_VOCAB_DIVISOR,
            self.tp,
            self.dtype,
            source=f"xtoken train {self.cfg.name} step {self.state.step}",
        )
        (directory / "run_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def run(self) -> dict:
        """Train to ``train.train_steps``; returns a summary (losses per step, status)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.resume()
        writer = _tensorboard(cfg.log_dir) if self.rank == 0 else None
        history, status = [], "completed"
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        progress_log = ProgressLog(cfg.train.train_steps, tokens_per_step, [tc.name for tc in cfg.teachers])
        # a bar only on a terminal: in a job's output file it is a stream of redraws
        show_bar = self.progress and sys.stderr.isatty()
        bar = tqdm(
            total=cfg.train.train_steps,
            initial=self.state.step,
            desc=cfg.name,
            unit="step",
            disable=not show_bar,
            dynamic_ncols=True,
        )
        if self.rank == 0:
            log.info(
                "training %s: step %d -> %d, %s tokens per step, [tp, dp] = [%d, %d]",
                cfg.name,
                self.state.step,
                cfg.train.train_steps,
                f"{tokens_per_step:,}",
                self.tp,
                self.dp_size,
            )
        try:
            while self.state.step < cfg.train.train_steps:
                started = time.perf_counter()
                metrics = self.train_step(self.state.step)
                self.state.step += 1
                metrics["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
                metrics["memory_gb"] = _memory_gb()
                metrics["step"] = self.state.step
                preempted = metrics.pop("preempted") > 0
                history.append(metrics)
                progress_log.step_done()
                if self.rank == 0:
                    _log_metrics(writer, metrics, self.state.step)
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("total", "ce", "kd", "lr") if k in metrics})
                    if self.state.step % cfg.train.log_interval == 0 or self.state.step == cfg.train.train_steps:
                        line = progress_log.line(metrics, self.state.step)
                        # with a bar on screen the line would only scroll it away
                        log.log(logging.DEBUG if show_bar else logging.INFO, "%s", line)
                bar.update(1)
                last = preempted or self.state.step == cfg.train.train_steps
                if last or self.state.step % cfg.checkpoint.save_interval == 0:
                    self.save(final=last)
                elif cfg.checkpoint.async_save:
                    finalize_pending_save(blocking=False)  # publish an async save whose writers are done
                if preempted:
                    status = "preempted"
                    break
            finalize_pending_save(blocking=True)
        finally:
            bar.close()
            self.batches.close()
            if self._owns_preemption:
                self.preemption.uninstall()
            if writer is not None:
                writer.close()
        if self.rank == 0 and status == "preempted":
            log.warning("preempted at step %d: checkpoint saved; restart the same command to resume", self.state.step)
        return {
            "status": status,
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "history": history,
        }

    def close(self) -> None:
        """Restore the signal handlers it installed, stop the data workers and destroy the process
        group if this trainer created it (``xtoken train`` calls this at exit)."""
        if self._owns_preemption:
            self.preemption.uninstall()
        self.batches.close()
        if self.owns_process_group:
            destroy_distributed()


def _keeping(data, kept: list):
    """The items of ``data``, each appended to ``kept`` as it is taken (so a step can be replayed)."""
    for item in data:
        kept.append(item)
        yield item


def _teacher_forward(teacher, tokens: torch.Tensor, device) -> torch.Tensor:
    """A frozen teacher's logits [B, T, V_T_pad/tp] for tokens [B, T] (under the caller's no_grad)."""
    tokens = tokens.to(device)
    B, T = tokens.shape
    return teacher(tokens, torch.arange(T, device=device)[None].expand(B, T), causal_mask(B, T, device))


def _hook_grad_sync_into_schedule(student, ddp_model, ddp_config) -> None:
    """Wire the DDP wrapper into megatron's schedule the way Megatron-LM's training.py does.

    - ``no_sync_func`` (with ``overlap_grad_reduce``): all micro-batches but the last accumulate
      without communication; in the last backward each bucket's reduce(-scatter) starts as soon
      as its gradients are complete, overlapping the rest of the backward;
    - ``finalize_model_grads_func``: after the last backward, on every rank, wait for those
      collectives (or run them, without overlap), then all-reduce over TP the gradients of
      weights replicated across TP ranks but computed on a part of the data: the norms under
      sequence parallelism and the per-head q/k norms (Qwen3 QK-norm at TP > 1);
    - with ``overlap_param_gather`` the optimizer step leaves the parameter all-gather to the next
      forward's pre-hooks, so the model weights are current on every rank only after that
      forward: a checkpoint's model state forces the all-gather first (Megatron-LM's
      ``force_param_sync`` before a save).
    """
    from megatron.core.distributed import finalize_model_grads

    config = student.config
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = ddp_model.no_sync
        config.grad_sync_func = ddp_model.start_grad_sync  # pipeline schedules only; set as Megatron-LM does

    def finalize_model_grads_in_range(*args, **kwargs):
        with record_function("xtoken/grad_sync"):  # a profiler range (bench/gpu_check_paper.py)
            return finalize_model_grads(*args, **kwargs)

    config.finalize_model_grads_func = finalize_model_grads_in_range
    if ddp_config.overlap_param_gather:
        sharded_state_dict = student.sharded_state_dict

        def synced_sharded_state_dict(*args, **kwargs):
            ddp_model.start_param_sync(force_sync=True)
            return sharded_state_dict(*args, **kwargs)

        student.sharded_state_dict = synced_sharded_state_dict


_LOGGED: set[str] = set()


def _log_once(level: int, line: str) -> None:
    """Facts about the machine, said once per process (the CPU demo builds a dozen trainers)."""
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.log(level, "%s", line)


def _distributed_optimizer_works() -> bool:
    """megatron-core's DistributedOptimizer needs Apex or Transformer-Engine Adam: with torch's Adam
    (per-parameter 'step' tensors) its checkpoint loading fails (KeyError 'step' in 0.16.1). Without
    them (CPU runs) the plain megatron optimizer is used instead; said once in the log."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False):
        return True
    _log_once(
        logging.WARNING,
        "Apex/Transformer-Engine not installed: using megatron's non-distributed optimizer "
        "(optimizer state replicated over data-parallel ranks)",
    )
    return False


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _tensorboard(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir)


def _log_metrics(writer, metrics: dict, step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"train/{key}", value, step)
