"""Stage `train`: train the student on the teacher store (KD), or with CE on the same sequences (SFT).

One process trains here; `train.distributed` (DDP, DeepSpeed ZeRO-2/3) launches the processes with
`accelerate launch` after the inputs are checked, and each of them comes back through `train`.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import hash_json
from distill.config import LoraConfig, RecipeConfig
from distill.errors import DistillError
from distill.models import build_tiny_llama, check_model_dir, load_causal_lm
from distill.run import Run, RunDir
from distill.store import TeacherStore
from distill.tokenizer import load_tokenizer, tokenizer_hash
from distill.training import loop
from distill.training.checkpoint import check_checkpoints
from distill.training.loop import TrainJob, TrainResult

# A teacher whose weights take at most this much is loaded beside the student for validation (dense
# full-vocabulary KL and top-1 agreement on held-out text); a larger one is measured by `distill eval`.
DENSE_VALIDATION_TEACHER_BYTES = 2 << 30


def heldout_validation(run: Run) -> tuple[dict[str, list[str]], Path | None]:
    """(held-out texts by name, the teacher for dense validation or None) for the training loop: the
    run's teacher if it has one (the embedded teacher only once pretrained; never pretrained for this)."""
    from distill.heldout import outside_documents

    texts = {"val": run.data.corpus.texts("validation"), "outside": [d["text"] for d in outside_documents()]}
    if not texts["outside"]:  # a Python without idlelib: validate on what there is
        del texts["outside"]
    if not run.has_teacher:
        return texts, None
    teacher = run.teacher
    weights = sum(f.stat().st_size for f in teacher.glob("*.safetensors"))
    return texts, (teacher if 0 < weights <= DENSE_VALIDATION_TEACHER_BYTES else None)


@dataclass(frozen=True)
class StudentData:
    """What the student reads with its own tokenizer: the tokenizer, its corpus tokens, and the teacher's
    tokenizer when the two differ (cross-tokenizer distillation; None otherwise)."""

    tokenizer_dir: Path
    tokens_dir: Path
    teacher_tokenizer_dir: Path | None = None


def student_data(run: Run, store_dir: Path | None) -> StudentData:
    """The student's tokenizer and corpus tokens (trained and tokenized once, cached by content), and
    whether it learns across tokenizers from the store at `store_dir`."""
    from distill.tokenizer import tokenize_corpus

    recipe, data = run.recipe, run.data
    tokenizer_dir = run.student_tokenizer
    if tokenizer_dir == data.tokenizer_dir:
        tokens_dir = data.tokens_dir
    else:
        tokens_dir = tokenize_corpus(data.corpus, tokenizer_dir, recipe.cache_path)
    if store_dir is None or recipe.train.cross_tokenizer is None:
        return StudentData(tokenizer_dir, tokens_dir)
    if not crosses_tokenizers(run, store_dir):
        print("train.cross_tokenizer: the student's tokenizer is the teacher's; the same-tokenizer loss runs")
        return StudentData(tokenizer_dir, tokens_dir)
    return StudentData(tokenizer_dir, tokens_dir, teacher_tokenizer_of(run, store_dir))


def teacher_tokenizer_of(run: Run, store_dir: Path) -> Path:
    """The tokenizer the store at `store_dir` was made with: where `distill generate` found it (the
    store's `made_from`), or the run's, whichever holds the one the store names by content hash."""
    manifest = TeacherStore(store_dir).manifest
    made_with = manifest["identity"].get("tokenizer_hash")
    recorded = manifest.get("made_from", {}).get("tokenizer")
    tried = list(dict.fromkeys([*([Path(recorded)] if recorded else []), Path(run.data.tokenizer_dir)]))
    for candidate in tried:
        if (candidate / "tokenizer.json").is_file() and tokenizer_hash(candidate) == made_with:
            return candidate
    raise DistillError(
        f"teacher store {store_dir}: the tokenizer it was made with (sha256 {str(made_with)[:12]}) is not at "
        f"{' nor at '.join(str(t) for t in tried)}; cross-tokenizer distillation reads the teacher's text "
        "through it (regenerate the store, or point data.tokenizer at the teacher's tokenizer)"
    )


def student_stores(run: Run) -> tuple[Path | None, Path | None]:
    """(training store, held-out store), each checked against the student, or None where not used.

    KD reads the teacher store; the SFT baseline (ce) trains on the same sequences when a store exists,
    so the two students are comparable, and on the corpus blocks otherwise. A held-out store
    (`distill generate --split validation`) adds the validation KL to the teacher.
    """
    recipe, store_dir = run.recipe, run.store
    only_sampled = recipe.train.mode == "on_policy" and recipe.train.on_policy.lmbda >= 1.0
    use_store = (store_dir / "manifest.json").exists() or (recipe.train.loss != "ce" and not only_sampled)
    if use_store:
        check_store_matches_student(run, store_dir)
    val_dir = run.validation_store
    # NOTE: the validation store's KL is token by token: not measured across tokenizers
    use_val = (val_dir / "manifest.json").exists() and not crosses_tokenizers(run, val_dir)
    if use_val:
        check_store_matches_student(run, val_dir)
    return (store_dir if use_store else None), (val_dir if use_val else None)


def _preflight(run: Run) -> tuple[Path | None, Path | None, StudentData]:
    from distill.training import hidden

    if run.recipe.student.model:  # fail on a bad path before any training
        check_model_dir(run.recipe.student.model, "student.model")
    hidden.setup(run.recipe.train, run.teacher if run.has_teacher else None, run.recipe.student.model)
    store, val_store = student_stores(run)
    return store, val_store, student_data(run, store)


@contextmanager
def teacher_service(run: Run):
    """The URL of the teacher server on-policy training scores with: the recipe's, the launcher's, or
    one started here (`vllm serve` on loopback) for as long as the block runs. Offline runs get the
    recipe's or launcher's URL if there is one (then they report val_acceptance too), else None."""
    from distill.vllm.client import URL_ENV
    from distill.vllm.engine import teacher_engine_args
    from distill.vllm.server import VllmServer

    recipe = run.recipe
    url = recipe.train.on_policy.teacher_url or os.environ.get(URL_ENV)
    if recipe.train.mode != "on_policy" or url:
        yield url
        return
    with VllmServer(teacher_engine_args(recipe, run.teacher), run.teacher_server_log) as server:
        print(f"teacher server: {server.url} (vllm serve, log {server.log_path})", flush=True)
        yield server.url


def on_policy_source(run: Run, url: str):
    """The student's prompts, the teacher client, and the held-out prompts for val_acceptance."""
    from distill.training.onpolicy import OnPolicySource, Prompts
    from distill.vllm.client import TeacherClient
    from distill.vllm.engine import teacher_engine_args

    recipe, data = run.recipe, run.data
    cfg = recipe.train.on_policy
    tokenizer = load_tokenizer(data.tokenizer_dir)
    args = teacher_engine_args(recipe, run.teacher)
    max_len = args.get("max_model_len") or _max_positions(run.teacher)
    client = TeacherClient(url, recipe.generate.top_k, max_len, retries=cfg.retries)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data.prompt_set is not None:  # data.prompts in the chat template, each cut to its last prompt_tokens
        from distill.prompts import PromptSet, encode

        chats = PromptSet(data.prompt_set)
        prompts = Prompts([encode(r, tokenizer)[0][-cfg.prompt_tokens :] for r in chats.rows("train")])
        held = [encode(r, tokenizer)[0][-cfg.prompt_tokens :] for r in chats.rows("heldout")][
            : cfg.eval_prompts
        ]
        held_out = Prompts(held) if held else None
    else:
        prompts = Prompts.from_corpus(data.corpus.root / "prompts.jsonl", tokenizer, cfg.prompt_tokens)
        held_out = None
    if held_out is None:
        held_out = Prompts.from_blocks(
            data.tokens_dir / "validation.npy", cfg.prompt_tokens, cfg.eval_prompts
        )
    return OnPolicySource(prompts, client, cfg, recipe.train.seed, pad, tokenizer.eos_token_id), held_out.ids


def _max_positions(model_dir: Path) -> int:
    import json

    return json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]


def needs_launch(recipe: RecipeConfig) -> bool:
    """True when the recipe trains distributed and this process is not one that a launcher started."""
    from distill.training.launch import inside_launch

    return recipe.train.distributed.backend != "none" and not inside_launch()


def launch(run: Run, distill_args: list[str], resume: bool, overwrite: bool, dry_run: bool = False) -> int:
    """Check every input here, once, then start the training processes with `accelerate launch`.

    A dry run only prints the command: it needs the recipe, not the models or the store (so the Llama 3
    recipes print theirs on any machine)."""
    from distill.training.launch import run_launch

    recipe = run.recipe
    out_dir = run.output(recipe.train.output)
    if dry_run:
        return run_launch(recipe.train.distributed, distill_args, recipe.cache_path, dry_run)
    _preflight(run)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    check_checkpoints(out_dir, resume)
    from distill.vllm.client import URL_ENV

    # on-policy: one teacher server for the whole run, which every launched process scores with
    with teacher_service(run) as url:
        if url:
            os.environ[URL_ENV] = url
        return run_launch(recipe.train.distributed, distill_args, recipe.cache_path, dry_run)


def train(run: Run, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the run's student (train.output: `student`, or `baseline` for the SFT baseline) in this
    process; a launched process of a distributed run comes here too."""
    started = time.perf_counter()
    recipe, data = run.recipe, run.data
    store, val_store, student = _preflight(run)
    out_dir = run.output(recipe.train.output)
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
                recipe.student.tiny, load_tokenizer(student.tokenizer_dir), seed=recipe.train.seed
            )
        return with_lora(model, recipe.student.lora) if recipe.student.lora else model

    texts, dense_teacher = heldout_validation(run)
    if student.teacher_tokenizer_dir is not None:
        dense_teacher = None  # its KL and top-1 are token by token: not across tokenizers
    from distill.training import hidden

    with teacher_service(run) as url:
        source, held_out = on_policy_source(run, url) if url else (None, None)
        job = TrainJob.from_recipe(
            recipe,
            "student",
            recipe.train,
            data,
            out_dir,
            build,
            resume=resume,
            progress=progress,
            store=store,
            val_store=val_store,
            on_policy=source,
            val_prompts=held_out,
            heldout=texts,
            heldout_teacher=dense_teacher,
            hidden=hidden.setup(recipe.train, run.teacher if run.has_teacher else None, recipe.student.model),
            tokenizer_dir=student.tokenizer_dir,
            tokens_dir=student.tokens_dir,
            teacher_tokenizer_dir=student.teacher_tokenizer_dir,
        )
        result = loop.train(job)
    if is_main_process():
        _keep_cut_record(recipe.student.model, result.final_dir)
        run.manifest.record(
            "train" if recipe.train.output == "student" else f"train-{recipe.train.output}",
            "done",
            hash_json({"train": recipe.train.model_dump(), "student": recipe.student.model_dump()}),
            {
                "student": str(result.final_dir),
                "val_loss": result.val_loss,
                "val_kl": result.val_kl,
                "val_acceptance": result.val_acceptance,
                "start_acceptance": result.start_acceptance,
                "heldout": result.heldout,
                "tail": result.tail,
                "steps": result.steps,
            },
            time.perf_counter() - started,
        )
    return result


def _keep_cut_record(initial: str | None, final_dir: Path) -> None:
    """A student cut from its teacher keeps the record of what was kept (distill-cut.json) beside its
    trained weights."""
    record = Path(initial) / "distill-cut.json" if initial else None
    if record is not None and record.is_file() and (final_dir / "config.json").is_file():
        shutil.copy2(record, final_dir / record.name)


def is_main_process() -> bool:
    """Rank 0 of a launch, or a process that was not launched."""
    return os.environ.get("RANK", "0") == "0"


def student_vocab_size(run: Run) -> tuple[int, str]:
    """The student's vocabulary and the field it comes from."""
    import json

    recipe = run.recipe
    if recipe.student.model:
        path = check_model_dir(recipe.student.model, "student.model")
        return json.loads((path / "config.json").read_text())["vocab_size"], "student.model"
    return len(load_tokenizer(run.student_tokenizer)), "the student's tokenizer"


def check_store_matches_student(run: Run, path: Path | None = None) -> TeacherStore:
    """Refuse, before any training, a teacher store the student cannot learn from."""
    store = TeacherStore(path or run.store)
    store.require_complete()
    if crosses_tokenizers(run, store.root):
        if run.recipe.train.cross_tokenizer is None:
            raise DistillError(
                f"teacher store {store.root} was made with another tokenizer than the student's "
                f"({run.student_tokenizer}): the same ids would mean different tokens; set "
                "train.cross_tokenizer.method=byte (or uld) to distil across tokenizers, regenerate the "
                "store, or give the student the teacher's tokenizer"
            )
        return store  # the student reads the store's text, not its ids
    vocab, what = student_vocab_size(run)
    store.check_vocab(vocab, what)
    return store


def crosses_tokenizers(run: Run, store_dir: Path) -> bool:
    """The store at `store_dir` was made with another tokenizer than the student's."""
    made_with = TeacherStore(store_dir).manifest["identity"].get("tokenizer_hash")
    return bool(made_with) and tokenizer_hash(run.student_tokenizer) != made_with


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


def train_teacher(recipe: RecipeConfig) -> str:
    """What training needs of the teacher: on-policy scores with it (pretrained now if need be); offline
    training validates against it only if it is there already."""
    return "pretrain" if recipe.train.mode == "on_policy" else "ready"


BASELINE_OVERRIDES = ["train.loss=ce", "train.output=baseline", "train.mode=offline", "train.hidden=null"]


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage): the KD student, then the SFT
    baseline (the same student and sequences with CE: pipeline.sft_baseline). Each trains in the
    pipeline's process, or through `accelerate launch` when train.distributed asks."""
    import shlex

    from distill.stages import Stage, dump

    layout = RunDir(recipe.run_dir)
    baseline = recipe.model_copy(
        update={
            "train": recipe.train.model_copy(
                update={"loss": "ce", "output": "baseline", "mode": "offline", "hidden": None}
            )
        }
    )

    def launch_args(extra: list[str]) -> list[str]:
        return ["train", str(layout.recipe_file), *extra, "--resume", "--no-progress"]

    def trainer(recipe_: RecipeConfig, extra: list[str]):
        def go(ctx, redo: bool) -> dict:
            run = ctx.run(train_teacher(recipe_)).with_recipe(recipe_)
            name = recipe_.train.output
            if not needs_launch(recipe_):
                result = train(run, resume=not redo, overwrite=redo, progress=ctx.progress)
                return {"student": str(result.final_dir), "val_loss": result.val_loss, "steps": result.steps}
            status = launch(run, launch_args(extra), resume=True, overwrite=redo)
            if status != 0:
                raise DistillError(f"train ({name}): the launched training exited with {status}")
            if not (run.final(name) / "config.json").exists():
                raise DistillError(
                    f"train ({name}): launched on {recipe_.train.distributed.num_machines} machines; "
                    "rerun `distill run` when they have finished"
                )
            return {"student": str(run.final(name)), "launched": True}

        return go

    def plan(recipe_: RecipeConfig, extra: list[str]):
        def commands(ctx) -> list[str]:
            from distill.training.launch import launch_command

            if recipe_.train.distributed.backend == "none":
                return [shlex.join(["distill", *launch_args(extra)]) + "   (in this process)"]
            return [shlex.join(launch_command(recipe_.train.distributed, launch_args(extra), None))]

        return commands

    return [
        Stage(
            "train",
            {"student": dump(recipe.student), "train": dump(recipe.train)},
            run=trainer(recipe, []),
            outputs=lambda ctx: [layout.student / "config.json"],
            plan=plan(recipe, []),
        ),
        Stage(
            "baseline",
            {"student": dump(recipe.student), "train": dump(baseline.train)},
            run=trainer(baseline, BASELINE_OVERRIDES),
            outputs=lambda ctx: [layout.baseline / "config.json"],
            plan=plan(baseline, BASELINE_OVERRIDES),
            off=None if recipe.pipeline.sft_baseline else "pipeline.sft_baseline is false",
        ),
    ]
