"""Typed configuration of a distillation run, and `key.sub=value` overrides.

A recipe is a function returning a :class:`DistillConfig`; the CLI applies overrides such as
``train.train_steps=20 teachers.0.alpha=0.8 optim.lr=1e-4`` on top, then calls ``validate()``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field

from xtoken_nemo.errors import XTokenError
from xtoken_nemo.losses import MERGE_MODES, ULD_METHODS
from xtoken_nemo.models.config import KernelOptions


class KDMode(enum.StrEnum):
    """A teacher's KD loss (docs/method.md). A new mode adds a member here, its loss in
    ``losses/`` and its entry in the teacher-loss registry (``distill/teacher_loss.py``)."""

    KL = "kl"  # same tokenizer: plain KL
    PKL = "pkl"  # X-Token P-KL: student probabilities projected through W
    HKL = "hkl"  # X-Token H-KL: KL over W's pairs + ULD over the rest
    GOLD = "gold"  # GOLD: KL over exactly matching pieces + ULD over the rest
    ULD = "uld"  # ULD: sorted-probability L1 only
    JKL = "jkl"  # J-KL (ours): P-KL plus the joint-chunk term over the prefix support

    @property
    def needs_projection(self) -> bool:
        """Whether the mode reads the projection matrix W (``TeacherConfig.projection``)."""
        return self in (KDMode.PKL, KDMode.HKL, KDMode.JKL)

    @property
    def needs_support(self) -> bool:
        """Whether the mode reads a prefix support (``TeacherConfig.support``)."""
        return self is KDMode.JKL


KD_MODES = tuple(m.value for m in KDMode)
SCALINGS = ("dynamic", "kd_heavy", "balanced", "ce_heavy", "ce_only")
ALPHA_MODES = ("static", "ce", "entropy", "maxprob")
KD_SCALE_SOURCES = ("previous_step", "micro_batch")
KD_SCALE_VALUES = ("trainable", "paper")


class ConfigError(XTokenError):
    """A run configuration is inconsistent; the message names the field."""


@dataclass
class ModelConfig:
    """A model: a converted megatron checkpoint (``checkpoint``), or a fresh random model of the
    given family/shape (tiny CPU runs, tests), always with its tokenizer."""

    tokenizer: str = "llama3"
    checkpoint: str | None = None
    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (Qwen3-4B has 128, not 80)
    ffn_hidden_size: int | None = None
    max_position_embeddings: int = 4096
    tie_embeddings: bool = True
    init_seed: int = 1234
    # the std of a random model's normal-initialised weights (megatron's init_method_std; its
    # default 0.02 is sized for wide models: the demo's 64-wide students learn faster from 0.08)
    init_method_std: float = 0.02


#: ModelConfig fields that describe a random model; ignored when ``checkpoint`` is set
MODEL_SHAPE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
    "ffn_hidden_size",
    "max_position_embeddings",
    "tie_embeddings",
    "init_seed",
    "init_method_std",
)


@dataclass
class TeacherConfig:
    name: str = "teacher"
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: str = "pkl"
    alpha: float = 1.0
    projection: str | None = None  # W file (student -> this teacher), needed by pkl/hkl/jkl
    support: str | None = None  # prefix-support file (student -> this teacher), needed by jkl
    joint_weight: float = 1.0  # jkl: weight of the joint-chunk term beside the P-KL term
    merge: str = "chain"
    temperature: float = 1.0
    # gold/hkl/uld: sort only each side's k largest uncommon probabilities for the ULD term
    # (None: exact, a full sort of both vocabularies per chunk; k: an approximation, much cheaper on CPU)
    uld_topk: int | None = None
    # gold/hkl/uld: "hist" computes the sorted-L1 ULD term from log-grid histograms, exact up to
    # float rounding (docs/losses.md); "sort" sorts both vocabularies per chunk (the check)
    uld_method: str = "hist"

    @property
    def needs_projection(self) -> bool:
        """Whether this teacher's mode reads W (``projection`` must name a W file)."""
        return KDMode(self.mode).needs_projection


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # preprocessed directories (xtoken preprocess)
    weights: list[float] | None = None  # blend weights, one per path
    seq_length: int = 4096
    shuffle: bool = True
    # DataLoader worker processes reading and collating the step's windows ahead of the training
    # thread (Megatron's --num-workers); 0: read in the training process, as before. None: 2 on
    # CUDA, 0 on CPU (tiny runs: a worker costs more than it saves)
    num_workers: int | None = None
    prefetch_factor: int = 4  # micro-batches each worker keeps ready (workers > 0)
    pin_memory: bool | None = None  # page-locked batches for async host-to-device copies; None: on CUDA
    # teacher token/label tensors of a micro-batch padded (masked) to a multiple of this: few
    # distinct shapes for attention kernels and the caching allocator; 1: the longest window.
    # None: 128 on CUDA, 1 on CPU (no kernels to feed; tiny runs would pay 4-8x teacher compute)
    teacher_pad_multiple: int | None = None


@dataclass
class OptimConfig:
    lr: float = 5e-5
    min_lr: float = 0.0
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    train_steps: int = 30000
    global_batch_size: int = 768
    micro_batch_size: int = 1
    tensor_parallel: int = 1
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    kd_scaling: str = "dynamic"
    alpha_mode: str = "static"
    alpha_temperature: float = 1.0
    # where the dynamic scale sg(L_CE / |L_KD|) and adaptive alphas come from (docs/losses.md):
    # previous_step = the previous global step's, over its whole global batch (all micro-batches,
    # all DP ranks; the first step, or a step of one micro-batch in all, uses its own);
    # micro_batch = each micro-batch's own (the paper's form; a noisier estimate of the batch's)
    kd_scale_source: str = "previous_step"
    # which value of L_KD the dynamic scale divides by (docs/losses.md, "Which value sets the
    # dynamic scale"): trainable = the alpha-weighted trainable parts, the loss that trains (ours);
    # paper = NVIDIA's P-KL value (NeMo-RL X-Token: top-8192 teacher columns, eps 1e-10) for each
    # pkl teacher and the trainable part for the others. The loss that trains is the same.
    kd_scale_value: str = "trainable"
    loss_block_size: int = 1024
    max_consecutive_nonfinite: int = 5
    log_interval: int = 1  # rank 0 writes one progress line (job log) every this many steps
    # collective timeout: a rank that died or hangs fails the others after this long instead of
    # torch's default (10 min NCCL / 30 min gloo); long enough for teachers loading from a shared FS
    dist_timeout_minutes: float = 30.0


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    save_interval: int = 1000
    resume: bool = True  # continue from the latest checkpoint in dir when there is one
    # a latest checkpoint that cannot be read (cut-short file, missing shard): resume from the
    # newest earlier one that loads, with a loud warning; False stops with the error instead
    fallback_on_corrupt: bool = True
    # with data parallelism each DP rank writes and reads only its part of the replicated state
    # (megatron's FullyParallelSave/LoadStrategyWrapper over the DP group; no-op at DP = 1)
    fully_parallel: bool = True
    # write in a background process and publish the checkpoint when every rank is done; the step
    # loop goes on meanwhile (saves on a stop signal stay synchronous)
    async_save: bool = False
    # keep only the newest N complete iter_N directories (None keeps all)
    keep_last: int | None = None


@dataclass
class ParallelConfig:
    """Communication overlap, fused kernels and sequence parallelism (docs/performance.md).

    The defaults are what Megatron-LM runs at 16 x 8 H100s for a ~1B model: gradient
    reduce-scatter overlapped with the backward pass and parameter all-gather with the next
    forward, in buckets of ``max(40M, 1M x DP)`` parameters, the fused kernels on, sequence
    parallelism at TP > 1. They are requests, resolved when the run is built: anything this
    machine cannot run (no CUDA, no Transformer-Engine/Apex kernel, DP = 1, no distributed
    optimizer) is turned off there, with one log line naming it and why. On CPU that leaves only
    ``overlap_grad_reduce`` (at DP > 1: gloo runs megatron's asynchronous bucket collectives).
    """

    overlap_grad_reduce: bool = True  # --overlap-grad-reduce: per-bucket reduce(-scatter) during backward
    overlap_param_gather: bool = (
        True  # --overlap-param-gather: per-bucket all-gather during the next forward (distributed optimizer only)
    )
    bucket_size: int | None = (
        None  # --ddp-bucket-size, in parameters; None: megatron's max(40M, 1M x DP) (one bucket without overlap)
    )
    average_in_collective: bool = (
        False  # --ddp-average-in-collective: AVG in the collective instead of pre-scaling by 1/DP
    )
    sequence_parallel: bool = True  # --sequence-parallel, applied only at TP > 1 with the TE layer spec
    bias_activation_fusion: bool = True  # --bias-swiglu-fusion (Megatron-LM default on)
    bias_dropout_fusion: bool = True  # --bias-dropout-fusion (default on)
    apply_rope_fusion: bool = True  # --rope-fusion (default on; always off for LongRoPE)
    gradient_accumulation_fusion: bool = True  # --gradient-accumulation-fusion (default on)
    persist_layer_norm: bool = True  # --persist-layer-norm (default on)

    def kernel_options(self):
        """The model-side part as :class:`xtoken_nemo.models.config.KernelOptions`."""
        return KernelOptions(**{name: getattr(self, name) for name in KernelOptions.__dataclass_fields__})

    def ddp_options(self, dp_size: int, distributed_optimizer: bool) -> tuple[dict, dict[str, str]]:
        """(keyword arguments for megatron's ``DistributedDataParallelConfig`` besides
        ``grad_reduce_in_fp32``/``use_distributed_optimizer``, {option turned off: why}).

        ``check_for_nan_in_grad`` stays off: megatron's check is fatal, while the trainer skips a
        step with NaN/inf on every rank (train.max_consecutive_nonfinite)."""
        why: dict[str, str] = {}
        grad = self.overlap_grad_reduce
        if grad and dp_size == 1:
            grad, why["overlap_grad_reduce"] = False, "data-parallel size 1 (no gradient collective)"
        param = self.overlap_param_gather
        if param and not distributed_optimizer:
            param, why["overlap_param_gather"] = (
                False,
                "needs the distributed optimizer (Apex or Transformer-Engine Adam)",
            )
        elif param and dp_size == 1:
            param, why["overlap_param_gather"] = False, "data-parallel size 1 (no parameter all-gather)"
        options = dict(
            overlap_grad_reduce=grad,
            overlap_param_gather=param,
            bucket_size=self.bucket_size,
            average_in_collective=self.average_in_collective,
            check_for_nan_in_grad=False,
        )
        return options, why


@dataclass
class DistillConfig:
    name: str = "run"
    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log_dir: str = "runs/default/logs"

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError for layouts and settings that cannot run."""
        t = self.train
        if t.tensor_parallel < 1 or world_size % t.tensor_parallel:
            raise ConfigError(f"train.tensor_parallel={t.tensor_parallel} must divide the world size {world_size}")
        dp = world_size // t.tensor_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be divisible by train.micro_batch_size="
                f"{t.micro_batch_size} x data-parallel size {dp}"
            )
        if t.train_steps < 1:
            raise ConfigError("train.train_steps must be at least 1")
        for name, value, allowed in (
            ("train.kd_scaling", t.kd_scaling, SCALINGS),
            ("train.alpha_mode", t.alpha_mode, ALPHA_MODES),
            ("train.kd_scale_source", t.kd_scale_source, KD_SCALE_SOURCES),
            ("train.kd_scale_value", t.kd_scale_value, KD_SCALE_VALUES),
            ("train.precision", t.precision, ("auto", "fp32", "bf16")),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}; choose one of {allowed}")
        if not self.data.paths:
            raise ConfigError("data.paths is empty: give the directories written by `xtoken preprocess`")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.paths):
            raise ConfigError(
                f"data.weights has {len(self.data.weights)} entries for {len(self.data.paths)} data.paths"
            )
        if self.checkpoint.keep_last is not None and self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1, or null to keep every checkpoint")
        models = [("student", self.student)] + [(f"teacher {t.name}", t.model) for t in self.teachers]
        for who, model in models:
            if not model.checkpoint and not model.init_method_std > 0:
                raise ConfigError(
                    f"{who}: init_method_std={model.init_method_std} must be > 0 (the std of the random weights)"
                )
        if self.parallel.bucket_size is not None and self.parallel.bucket_size < 1:
            raise ConfigError(
                "parallel.bucket_size must be a positive number of parameters, or null for megatron's default"
            )
        if not 0 <= self.optim.warmup_fraction < 1:
            raise ConfigError("optim.warmup_fraction must be in [0, 1)")
        names = [tc.name for tc in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names must be unique, got {names}")
        for i, tc in enumerate(self.teachers):
            where = f"teachers.{i} ({tc.name})"
            if tc.mode not in KD_MODES:
                raise ConfigError(f"{where}.mode={tc.mode!r}; choose one of {KD_MODES}")
            if tc.merge not in MERGE_MODES:
                raise ConfigError(f"{where}.merge={tc.merge!r}; choose one of {MERGE_MODES}")
            if tc.uld_method not in ULD_METHODS:
                raise ConfigError(f"{where}.uld_method={tc.uld_method!r}; choose 'hist' (default) or 'sort'")
            if tc.uld_topk is not None and tc.uld_topk < 1:
                raise ConfigError(f"{where}.uld_topk={tc.uld_topk} must be a positive int or null (exact)")
            if tc.alpha < 0:
                raise ConfigError(f"{where}.alpha={tc.alpha} must be >= 0")
            if tc.joint_weight < 0:
                raise ConfigError(f"{where}.joint_weight={tc.joint_weight} must be >= 0")
            if KDMode(tc.mode).needs_support and not tc.support:
                raise ConfigError(
                    f"{where}.mode={tc.mode} needs {where.split(' ')[0]}.support, a prefix-support file: "
                    f"`xtoken build-support --student {self.student.tokenizer} --teacher {tc.model.tokenizer} "
                    "--out support.safetensors`"
                )
            if tc.needs_projection and not tc.projection:
                raise ConfigError(
                    f"{where}.mode={tc.mode} needs {where.split(' ')[0]}.projection, a W file: "
                    f"`xtoken build-w --student {self.student.tokenizer} --teacher {tc.model.tokenizer} "
                    "--out W.safetensors`"
                )
        if self.teachers and t.alpha_mode == "static" and self.train.kd_scaling != "ce_only":
            total = sum(tc.alpha for tc in self.teachers)
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(
                    f"static teacher alphas must sum to 1, got {total} ({[tc.alpha for tc in self.teachers]})"
                )

    def to_dict(self) -> dict:
        """All fields, except the shape fields of a model loaded from a checkpoint: they are not
        used (the checkpoint's ``xtoken_model.json`` gives the architecture) and showing the
        random-model defaults (2 layers, hidden 64) would misstate what runs."""
        out = dataclasses.asdict(self)
        for model in [out["student"]] + [t["model"] for t in out["teachers"]]:
            if model.get("checkpoint"):
                for name in MODEL_SHAPE_FIELDS:
                    model.pop(name, None)
        return out


# ----------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------
def _coerce(text: str, annotation, where: str):
    """Parse an override value for a field of type ``annotation`` (int, float, bool, str, lists,
    and ``X | None``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    base = args[0] if optional and len(args) == 1 else annotation
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if base in (int, float):
            return base(text)
        if origin is list:
            (item,) = typing.get_args(base) or (str,)
            values = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v]
            return [item(v) for v in values]
        return text
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"override {where}={text!r}: expected {getattr(base, '__name__', base)}") from None


def apply_overrides(config: DistillConfig, overrides: list[str]) -> DistillConfig:
    """Apply ``key.sub=value`` strings in place (list items by index: ``teachers.0.alpha=0.8``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key.sub=value")
        key, text = item.split("=", 1)
        target = config
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            target = _child(target, part, ".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(target, list):
            raise ConfigError(f"override {key}: cannot replace a whole list item; set its fields")
        if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {key}: no field '{last}' in {type(target).__name__}")
        hints = typing.get_type_hints(type(target))
        if dataclasses.is_dataclass(hints[last]):
            raise ConfigError(f"override {key}: set the fields of {last}, e.g. {key}.<field>=...")
        setattr(target, last, _coerce(text, hints[last], key))
    return config


def _child(node, part: str, where: str):
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"override {where}: index {part} out of range (there are {len(node)})")
        return node[int(part)]
    if not dataclasses.is_dataclass(node) or not hasattr(node, part):
        raise ConfigError(f"override {where}: no field '{part}' in {type(node).__name__}")
    return getattr(node, part)


def config_from_dict(data: dict) -> DistillConfig:
    """A DistillConfig from a (possibly partial) dict: missing sections and fields keep their
    defaults; unknown ones are errors naming the field."""

    def build(cls, values, where):
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in {where}; known: {sorted(names)}")
        return values

    top = build(DistillConfig, data, "config")
    teachers = []
    for i, t in enumerate(top.get("teachers", [])):
        t = dict(build(TeacherConfig, t, f"teachers.{i}"))
        t["model"] = ModelConfig(**build(ModelConfig, t.get("model", {}), f"teachers.{i}.model"))
        teachers.append(TeacherConfig(**t))
    sections = {
        "student": ModelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "checkpoint": CheckpointConfig,
        "parallel": ParallelConfig,
    }
    kwargs = {k: v for k, v in top.items() if k not in sections and k != "teachers"}
    for key, cls in sections.items():
        kwargs[key] = cls(**build(cls, top.get(key, {}), key))
    return DistillConfig(teachers=teachers, **kwargs)
