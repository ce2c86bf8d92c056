"""The CPU demo: a scaled-down reproduction of the paper's central claim, end to end.

1. W for the Llama-3.2 student against the Qwen3 and Phi-4-mini tokenizers, and the coverage audit.
2. A corpus where numbers matter (:mod:`xtoken_nemo.demo.corpus`), preprocessed with the real
   preprocessing code (the function behind ``xtoken preprocess``).
3. Teachers with the Qwen3 and Phi-4-mini tokenizers, trained CE-only (more data, more steps and
   a wider model than the students); then students with the Llama-3.2 tokenizer through the real
   trainer: CE only, GOLD / ULD / P-KL / H-KL from each teacher, one multi-teacher run. Every
   student starts from the same initial checkpoint and sees the same windows in the same order.
4. Every model is evaluated on held-out text and held-out arithmetic prompts
   (:mod:`xtoken_nemo.demo.evaluate`).
5. ``report.md``, ``results.json``, PNG plots (:mod:`xtoken_nemo.demo.report`).

Resumable: a finished step leaves its output (W files, datasets, ``runs/<name>/result.json``)
and is skipped when the command runs again; an interrupted training run resumes from its
checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

STUDENT_TOK = "llama3"
TEACHER_TOKS = ("qwen3", "phi4mini")
TEACHER_FAMILY = {"qwen3": "qwen3", "phi4mini": "phi3"}
MODES = ("gold", "uld", "pkl", "hkl")


@dataclass
class ModelSize:
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    steps: int = 30
    batch: int = 4
    lr: float = 5e-3


@dataclass
class DemoConfig:
    """Sizes of the full demo, chosen for the 10-minute budget on 2 CPU cores: per step, the cost
    is the vocabulary-sized work (128k-200k logits per token; GOLD/H-KL/ULD about 4x P-KL), so
    windows are short, and the teachers get ~10x the students' tokens (their knowledge is what
    KD can add to the students' scarce CE data)."""

    seq_length: int = 16
    teacher_docs: int = 1200
    student_docs: int = 30
    heldout_docs: int = 40
    eval_items: int = 200
    max_operand: int = 20
    teacher: ModelSize = field(default_factory=lambda: ModelSize(hidden_size=64, num_layers=2, steps=50, batch=16, lr=1e-2))
    student: ModelSize = field(default_factory=lambda: ModelSize(hidden_size=64, num_layers=2, steps=24, batch=4, lr=8e-3))
    uld_topk: int | None = 256
    multi_alphas: tuple = (0.5, 0.5)  # qwen3, phi4mini
    seed: int = 1234
    bootstrap: int = 1000


def full_config() -> DemoConfig:
    return DemoConfig()


def fast_config() -> DemoConfig:
    """Tiny sizes and a few steps: the pipeline end to end in the test suite."""
    return DemoConfig(
        seq_length=16, teacher_docs=40, student_docs=12, heldout_docs=4, eval_items=6,
        teacher=ModelSize(hidden_size=32, num_layers=1, num_attention_heads=2, steps=2, batch=2, lr=1e-2),
        student=ModelSize(hidden_size=32, num_layers=1, num_attention_heads=2, steps=2, batch=2, lr=1e-2),
        uld_topk=64, bootstrap=50,
    )


@dataclass
class RunSpec:
    name: str
    setting: str  # table grouping
    method: str
    teachers: list = field(default_factory=list)  # [(teacher_tok, mode, alpha)]


def student_runs(recommended: dict[str, str], alphas: tuple = (0.5, 0.5)) -> list[RunSpec]:
    runs = [RunSpec("ce-only", "no teacher", "CE only (continued pre-training)")]
    label = {"gold": "GOLD", "uld": "ULD", "pkl": "X-Token P-KL", "hkl": "X-Token H-KL"}
    for t in TEACHER_TOKS:
        for mode in MODES:
            method = label[mode]
            if mode in ("pkl", "hkl"):
                method += " (audit's pick)" if recommended[t] == mode else " (wrong mode)"
            runs.append(RunSpec(f"{t}-{mode}", t, method, [(t, mode, 1.0)]))
    multi = [(t, recommended[t], a) for t, a in zip(TEACHER_TOKS, alphas)]
    runs.append(RunSpec("multi-xtoken", "qwen3 + phi4mini", f"X-Token multi-teacher (audit's modes, alpha {alphas[0]:g}/{alphas[1]:g})", multi))
    return runs


class Demo:
    def __init__(self, out: str | Path, cfg: DemoConfig, progress: bool = True, echo=print) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.progress = progress
        self.echo = echo
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()
        audits = self._step("vocabulary: W and coverage audit", self.vocabulary)
        recommended = {r["teacher"]: r["recommended_loss"] for r in audits}
        self._step("corpus + preprocessing", self.data)
        teachers = self._step("teachers (CE only)", self.train_teachers)
        runs = student_runs(recommended, self.cfg.multi_alphas)
        students = self._step("students", lambda: self.train_students(runs, teachers))
        evals = self._step("evaluation", lambda: self.evaluate(runs, teachers))
        self.timings["total"] = time.perf_counter() - started
        from xtoken_nemo.demo.report import write_report

        return write_report(self.out, self.cfg, audits, runs, teachers, students, evals, self.timings, echo=self.echo)

    def _step(self, title: str, fn):
        self.echo(f"\n== {title}")
        t0 = time.perf_counter()
        result = fn()
        self.timings[title] = time.perf_counter() - t0
        self.echo(f"   done in {self.timings[title]:.1f} s")
        return result

    def _check_config(self) -> None:
        """A demo directory holds one configuration: refuse to mix results of different sizes."""
        path = self.out / "demo_config.json"
        mine = json.loads(json.dumps(asdict(self.cfg)))
        if path.exists():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                from xtoken_nemo.errors import XTokenError

                raise XTokenError(
                    f"{self.out} holds a demo run with another configuration ({path}); "
                    "use another --out or delete that directory"
                )
        path.write_text(json.dumps(mine, indent=1))

    # ------------------------------------------------------------------------------------------
    def vocabulary(self) -> list[dict]:
        from xtoken_nemo.tokenizers import load_tokenizer
        from xtoken_nemo.vocab import ProjectionMatrix
        from xtoken_nemo.vocab.audit import audit, plot_audits
        from xtoken_nemo.vocab.build import build_projection_matrix

        student = load_tokenizer(STUDENT_TOK)
        reports, summaries = [], []
        for name in TEACHER_TOKS:
            teacher = load_tokenizer(name)
            path = self.w_path(name)
            if path.exists():
                W = ProjectionMatrix.load(path, student, teacher)
            else:
                W = build_projection_matrix(student, teacher, progress=self.progress)
                W.save(path)
            report = audit(student, teacher)
            reports.append(report)
            stats = W.builder_stats()
            summary = report.to_json()
            summary.update(teacher=name, w_file=str(path.name), w_nnz=stats["nnz"], w_zero_rows=stats["zero_rows"], w_long_rows=stats["long_rows"])
            summaries.append(summary)
            cats = summary["categories"]
            self.echo(
                f"   {STUDENT_TOK} -> {name}: W nnz {stats['nnz']:,}; numerals_2 {cats['numerals_2']['covered']}/{cats['numerals_2']['total']}, "
                f"numerals_3 {cats['numerals_3']['covered']}/{cats['numerals_3']['total']} in the common set -> {report.recommended_loss.upper()}"
            )
        plot_audits(reports, str(self.out / "audit.png"))
        return summaries

    def w_path(self, teacher: str) -> Path:
        return self.out / f"W_{STUDENT_TOK}_{teacher}.safetensors"

    # ------------------------------------------------------------------------------------------
    def data(self) -> None:
        from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
        from xtoken_nemo.demo.corpus import CorpusSpec, arithmetic_items, documents

        c, spec = self.cfg, CorpusSpec(max_operand=self.cfg.max_operand)
        corpus = self.out / "corpus"
        corpus.mkdir(exist_ok=True)
        splits = {
            "teacher": documents(c.teacher_docs, seed=c.seed + 1, spec=spec),
            "student": documents(c.student_docs, seed=c.seed + 2, spec=spec),
            "heldout": documents(c.heldout_docs, seed=c.seed + 3, spec=spec),
        }
        for name, docs in splits.items():
            _write_if_changed(corpus / f"{name}.jsonl", "\n".join(json.dumps({"text": d}) for d in docs) + "\n")
        items = arithmetic_items(c.eval_items, seed=c.seed + 4, spec=spec)
        _write_if_changed(corpus / "arithmetic_eval.jsonl", "\n".join(json.dumps(asdict(i)) for i in items) + "\n")
        jobs = [(self.data_dir("student"), "student", STUDENT_TOK, list(TEACHER_TOKS))]
        jobs += [(self.data_dir(f"teacher_{t}"), "teacher", t, [t]) for t in TEACHER_TOKS]  # [t]: identity, no copy
        for out, split, student, teachers in jobs:
            if (out / "manifest.json").exists():
                continue
            manifest = preprocess(PreprocessConfig(
                inputs=[str(corpus / f"{split}.jsonl")], student=student, teachers=teachers, out=str(out),
                seq_length=c.seq_length, progress=self.progress,
            ))
            self.echo(f"   {out.name}: {manifest['documents']:,} documents, {manifest['student']['tokens']:,} {student} tokens")

    def data_dir(self, name: str) -> Path:
        return self.out / "data" / name

    def heldout(self):
        from xtoken_nemo.demo.corpus import ArithmeticItem

        corpus = self.out / "corpus"
        docs = [json.loads(line)["text"] for line in (corpus / "heldout.jsonl").read_text().splitlines() if line]
        items = [ArithmeticItem(**json.loads(line)) for line in (corpus / "arithmetic_eval.jsonl").read_text().splitlines() if line]
        return docs, items

    # ------------------------------------------------------------------------------------------
    def _run_config(self, name: str, tok: str, family: str, size: ModelSize, data: Path, teachers: list, init: str | None):
        from xtoken_nemo.distill.config import (
            CheckpointConfig, DataConfig, DistillConfig, ModelConfig, OptimConfig, TrainConfig,
        )

        run_dir = self.out / "runs" / name
        model = ModelConfig(
            tokenizer=tok, family=family, checkpoint=init, hidden_size=size.hidden_size, num_layers=size.num_layers,
            num_attention_heads=size.num_attention_heads, max_position_embeddings=4 * self.cfg.seq_length, init_seed=self.cfg.seed,
        )
        return DistillConfig(
            name=name,
            student=model,
            teachers=teachers,
            # no teacher padding: the demo's models hold 4 x seq_length positions, and a CPU has
            # no kernels that want few shapes
            data=DataConfig(paths=[str(data)], seq_length=self.cfg.seq_length, teacher_pad_multiple=1),
            optim=OptimConfig(lr=size.lr, min_lr=size.lr / 10, warmup_fraction=0.1, weight_decay=0.0),
            train=TrainConfig(
                train_steps=size.steps, global_batch_size=size.batch, micro_batch_size=size.batch, seed=self.cfg.seed,
                kd_scaling="dynamic" if teachers else "ce_only", loss_block_size=256, log_interval=10**9,
            ),
            checkpoint=CheckpointConfig(dir=str(run_dir / "checkpoints"), save_interval=10**9),
            log_dir=str(run_dir / "tb"),
        )

    def _train(self, cfg) -> dict:
        """Train one run (or load its finished result); writes runs/<name>/config.json, history.json."""
        from xtoken_nemo.distill.checkpointing import latest_checkpoint
        from xtoken_nemo.distill.trainer import Trainer

        run_dir = self.out / "runs" / cfg.name
        done = run_dir / "history.json"
        if done.exists():
            record = json.loads(done.read_text())
            self.echo(f"   {cfg.name}: finished earlier ({record['seconds']:.0f} s), skipped")
            return record
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        t0 = time.perf_counter()
        summary = Trainer(cfg, progress=self.progress).run()
        if summary["status"] != "completed":
            from xtoken_nemo.errors import XTokenError

            raise XTokenError(f"run {cfg.name} stopped with status {summary['status']}; run the demo again to resume")
        seconds = time.perf_counter() - t0
        keep = ("ce", "kd", "total", "kd_scale", "grad_norm", "lr")
        record = {
            "name": cfg.name, "seconds": seconds, "steps": summary["step"],
            "checkpoint": str(latest_checkpoint(cfg.checkpoint.dir)),
            "history": [{k: h[k] for k in keep if k in h} | {"step": h["step"]} for h in summary["history"]],
        }
        done.write_text(json.dumps(record))
        hist = record["history"]
        self.echo(f"   {cfg.name}: {record['steps']} steps in {seconds:.0f} s, CE {hist[0]['ce']:.2f} -> {hist[-1]['ce']:.2f}")
        return record

    def train_teachers(self) -> dict[str, dict]:
        out = {}
        for t in TEACHER_TOKS:
            cfg = self._run_config(f"teacher-{t}", t, TEACHER_FAMILY[t], self.cfg.teacher, self.data_dir(f"teacher_{t}"), [], None)
            out[t] = self._train(cfg)
        return out

    def student_init(self) -> str:
        """One random initial student checkpoint shared by every student run."""
        from xtoken_nemo.distill.config import ModelConfig
        from xtoken_nemo.distill.models import save_random_checkpoint
        from xtoken_nemo.models.runtime import ensure_model_parallel
        from xtoken_nemo.tokenizers import load_tokenizer

        path = self.out / "runs" / "student-init"
        if not (path / "xtoken_model.json").exists():
            s = self.cfg.student
            ensure_model_parallel(1)
            mc = ModelConfig(tokenizer=STUDENT_TOK, family="llama", hidden_size=s.hidden_size, num_layers=s.num_layers,
                             num_attention_heads=s.num_attention_heads, max_position_embeddings=4 * self.cfg.seq_length, init_seed=self.cfg.seed)
            save_random_checkpoint(mc, load_tokenizer(STUDENT_TOK).vocab_size, str(path), pad_for_tp=1)
        return str(path)

    def train_students(self, runs: list[RunSpec], teachers: dict[str, dict]) -> dict[str, dict]:
        from xtoken_nemo.distill.config import ModelConfig, TeacherConfig

        init = self.student_init()
        t_size = self.cfg.teacher
        out = {}
        for run in runs:
            tcs = [
                TeacherConfig(
                    name=t, mode=mode, alpha=alpha, projection=str(self.w_path(t)) if mode in ("pkl", "hkl") else None,
                    uld_topk=self.cfg.uld_topk,
                    model=ModelConfig(tokenizer=t, family=TEACHER_FAMILY[t], checkpoint=teachers[t]["checkpoint"],
                                      hidden_size=t_size.hidden_size, num_layers=t_size.num_layers, num_attention_heads=t_size.num_attention_heads),
                )
                for t, mode, alpha in run.teachers
            ]
            cfg = self._run_config(run.name, STUDENT_TOK, "llama", self.cfg.student, self.data_dir("student"), tcs, init)
            out[run.name] = self._train(cfg)
        return out

    # ------------------------------------------------------------------------------------------
    def evaluate(self, runs: list[RunSpec], teachers: dict[str, dict]) -> dict[str, "object"]:
        from tqdm.auto import tqdm

        from xtoken_nemo.demo.evaluate import EvalItems, evaluate_checkpoint
        from xtoken_nemo.tokenizers import load_tokenizer

        docs, items = self.heldout()
        models = [(f"teacher-{t}", t) for t in TEACHER_TOKS] + [(r.name, STUDENT_TOK) for r in runs]
        out = {}
        for name, tok in tqdm(models, desc="evaluate", unit="model", disable=not self.progress, dynamic_ncols=True):
            path = self.out / "runs" / name / "eval.json"
            if path.exists():
                out[name] = EvalItems.from_json(json.loads(path.read_text()))
                continue
            record = json.loads((self.out / "runs" / name / "history.json").read_text())
            result = evaluate_checkpoint(record["checkpoint"], load_tokenizer(tok), docs, items)
            path.write_text(json.dumps(result.to_json()))
            out[name] = result
        return out


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def run_demo(out: str | Path = "demo_out", fast: bool = False, progress: bool = True, echo=print, **overrides) -> dict:
    cfg = fast_config() if fast else full_config()
    if overrides:
        cfg = replace(cfg, **overrides)
    return Demo(out, cfg, progress=progress, echo=echo).run()
