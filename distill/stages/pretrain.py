"""Stage `pretrain`: train the embedded tiny teacher on the corpus (CE), cached by content hash.

The cache key covers the corpus texts (not its sampling prompts), the tokenizer, the model config and the training settings that change
the weights, so a second run (or another run directory) reuses the same teacher.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import atomic_write_json, exclusive, read_json
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.models import build_tiny_llama, count_parameters, resolve_device
from distill.run import PreparedData, Run, RunDir, embedded_teacher_dir, teacher_key
from distill.tokenizer import load_tokenizer
from distill.training.data import TokenBlocks
from distill.training.loop import TrainJob, train
from distill.training.validation import evaluate_loss


@dataclass(frozen=True)
class TeacherSummary:
    path: Path
    parameters: int
    vocab_size: int
    test_loss: float
    uniform_loss: float
    steps: int
    tokens: int
    reused: bool

    @property
    def test_perplexity(self) -> float:
        return math.exp(self.test_loss)


def pretrain(run: Run, resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train (or reuse) the tiny teacher; returns a TeacherSummary. Its model is `<cache>/teachers/<key>/final`."""
    recipe = run.recipe
    if recipe.teacher.tiny is None:
        raise DistillError(
            "teacher.model is set, so there is no teacher to pretrain (pretrain builds teacher.tiny)"
        )
    data = run.data
    started = time.perf_counter()
    key = teacher_key(recipe, data)
    out_dir = embedded_teacher_dir(recipe, data)
    summary_path = out_dir / "teacher.json"
    # Jobs sharing the cache wait for the one pretraining this teacher, then reuse it.
    waiting = f"pretrain: another process is pretraining {out_dir}; waiting for it to finish"
    with exclusive(out_dir.parent / f".{key}.lock", waiting):
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        reused = summary_path.exists()
        if not reused:
            _train_teacher(recipe, data, out_dir, resume, progress)
    summary = TeacherSummary(**{**read_json(summary_path), "path": out_dir / "final", "reused": reused})
    run.manifest.record(
        "pretrain",
        "done",
        key,
        {"teacher": str(summary.path), "test_loss": summary.test_loss, "parameters": summary.parameters},
        time.perf_counter() - started,
    )
    return summary


def _train_teacher(
    recipe: RecipeConfig, data: PreparedData, out_dir: Path, resume: bool, progress: bool
) -> None:
    tokenizer = load_tokenizer(data.tokenizer_dir)
    device = resolve_device(recipe.device)

    def build():
        return build_tiny_llama(recipe.teacher.tiny, tokenizer, seed=recipe.pretrain.seed)

    job = TrainJob.from_recipe(
        recipe, "teacher", recipe.pretrain, data, out_dir, build, resume=resume, progress=progress
    )
    result = train(job)
    test_loss = held_out_loss(result.final_dir, data.tokens_dir / "test.npy", recipe.data.seq_len, device)
    atomic_write_json(
        out_dir / "teacher.json",
        {
            "parameters": count_parameters_of(result.final_dir),
            "vocab_size": len(tokenizer),
            "test_loss": test_loss,
            "uniform_loss": math.log(len(tokenizer)),
            "steps": result.steps,
            "tokens": result.tokens,
        },
    )


def held_out_loss(
    model_dir: Path, tokens_path: Path, seq_len: int, device: str, batch_size: int = 8
) -> float:
    """Mean next-token CE of a saved model over every block of a held-out split."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    blocks = TokenBlocks(tokens_path, seq_len)
    return evaluate_loss(model, blocks, batch_size, max_batches=10**9, device=device)


def count_parameters_of(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return count_parameters(AutoModelForCausalLM.from_pretrained(str(model_dir)))


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage): the embedded teacher, trained or
    reused from the cache, becomes the run's teacher for the stages after it."""
    from distill.stages import Stage, dump, nothing

    def go(ctx, redo: bool) -> dict:
        t = pretrain(ctx.run(teacher=None), resume=True, progress=ctx.progress)
        ctx.set_teacher(t.path)
        ctx.log(
            f"teacher: {t.path}{' (reused from cache)' if t.reused else ''}, held-out loss {t.test_loss:.3f}"
        )
        return {"teacher": str(t.path), "test_loss": t.test_loss, "reused": t.reused}

    recipe_file = RunDir(recipe.run_dir).recipe_file
    return [
        Stage(
            "pretrain",
            {"teacher": dump(recipe.teacher), "pretrain": dump(recipe.pretrain)},
            run=go,
            outputs=nothing,
            plan=lambda ctx: [f"distill pretrain {recipe_file}"],
            off=None if recipe.teacher.tiny else "the teacher is a model directory (teacher.model)",
        )
    ]
