"""Stage `train`: train the student on the corpus token blocks.

Today this is the SFT baseline (train.loss=ce); the distillation losses arrive with the teacher store.
"""

from __future__ import annotations

import shutil
import time

from distill.artifacts import RunManifest, hash_json
from distill.config import LoraConfig, RecipeConfig
from distill.errors import DistillError, NotImplementedYet
from distill.models import build_tiny_llama, check_model_dir, load_causal_lm
from distill.prepare import prepare
from distill.store import TeacherStore
from distill.tokenizer import load_tokenizer, tokenizer_hash
from distill.train import TrainJob, TrainResult, train


def train_student(
    recipe: RecipeConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> TrainResult:
    if recipe.train.mode != "offline":
        raise NotImplementedYet(f"train.mode={recipe.train.mode}")
    if recipe.train.distributed.backend != "none":
        raise NotImplementedYet("distributed student training (train.distributed.backend)")
    started = time.perf_counter()
    if recipe.student.model:  # fail on a bad path before any data work
        check_model_dir(recipe.student.model, "student.model")
    # KD reads the teacher store; the SFT baseline (ce) trains on the same sequences when a store exists,
    # so the two students are comparable, and on the corpus blocks otherwise.
    store_dir = recipe.run_dir / "teacher"
    use_store = recipe.train.loss != "ce" or (store_dir / "manifest.json").exists()
    if use_store:
        check_store_matches_student(recipe)
    data = prepare(recipe)
    out_dir = recipe.run_dir / "student"
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)

    def build():
        import torch

        if recipe.student.model:
            model = load_causal_lm(
                recipe.student.model, "student.model", torch.float32, recipe.student.trust_remote_code
            )
        else:
            model = build_tiny_llama(
                recipe.student.tiny, load_tokenizer(data.tokenizer_dir), seed=recipe.train.seed
            )
        return with_lora(model, recipe.student.lora) if recipe.student.lora else model

    job = TrainJob.from_recipe(
        recipe,
        "student",
        recipe.train,
        data,
        out_dir,
        build,
        resume=resume,
        progress=progress,
        store=store_dir if use_store else None,
    )
    result = train(job)
    RunManifest(recipe.run_dir).record(
        "train",
        "done",
        hash_json({"train": recipe.train.model_dump(), "student": recipe.student.model_dump()}),
        {"student": str(result.final_dir), "val_loss": result.val_loss, "steps": result.steps},
        time.perf_counter() - started,
    )
    return result


def student_vocab_size(recipe: RecipeConfig) -> tuple[int, str]:
    """The student's vocabulary and the field it comes from."""
    import json

    if recipe.student.model:
        path = check_model_dir(recipe.student.model, "student.model")
        return json.loads((path / "config.json").read_text())["vocab_size"], "student.model"
    return len(load_tokenizer(prepare(recipe).tokenizer_dir)), "the student's tokenizer"


def check_store_matches_student(recipe: RecipeConfig) -> TeacherStore:
    """Refuse, before any training, a teacher store the student cannot learn from."""
    store = TeacherStore(recipe.run_dir / "teacher")
    store.require_complete()
    vocab, what = student_vocab_size(recipe)
    store.check_vocab(vocab, what)
    made_with = store.manifest["identity"].get("tokenizer_hash")
    tokenizer_dir = student_tokenizer_dir(recipe)
    if made_with and tokenizer_hash(tokenizer_dir) != made_with:
        raise DistillError(
            f"teacher store {store.root} was made with another tokenizer than the student's ({tokenizer_dir}): "
            "the same ids would mean different tokens; regenerate the store or give the student the teacher's tokenizer"
        )
    return store


def student_tokenizer_dir(recipe: RecipeConfig):
    """The student's own tokenizer when its directory has one, else the run's (data.tokenizer or the teacher's)."""
    from pathlib import Path

    if recipe.student.model and (Path(recipe.student.model) / "tokenizer.json").exists():
        return Path(recipe.student.model)
    return prepare(recipe).tokenizer_dir


def with_lora(model, cfg: LoraConfig):
    """Wrap `model` in PEFT LoRA adapters; only the adapters train. Unknown target modules are refused."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        linear = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Linear")
        have = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise DistillError(
            f"student.lora.target_modules: {', '.join(missing)} not in the model (its linear layers: {', '.join(have)})"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
