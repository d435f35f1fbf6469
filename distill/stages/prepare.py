"""Stage `prepare`: corpus, tokenizer and token arrays for a recipe (all cached by content hash)."""

from __future__ import annotations

import time
from pathlib import Path

from distill.artifacts import atomic_write_text, ensure_writable_dir, hash_json
from distill.config import RecipeConfig, recipe_to_yaml
from distill.corpus import Corpus, prepare_corpus
from distill.errors import DistillError
from distill.models import check_model_dir
from distill.run import PreparedData, RunDir
from distill.tokenizer import tokenize_corpus, train_tokenizer


def resolve_tokenizer_dir(recipe: RecipeConfig, corpus: Corpus) -> Path:
    """data.tokenizer if set; else the teacher's own tokenizer; else one trained on the corpus."""
    if recipe.data.tokenizer:
        return check_model_dir_or_tokenizer(recipe.data.tokenizer, "data.tokenizer")
    if recipe.teacher.model:
        return check_model_dir(recipe.teacher.model, "teacher.model")
    max_len = recipe.teacher.tiny.max_position_embeddings if recipe.teacher.tiny else 4096
    return train_tokenizer(corpus, recipe.data.vocab_size, recipe.cache_path, model_max_length=max_len)


def check_model_dir_or_tokenizer(path: str, field: str) -> Path:
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise DistillError(f"{field}: no tokenizer at {p} (expected tokenizer.json)")
    return p


def prepare(recipe: RecipeConfig) -> PreparedData:
    """Build or reuse the corpus, tokenizer, tokens and prompt set; write the run's resolved recipe and
    record them in its manifest. The one stage that takes the recipe: the run's other inputs come after
    it. Prompts distill cannot use are refused before the run directory is written."""
    started = time.perf_counter()
    chat = recipe.data.prompts is not None and recipe.data.chat
    if chat and recipe.teacher.tiny is not None and recipe.data.tokenizer is None:
        raise DistillError(
            "data.chat: the prompts are chat messages, and the tokenizer distill trains for teacher.tiny has "
            "no chat template (set data.chat: false, or data.tokenizer to one with a template)"
        )
    ensure_writable_dir(recipe.cache_path, "cache directory")
    corpus = prepare_corpus(recipe.data, recipe.cache_path)
    tokenizer_dir = resolve_tokenizer_dir(recipe, corpus)
    prompt_set = None
    if recipe.data.prompts is not None:
        from distill.prompts import check_chat_template, prepare_prompts
        from distill.tokenizer import load_tokenizer

        if chat:
            check_chat_template(load_tokenizer(tokenizer_dir), str(tokenizer_dir))
        prompt_set = prepare_prompts(recipe.data, corpus.texts("train"), recipe.cache_path).root
    run = RunDir(ensure_writable_dir(recipe.run_dir, "run directory"))
    atomic_write_text(run.recipe_file, recipe_to_yaml(recipe))
    tokens_dir = tokenize_corpus(corpus, tokenizer_dir, recipe.cache_path)
    data = PreparedData(corpus, tokenizer_dir, tokens_dir, prompt_set)
    summary = data.summary()
    run.manifest.record(
        "prepare", "done", hash_json(recipe.data.model_dump()), summary, time.perf_counter() - started
    )
    return data


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage)."""
    from distill.stages import Stage, dump

    recipe_file = RunDir(recipe.run_dir).recipe_file
    return [
        Stage(
            "prepare",
            {"data": dump(recipe.data), "tokenizer_from": recipe.teacher.model},
            run=lambda ctx, redo: ctx.prepared().data.summary(),
            outputs=lambda ctx: [recipe_file],
            plan=lambda ctx: [f"distill prepare {recipe_file}"],
        )
    ]
