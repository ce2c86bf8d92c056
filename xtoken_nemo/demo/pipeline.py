"""The CPU demo: a small but real reproduction of the paper's experiment, end to end.

1. W for the Llama-3.2 student against the Qwen3 and Phi-4-mini tokenizers (built by the real code
   on the full tokenizers) and the coverage audit.
2. The task (:mod:`xtoken_nemo.demo.corpus`): a room-number lookup the teachers' corpus states and
   the students' corpus does not (its numbers are scrambled). Compact vocabularies
   (:mod:`xtoken_nemo.tokenizers.compact`): each model's embedding and output layer span only the
   token ids the demo's text uses (plus the teacher ids W reaches); W is the full W restricted.
   Preprocessed with the real preprocessing code (the function behind ``xtoken preprocess``).
3. Teachers with the Qwen3 and Phi-4-mini tokenizers, trained CE-only on the true table until they
   know it; then, per seed, students with the Llama-3.2 tokenizer through the real trainer: CE
   only, GOLD / ULD / P-KL / H-KL from each teacher, the two-teacher run. Within a seed every
   student starts from the same initial weights and sees the same windows in the same order.
4. Every model is evaluated on the lookup prompts (exact match, answer NLL) and on held-out text
   stating the true numbers (:mod:`xtoken_nemo.demo.evaluate`).
5. ``report.md``, ``results.json``, PNG plots, the paper's claims as checks
   (:mod:`xtoken_nemo.demo.report`).

Resumable: a finished step leaves its output (W files, datasets, ``runs/<name>/history.json``,
``eval.json``) and is skipped when the command runs again; an interrupted run resumes from its
checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from xtoken_nemo.data.preprocess import PreprocessConfig, preprocess
from xtoken_nemo.demo.corpus import LookupItem, LookupTable, documents
from xtoken_nemo.demo.evaluate import EvalItems, evaluate_checkpoint
from xtoken_nemo.demo.numerics import numerics_in_effect
from xtoken_nemo.demo.report import CLAIM_RUNS, write_report
from xtoken_nemo.demo.runs import RunSpec, run_dir_name
from xtoken_nemo.distill.config import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    KDMode,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
)
from xtoken_nemo.distill.model_setup import save_random_checkpoint
from xtoken_nemo.distill.run_checkpoints import latest_checkpoint
from xtoken_nemo.distill.teacher_cache import CacheStats, TeacherLogitsCache
from xtoken_nemo.distill.trainer import Trainer
from xtoken_nemo.errors import XTokenError
from xtoken_nemo.models.runtime import ensure_model_parallel
from xtoken_nemo.tokenizers import load_tokenizer
from xtoken_nemo.tokenizers.compact import CompactTokenizer, corpus_ids
from xtoken_nemo.vocab import ProjectionMatrix
from xtoken_nemo.vocab.audit import audit, plot_audits
from xtoken_nemo.vocab.build import build_projection_matrix
from xtoken_nemo.vocab.compact import projection_support, restrict_projection
from xtoken_nemo.vocab.prefix_support import build_prefix_support

log = logging.getLogger(__name__)

STUDENT_TOK = "llama3"
TEACHER_TOKS = ("qwen3", "phi4mini")
TEACHER_FAMILY = {"qwen3": "qwen3", "phi4mini": "phi3"}
MODES = ("gold", "uld", "pkl", "hkl")
#: a run's time relative to a CE-only run, per teacher's mode (measured, with the teacher cache):
#: the order in which the workers take the runs, longest first, so that they finish together
RUN_COST = {"kl": 0.3, "pkl": 0.4, "jkl": 0.4, "hkl": 0.6, "uld": 0.8, "gold": 0.9}


@dataclass
class ModelSize:
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    steps: int = 30
    batch: int = 4
    lr: float = 5e-3
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # the cosine decay ends at lr * this
    init_std: float = 0.02  # the random weights' std (ModelConfig.init_method_std)


@dataclass
class DemoConfig:
    """Sizes of the full demo, chosen for the 10-minute budget on 2 CPU cores (docs/demo.md)."""

    num_facts: int = 120
    table_seed: int = 7
    rooms: tuple = (10, 99)
    seq_length: int = 64
    teacher_docs: int = 1600
    student_docs: int = 400
    heldout_docs: int = 80
    teacher: ModelSize = field(
        default_factory=lambda: ModelSize(hidden_size=64, num_layers=2, steps=300, batch=16, lr=1e-2)
    )
    # a student learns the table in a breakthrough (KD loss from a plateau to 0.01): with megatron's
    # init std 0.02 and 2 layers at step 100-234, with std 0.08 and 1 layer at step 44-96 (docs/demo.md,
    # "Cost of the demo"); a constant lr after warm-up lets every seed of every run get there, a
    # cosine decay left some at the plateau (docs/demo.md, "Training")
    student: ModelSize = field(
        default_factory=lambda: ModelSize(
            hidden_size=64, num_layers=1, steps=300, batch=16, lr=2e-2, min_lr_fraction=1.0, init_std=0.08
        )
    )
    seeds: tuple = (1, 2, 3, 4, 5)
    # False: only the runs the claims compare (CLAIM_RUNS); True adds ULD from each teacher, Qwen3's
    # H-KL and Phi-4-mini's GOLD (10 runs per seed, about twice the time), and GOLD on the second task
    all_methods: bool = False
    # the second task (docs/demo.md, "J-KL"): students whose text keeps each number's true first
    # digit and scrambles the second, distilled from Qwen3 with P-KL and with J-KL, beside CE only
    digit_task: bool = True
    # training runs at once, each in its own process with one thread: two such runs on two cores
    # take about the time of one (docs/demo.md, step 5)
    workers: int = 2
    multi_alphas: tuple = (0.5, 0.5)  # qwen3, phi4mini
    # J-KL's joint term weighs 2 beside its P-KL term in the second task: with 1, one seed of ten
    # (5 seeds x 2 kernel paths) stayed on the plateau for 300 steps; with 2 all ten broke through
    # (step 114-234; docs/demo.md, "The second task")
    joint_weight: float = 2.0
    seed: int = 1234  # corpus, teachers, bootstrap
    bootstrap: int = 1000


def full_config() -> DemoConfig:
    return DemoConfig()


def fast_config() -> DemoConfig:
    """Tiny sizes and a few steps: the pipeline end to end in the test suite."""
    return DemoConfig(
        num_facts=12,
        seq_length=32,
        teacher_docs=24,
        student_docs=12,
        heldout_docs=4,
        seeds=(1, 2),
        teacher=ModelSize(hidden_size=32, num_layers=1, num_attention_heads=2, steps=2, batch=2, lr=1e-2),
        student=ModelSize(hidden_size=32, num_layers=1, num_attention_heads=2, steps=2, batch=2, lr=1e-2),
        bootstrap=50,
        all_methods=True,  # every loss path end to end
    )


def student_runs(recommended: dict[str, str], alphas: tuple = (0.5, 0.5), all_methods: bool = True) -> list[RunSpec]:
    """The student runs of one seed: CE only, each (teacher, mode) of MODES, both teachers; with
    ``all_methods=False`` only those the report's claims compare."""
    runs = [RunSpec("ce-only", "no teacher", "CE only")]
    label = {"gold": "GOLD", "uld": "ULD", "pkl": "X-Token P-KL", "hkl": "X-Token H-KL"}
    for t in TEACHER_TOKS:
        for mode in MODES:
            method = label[mode]
            if KDMode(mode).needs_projection:
                method += " (audit's pick)" if recommended[t] == mode else " (other mode)"
            runs.append(RunSpec(f"{t}-{mode}", t, method, [(t, mode, 1.0)]))
    multi = [(t, recommended[t], a) for t, a in zip(TEACHER_TOKS, alphas)]
    runs.append(
        RunSpec(
            "multi-xtoken",
            "qwen3 + phi4mini",
            f"X-Token two teachers (audit's modes, alpha {alphas[0]:g}/{alphas[1]:g})",
            multi,
        )
    )
    # the two-teacher run is compared with its singles (the audit's picks): always trained
    keep = CLAIM_RUNS | {f"{t}-{recommended[t]}" for t in TEACHER_TOKS}
    return runs if all_methods else [r for r in runs if r.name in keep]


#: the second task's teacher: the one that writes numbers digit by digit
DIGIT_TEACHER = "qwen3"


def digit_task_runs(all_methods: bool = False) -> list[RunSpec]:
    """The second task's student runs of one seed: CE only, P-KL and J-KL from Qwen3 (and GOLD with
    ``all_methods``): does the teacher's second digit reach a one-token student numeral?"""
    setting = "second digit from Qwen3"
    t = DIGIT_TEACHER
    runs = [
        RunSpec("digits-ce-only", setting, "CE only", task="digits"),
        RunSpec(f"digits-{t}-pkl", setting, "X-Token P-KL", [(t, "pkl", 1.0)], task="digits"),
        RunSpec(f"digits-{t}-jkl", setting, "J-KL (ours)", [(t, "jkl", 1.0)], task="digits"),
    ]
    if all_methods:
        runs.append(RunSpec(f"digits-{t}-gold", setting, "GOLD", [(t, "gold", 1.0)], task="digits"))
    return runs


class Demo:
    """``teacher_cache``: each training process keeps the frozen teachers' logits per window and
    reuses them in its later runs (:mod:`xtoken_nemo.distill.teacher_cache`; the same numbers,
    computed once: docs/demo.md, "Cost of the demo"); False runs the teachers on every batch."""

    def __init__(
        self, out: str | Path, cfg: DemoConfig, progress: bool = True, echo=print, teacher_cache: bool = True
    ) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.progress = progress
        self.echo = echo
        self.teacher_cache = teacher_cache
        self.timings: dict[str, float] = {}
        self._full_w: dict = {}  # teacher -> full W (full_w)
        self._pool = None  # the training workers, started once for the teachers and the students

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()
        audits = self._step("vocabulary: W and coverage audit", self.vocabulary)
        recommended = {r["teacher"]: r["recommended_loss"] for r in audits}
        vocab = self._step("corpus, compact vocabularies, preprocessing", self.data)
        try:
            teachers = self._step("teachers (CE only, true table)", self.train_teachers)
            runs = student_runs(recommended, self.cfg.multi_alphas, self.cfg.all_methods)
            if self.cfg.digit_task:
                runs += digit_task_runs(self.cfg.all_methods)
            students = self._step(
                f"students ({len(runs)} runs x {len(self.cfg.seeds)} seeds)",
                lambda: self.train_students(runs, teachers),
            )
        finally:
            self.close_workers()
        evals = self._step("evaluation", lambda: self.evaluate(runs))
        self.timings["total"] = time.perf_counter() - started

        return write_report(
            self.out,
            self.cfg,
            audits,
            vocab,
            runs,
            teachers,
            students,
            evals,
            self.timings,
            echo=self.echo,
            numerics=numerics_in_effect(),
        )

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
                raise XTokenError(
                    f"{self.out} holds a demo run with another configuration ({path}); "
                    "use another --out or delete that directory"
                )
        path.write_text(json.dumps(mine, indent=1))

    # ------------------------------------------------------------------------------------------
    def vocabulary(self) -> list[dict]:
        """The full W per teacher (cached in --out) and the coverage audit, on the full tokenizers."""
        student = load_tokenizer(STUDENT_TOK)
        reports, summaries = [], []
        for name in TEACHER_TOKS:
            W = self.full_w(name)
            report = audit(student, load_tokenizer(name))
            reports.append(report)
            stats = W.builder_stats()
            summary = report.to_json()
            summary.update(
                teacher=name, w_nnz=stats["nnz"], w_zero_rows=stats["zero_rows"], w_long_rows=stats["long_rows"]
            )
            summaries.append(summary)
            cats = summary["categories"]
            self.echo(
                f"   {STUDENT_TOK} -> {name}: W nnz {stats['nnz']:,}; "
                f"numerals_2 {cats['numerals_2']['covered']}/{cats['numerals_2']['total']}, "
                f"numerals_3 {cats['numerals_3']['covered']}/{cats['numerals_3']['total']} in the common set "
                f"-> {report.recommended_loss.upper()}"
            )
        plot_audits(reports, str(self.out / "audit.png"))
        return summaries

    def full_w(self, teacher: str):
        """W on the full tokenizers, built once into --out and read once per process (the audit
        and the compact vocabularies both use it)."""
        if teacher in self._full_w:
            return self._full_w[teacher]

        student, tok = load_tokenizer(STUDENT_TOK), load_tokenizer(teacher)
        path = self.out / "vocab" / f"W_{STUDENT_TOK}_{teacher}.full.safetensors"
        if path.exists():
            W = ProjectionMatrix.load(path, student, tok)
        else:
            W = build_projection_matrix(student, tok, progress=self.progress)
            W.save(path)
        self._full_w[teacher] = W
        return W

    def vocab_path(self, tok: str) -> Path:
        return self.out / "vocab" / f"{tok}.subvocab.json"

    def w_path(self, teacher: str) -> Path:
        """W restricted to the compact vocabularies: what the P-KL/H-KL students load."""
        return self.out / "vocab" / f"W_{STUDENT_TOK}_{teacher}.safetensors"

    def support_path(self, teacher: str) -> Path:
        """J-KL's prefix support on the compact vocabularies."""
        return self.out / "vocab" / f"S_{STUDENT_TOK}_{teacher}.safetensors"

    # ------------------------------------------------------------------------------------------
    def texts(self) -> dict[str, list[str]]:
        c = self.cfg
        table = LookupTable(c.num_facts, c.table_seed, c.rooms)
        texts = {
            "teacher": documents(table, c.teacher_docs, seed=c.seed + 1),
            "student": documents(table, c.student_docs, seed=c.seed + 2, scrambled=True),
            "heldout": documents(table, c.heldout_docs, seed=c.seed + 3),
        }
        if c.digit_task:
            texts["student_digits"] = documents(
                table, c.student_docs, seed=c.seed + 4, scrambled=True, keep_first_digit=True
            )
        return texts

    def items(self):
        return LookupTable(self.cfg.num_facts, self.cfg.table_seed, self.cfg.rooms).items()

    def data(self) -> dict:
        """Corpus files, the compact vocabularies, restricted W, preprocessed datasets."""
        c = self.cfg
        corpus = self.out / "corpus"
        corpus.mkdir(exist_ok=True)
        texts = self.texts()
        for name, docs in texts.items():
            _write_if_changed(corpus / f"{name}.jsonl", "\n".join(json.dumps({"text": d}) for d in docs) + "\n")
        items = self.items()
        _write_if_changed(corpus / "lookup_eval.jsonl", "\n".join(json.dumps(asdict(i)) for i in items) + "\n")
        vocab = self.compact_vocabularies(
            [d for docs in texts.values() for d in docs] + [f"{i.prompt} {i.answer}" for i in items]
        )

        jobs = [
            (
                self.data_dir("student"),
                "student",
                self.vocab_path(STUDENT_TOK),
                [self.vocab_path(t) for t in TEACHER_TOKS],
            )
        ]
        jobs += [
            (self.data_dir(f"teacher_{t}"), "teacher", self.vocab_path(t), [self.vocab_path(t)]) for t in TEACHER_TOKS
        ]
        if c.digit_task:
            student = self.vocab_path(STUDENT_TOK)
            jobs.append((self.data_dir("student_digits"), "student_digits", student, [self.vocab_path(DIGIT_TEACHER)]))
        for out, split, student, teachers in jobs:
            if (out / "manifest.json").exists():
                continue
            manifest = preprocess(
                PreprocessConfig(
                    inputs=[str(corpus / f"{split}.jsonl")],
                    student=str(student),
                    teachers=[str(t) for t in teachers],
                    out=str(out),
                    seq_length=c.seq_length,
                    progress=self.progress,
                )
            )
            self.echo(
                f"   {out.name}: {manifest['documents']:,} documents, "
                f"{manifest['student']['tokens']:,} {Path(student).name.split('.')[0]} tokens"
            )
        return vocab

    def compact_vocabularies(self, texts: list[str]) -> dict:
        """Each tokenizer restricted to the ids the demo's text uses; a teacher's also keeps the ids
        W's rows for the student's kept ids reach, so the restricted W loses no mass."""
        full = {t: load_tokenizer(t) for t in (STUDENT_TOK, *TEACHER_TOKS)}
        student_ids = corpus_ids(full[STUDENT_TOK], texts)
        keep = {STUDENT_TOK: student_ids}
        Ws = {t: self.full_w(t) for t in TEACHER_TOKS}
        for t in TEACHER_TOKS:
            keep[t] = corpus_ids(full[t], texts) | projection_support(Ws[t], student_ids)
        compact = {t: CompactTokenizer(full[t], sorted(ids), name=t) for t, ids in keep.items()}
        for t, tok in compact.items():
            if not self.vocab_path(t).exists():
                tok.save(self.vocab_path(t), base_spec=t)
        summary = {t: {"full": full[t].vocab_size, "compact": compact[t].vocab_size} for t in compact}
        for t in TEACHER_TOKS:
            if not self.w_path(t).exists():
                restrict_projection(Ws[t], compact[STUDENT_TOK], compact[t]).save(self.w_path(t))
        if self.cfg.digit_task and not self.support_path(DIGIT_TEACHER).exists():
            support = build_prefix_support(compact[STUDENT_TOK], compact[DIGIT_TEACHER], progress=False)
            support.save(self.support_path(DIGIT_TEACHER))
        self.echo(
            "   compact vocabularies: "
            + ", ".join(f"{t} {v['compact']:,} of {v['full']:,} ids" for t, v in summary.items())
        )
        return summary

    def data_dir(self, name: str) -> Path:
        return self.out / "data" / name

    def heldout(self):
        corpus = self.out / "corpus"
        docs = [json.loads(line)["text"] for line in (corpus / "heldout.jsonl").read_text().splitlines() if line]
        items = [
            LookupItem(**json.loads(line)) for line in (corpus / "lookup_eval.jsonl").read_text().splitlines() if line
        ]
        return docs, items

    # ------------------------------------------------------------------------------------------
    def _model_config(
        self, tok: str, family: str, size: ModelSize, seed: int, checkpoint: str | None = None
    ) -> ModelConfig:
        """A demo model of ``size`` (random from ``seed``, or loaded from ``checkpoint``) with the
        compact ``tok`` tokenizer; it holds 4 x seq_length positions."""
        return ModelConfig(
            tokenizer=str(self.vocab_path(tok)),
            family=family,
            checkpoint=checkpoint,
            hidden_size=size.hidden_size,
            num_layers=size.num_layers,
            num_attention_heads=size.num_attention_heads,
            max_position_embeddings=4 * self.cfg.seq_length,
            init_seed=seed,
            init_method_std=size.init_std,
        )

    def _run_config(
        self, name: str, tok: str, family: str, size: ModelSize, data: Path, teachers: list, init: str | None, seed: int
    ):
        run_dir = self.out / "runs" / name
        return DistillConfig(
            name=name,
            student=self._model_config(tok, family, size, seed, checkpoint=init),
            teachers=teachers,
            # no teacher padding: the demo's models hold 4 x seq_length positions, and a CPU has
            # no kernels that want few shapes
            data=DataConfig(paths=[str(data)], seq_length=self.cfg.seq_length, teacher_pad_multiple=1),
            optim=OptimConfig(
                lr=size.lr,
                min_lr=size.lr * size.min_lr_fraction,
                warmup_fraction=size.warmup_fraction,
                weight_decay=0.0,
            ),
            train=TrainConfig(
                train_steps=size.steps,
                global_batch_size=size.batch,
                micro_batch_size=size.batch,
                seed=seed,
                kd_scaling="dynamic" if teachers else "ce_only",
                loss_block_size=1024,
                log_interval=10**9,
            ),
            checkpoint=CheckpointConfig(dir=str(run_dir / "checkpoints"), save_interval=10**9),
            log_dir=str(run_dir / "tb"),
        )

    def _train(self, cfg) -> dict:
        """Train one run (or load its finished result); writes runs/<name>/config.json, history.json."""
        run_dir = self.out / "runs" / cfg.name
        done = run_dir / "history.json"
        if done.exists():
            record = json.loads(done.read_text())
            self.echo(f"   {cfg.name}: finished earlier ({record['seconds']:.0f} s), skipped")
            return record
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        t0 = time.perf_counter()
        cache = _process_teacher_cache() if self.teacher_cache and cfg.teachers else None
        cache_before = cache.stats.minus(CacheStats()) if cache is not None else None
        trainer = Trainer(cfg, progress=self.progress, teacher_cache=cache)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
        if summary["status"] != "completed":
            raise XTokenError(f"run {cfg.name} stopped with status {summary['status']}; run the demo again to resume")
        seconds = time.perf_counter() - t0
        keep = ("ce", "kd", "total", "kd_scale", "grad_norm", "lr")
        record = {
            "name": cfg.name,
            "seconds": seconds,
            "steps": summary["step"],
            "checkpoint": str(latest_checkpoint(cfg.checkpoint.dir)),
            "history": [{k: h[k] for k in keep if k in h} | {"step": h["step"]} for h in summary["history"]],
        }
        if cache is not None:  # teacher rows this run took from its process's cache / computed
            record["teacher_cache"] = cache.stats.minus(cache_before).to_json()
        done.write_text(json.dumps(record))
        hist = record["history"]
        kd = f", KD {hist[0]['kd']:.2f} -> {hist[-1]['kd']:.2f}" if cfg.teachers and "kd" in hist[-1] else ""
        self.echo(
            f"   {cfg.name}: {record['steps']} steps in {seconds:.0f} s, "
            f"CE {hist[0]['ce']:.2f} -> {hist[-1]['ce']:.2f}{kd}"
        )
        return record

    def _train_many(self, cfgs: list) -> dict[str, dict]:
        """Train ``cfgs`` (finished ones are read back), ``workers`` at a time, the longest runs
        first (:data:`RUN_COST`: the workers then finish at about the same time); {name: record}."""
        done = {c.name: self._train(c) for c in cfgs if (self.out / "runs" / c.name / "history.json").exists()}
        todo = sorted((c for c in cfgs if c.name not in done), key=run_cost, reverse=True)
        workers = min(self.cfg.workers, len(todo))
        if workers <= 1:
            done.update({c.name: self._train(c) for c in todo})
        else:
            from concurrent.futures import as_completed

            pool = self._workers()
            futures = [pool.submit(_train_in_worker, str(self.out), self.cfg, c, self.teacher_cache) for c in todo]
            try:
                for future in as_completed(futures):
                    record, lines = future.result()
                    for line in lines:
                        self.echo(line)
                    done[record["name"]] = record
            except BaseException:
                # a failed run (or Ctrl-C) stops the demo now, not after the queued runs;
                # finished runs are kept and skipped when it runs again
                for future in futures:
                    future.cancel()
                raise
        return {c.name: done[c.name] for c in cfgs}

    def _workers(self):
        """The training worker processes (``cfg.workers``), started at the first use and kept for
        the student runs: a worker pays its imports and tokenizer loads once, and its teacher cache
        serves every run it trains."""
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                self.cfg.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
            )
        return self._pool

    def close_workers(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def train_teachers(self) -> dict[str, dict]:
        cfgs = [
            self._run_config(
                f"teacher-{t}",
                t,
                TEACHER_FAMILY[t],
                self.cfg.teacher,
                self.data_dir(f"teacher_{t}"),
                [],
                None,
                self.cfg.seed,
            )
            for t in TEACHER_TOKS
        ]
        records = self._train_many(cfgs)
        return {t: records[f"teacher-{t}"] for t in TEACHER_TOKS}

    def student_init(self, seed: int) -> str:
        """One random initial student checkpoint per seed, shared by every student run of that seed."""
        path = self.out / "runs" / f"student-init-s{seed}"
        if not (path / "xtoken_model.json").exists():
            ensure_model_parallel(1)
            mc = self._model_config(STUDENT_TOK, "llama", self.cfg.student, seed)
            save_random_checkpoint(mc, load_tokenizer(mc.tokenizer).vocab_size, str(path), pad_for_tp=1)
        return str(path)

    def train_students(self, runs: list[RunSpec], teachers: dict[str, dict]) -> dict[str, dict]:
        t_size = self.cfg.teacher
        cfgs = []
        for seed in self.cfg.seeds:
            init = self.student_init(seed)
            for run in runs:
                tcs = [
                    TeacherConfig(
                        name=t,
                        mode=mode,
                        alpha=alpha,
                        projection=str(self.w_path(t)) if KDMode(mode).needs_projection else None,
                        support=str(self.support_path(t)) if KDMode(mode).needs_support else None,
                        # the exact sort: at 174-256 ids it is far cheaper than the histogram's
                        # 12,800 bins per row (built for 128k-200k vocabularies)
                        uld_method="sort",
                        joint_weight=self.cfg.joint_weight if KDMode(mode).needs_support else 1.0,
                        model=ModelConfig(
                            tokenizer=str(self.vocab_path(t)),
                            family=TEACHER_FAMILY[t],
                            checkpoint=teachers[t]["checkpoint"],
                            hidden_size=t_size.hidden_size,
                            num_layers=t_size.num_layers,
                            num_attention_heads=t_size.num_attention_heads,
                        ),
                    )
                    for t, mode, alpha in run.teachers
                ]
                name = run_dir_name(run.name, seed)
                data = self.data_dir("student_digits" if run.task == "digits" else "student")
                cfgs.append(self._run_config(name, STUDENT_TOK, "llama", self.cfg.student, data, tcs, init, seed))
        return self._train_many(cfgs)

    # ------------------------------------------------------------------------------------------
    def evaluate(self, runs: list[RunSpec]) -> dict[str, object]:
        from tqdm.auto import tqdm

        docs, items = self.heldout()
        models = [(f"teacher-{t}", t) for t in TEACHER_TOKS]
        models += [(run_dir_name(r.name, s), STUDENT_TOK) for s in self.cfg.seeds for r in runs]
        out = {}
        for name, tok in tqdm(models, desc="evaluate", unit="model", disable=not self.progress, dynamic_ncols=True):
            path = self.out / "runs" / name / "eval.json"
            if path.exists():
                out[name] = EvalItems.from_json(json.loads(path.read_text()))
                continue
            record = json.loads((self.out / "runs" / name / "history.json").read_text())
            result = evaluate_checkpoint(record["checkpoint"], load_tokenizer(str(self.vocab_path(tok))), docs, items)
            path.write_text(json.dumps(result.to_json()))
            out[name] = result
        return out


def _worker_init() -> None:
    """A training worker: one thread (two workers share two cores), the CLI's quiet logging."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("xtoken_nemo").setLevel(logging.WARNING)


def _train_in_worker(out: str, cfg: DemoConfig, run_cfg, teacher_cache: bool = True) -> tuple[dict, list[str]]:
    """One run in a worker process: its record and the lines to print (the parent prints them, so
    lines of two workers never interleave; no progress bars, they would overwrite each other)."""
    lines: list[str] = []
    demo = Demo(out, cfg, progress=False, echo=lines.append, teacher_cache=teacher_cache)
    return demo._train(run_cfg), lines


def run_cost(run_cfg) -> float:
    """A run's expected time relative to a CE-only run of the same size (:data:`RUN_COST`)."""
    return 1.0 + sum(RUN_COST.get(t.mode, 1.0) for t in run_cfg.teachers)


_TEACHER_CACHE: TeacherLogitsCache | None = None


def _process_teacher_cache() -> TeacherLogitsCache:
    """This process's teacher cache, shared by the runs it trains."""
    global _TEACHER_CACHE
    if _TEACHER_CACHE is None:
        _TEACHER_CACHE = TeacherLogitsCache()
    return _TEACHER_CACHE


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def run_demo(
    out: str | Path = "demo_out",
    fast: bool = False,
    progress: bool = True,
    echo=print,
    teacher_cache: bool = True,
    **overrides,
) -> dict:
    cfg = fast_config() if fast else full_config()
    if overrides:
        cfg = replace(cfg, **overrides)
    return Demo(out, cfg, progress=progress, echo=echo, teacher_cache=teacher_cache).run()
