"""The run: one recipe's directory, every path of its layout named once, the recipe and the manifest.

`RunDir` is the layout alone (what `distill report runs/x` needs); `Run` adds the resolved recipe and
the two inputs every stage reads, each resolved once and explicitly by the command or the pipeline
(never by a getter): the prepared data (stage `prepare`) and the teacher model (`teacher.model`, or the
embedded teacher stage `pretrain` trains). A stage is a function of the run and its own recipe section;
what it needs from another stage, it reads from these paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import QUANT_RECORD, RunManifest, hash_json
from distill.config import BOOKKEEPING, RecipeConfig
from distill.corpus import Corpus
from distill.errors import DistillError


@dataclass(frozen=True)
class PreparedData:
    """What stage `prepare` built (or found in the cache) for a recipe: corpus, tokenizer, token arrays."""

    corpus: Corpus
    tokenizer_dir: Path
    tokens_dir: Path  # <split>.npy flat token ids
    prompt_set: Path | None = None  # data.prompts prepared (distill.prompts.PromptSet); None: corpus prompts

    def summary(self) -> dict:
        from distill.tokenizer import tokenizer_hash

        manifest = self.corpus.manifest
        out = {
            "corpus": str(self.corpus.root),
            "corpus_hash": manifest["content_hash"],
            "documents": manifest["documents"],
            "prompts": manifest["prompts"],
            "tokenizer": str(self.tokenizer_dir),
            "tokenizer_hash": tokenizer_hash(self.tokenizer_dir),
            "tokens": str(self.tokens_dir),
        }
        if self.prompt_set is not None:
            from distill.prompts import PromptSet

            prompts = PromptSet(self.prompt_set).manifest
            out.update(
                prompt_set=str(self.prompt_set),
                prompts=prompts["prompts"],
                heldout_prompts=prompts["heldout"],
            )
        return out


class RunDir:
    """runs/<name>/ and every path in it (see docs: the run directory)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def recipe_file(self) -> Path:  # the resolved recipe that produced this run
        return self.path / "recipe.yaml"

    @property
    def manifest(self) -> RunManifest:  # read afresh: stages and the pipeline both record into it
        return RunManifest(self.path)

    @property
    def store(self) -> Path:  # the teacher store: manifest.json + shard-*.parquet
        return self.path / "teacher"

    @property
    def validation_store(self) -> Path:  # the teacher scoring held-out blocks (students' validation KL)
        return self.path / "teacher-validation"

    @property
    def heldout_store(self) -> Path:  # the teacher answering the held-out data.prompts (eval's instructions)
        return self.path / "teacher-heldout"

    def output(self, name: str = "student") -> Path:  # a training output: checkpoints/, final/, metrics
        return self.path / name

    def final(self, name: str = "student") -> Path:  # the trained model of an output (HF format)
        return self.path / name / "final"

    @property
    def student(self) -> Path:
        return self.final("student")

    @property
    def baseline(self) -> Path:  # the SFT baseline `distill run` trains beside the student
        return self.final("baseline")

    @property
    def quant(self) -> Path:
        return self.path / "quant"

    def quantized(self, scheme: str) -> Path:
        return self.quant / scheme

    def quantized_students(self) -> list[Path]:
        """The finished quantized students, quant/<scheme>/ holding the record quantize writes last, by
        name; never the temporary quant/.<scheme>.tmp-PID/ of a quantize that was killed (it may hold a
        config.json and weights, but not the record)."""
        if not self.quant.is_dir():
            return []
        return sorted(
            p for p in self.quant.iterdir() if not p.name.startswith(".") and (p / QUANT_RECORD).is_file()
        )

    @property
    def eval_dir(self) -> Path:  # per-model lm-eval results, results.json, gate.json
        return self.path / "eval"

    @property
    def eval_results(self) -> Path:  # what eval measured, before the gate reads it
        return self.eval_dir / "results.json"

    @property
    def gate_file(self) -> Path:  # the decision and its numbers (written by gate.write only)
        return self.eval_dir / "gate.json"

    @property
    def serve_dir(self) -> Path:
        return self.path / "serve"

    @property
    def bench_file(self) -> Path:
        return self.serve_dir / "bench.json"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def report_html(self) -> Path:
        return self.report_dir / "report.html"

    @property
    def teacher_server_log(self) -> Path:  # the on-policy teacher server's log
        return self.path / "teacher-server.log"


class Run(RunDir):
    """A recipe's run directory with its inputs resolved (see the module docstring)."""

    def __init__(self, recipe: RecipeConfig, data: PreparedData | None = None, teacher: Path | None = None):
        super().__init__(recipe.run_dir)
        self.recipe = recipe
        self._data = data
        self._teacher = teacher

    @property
    def data(self) -> PreparedData:
        if self._data is None:
            raise DistillError(f"{self.path}: the data is not prepared (stage prepare runs first)")
        return self._data

    @property
    def teacher(self) -> Path:
        if self._teacher is None:
            raise DistillError(f"{self.path}: no teacher resolved (teacher.model, or stage pretrain first)")
        return self._teacher

    @property
    def student_tokenizer(self) -> Path:
        """The student's tokenizer: student.tokenizer (a directory, or `corpus`: trained on the corpus
        once, cached), else student.model's own when its directory has one, else the run's (data.tokenizer
        or the teacher's)."""
        from distill.tokenizer import train_tokenizer

        student = self.recipe.student
        if student.tokenizer == "corpus":
            vocab = student.vocab_size or self.recipe.data.vocab_size
            return train_tokenizer(self.data.corpus, vocab, self.recipe.cache_path)
        if student.tokenizer:
            path = Path(student.tokenizer).expanduser()
            if not (path / "tokenizer.json").is_file():
                raise DistillError(f"student.tokenizer: no tokenizer.json in {path}")
            return path
        model = student.model
        if model and (Path(model) / "tokenizer.json").exists():
            return Path(model)
        return self.data.tokenizer_dir

    @property
    def has_teacher(self) -> bool:
        return self._teacher is not None

    def with_teacher(self, teacher: Path) -> Run:
        return Run(self.recipe, self._data, Path(teacher))

    def with_recipe(self, recipe: RecipeConfig) -> Run:
        """The same inputs under a variant of the recipe (the SFT baseline, the validation split)."""
        return Run(recipe, self._data, self._teacher)


def teacher_key(recipe: RecipeConfig, data: PreparedData) -> str:
    """The embedded teacher's cache key: what changes its weights (corpus texts, not the prompts;
    tokenizer; model; training settings; device), so every run directory reuses one teacher."""
    from distill.models import resolve_device
    from distill.tokenizer import tokenizer_hash

    return hash_json(
        {
            "device": resolve_device(recipe.device),  # fp32 on CPUs, bf16 mixed precision on GPUs
            "texts": data.corpus.text_hash,
            "tokenizer": tokenizer_hash(data.tokenizer_dir),
            "model": recipe.teacher.tiny.model_dump(),
            "train": recipe.pretrain.model_dump(exclude=set(BOOKKEEPING)),
            "seq_len": recipe.data.seq_len,
        }
    )[:16]


def embedded_teacher_dir(recipe: RecipeConfig, data: PreparedData) -> Path:
    """<cache>/teachers/<key>/: checkpoints/, final/ (the teacher), teacher.json once it is trained."""
    return recipe.cache_path / "teachers" / teacher_key(recipe, data)
