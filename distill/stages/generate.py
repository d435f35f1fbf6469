"""Stage `generate`: the teacher (vLLM or transformers) writes the teacher store.

The work (prompts to sample from, or corpus blocks to score) is a fixed, ordered list cut into shards of
`generate.items_per_shard`; a shard is one engine call over fixed inputs, so a shard redone after a crash
computes what it would have. Finished shards are recorded in the store manifest and never redone.
`--shard I/N` runs the shards whose index is I modulo N; `distill store merge` joins the results.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.artifacts import hash_json, read_json, sha256_file
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.models import model_fingerprint, resolve_device, resolve_dtype
from distill.run import PreparedData, Run, RunDir
from distill.store import (
    LOGPROB_SCALE,
    STORE_FORMAT,
    TeacherStore,
    id_bits,
    identity_key,
    open_or_create,
    record_shard,
    shard_name,
    write_shard,
)
from distill.teacher import HfTeacher, Item, SampleSettings, VllmTeacher
from distill.tokenizer import load_tokenizer, tokenizer_hash
from distill.vllm.engine import teacher_engine_args


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise DistillError(f"--shard {text!r}: expected I/N, e.g. 0/4") from exc
    if count < 1 or not 0 <= index < count:
        raise DistillError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def for_split(recipe: RecipeConfig, split: str) -> RecipeConfig:
    """The recipe as the generate stage uses it for `split`: the held-out (validation) store is always
    the teacher scoring `generate.validation_sequences` validation blocks, whatever the train store does."""
    if split == "train":
        return recipe
    if split == "heldout":
        if recipe.data.prompts is None or not recipe.data.heldout_prompts:
            raise DistillError(
                "--split heldout: the teacher answers the held-out data.prompts, and there are none"
            )
        return recipe.model_copy(update={"generate": recipe.generate.model_copy(update={"mode": "sample"})})
    if split != "validation":
        raise DistillError(f"--split {split!r}: expected train, validation or heldout")
    g = recipe.generate.model_copy(
        update={"mode": "score", "num_sequences": recipe.generate.validation_sequences}
    )
    return recipe.model_copy(update={"generate": g})


@dataclass
class Work:
    """What generate captures: the ordered items, a description of their source (for the store identity)
    and, in score mode on given responses, each item's first scored position (None: all of them)."""

    items: list[Item]
    source: dict
    starts: list[int] | None = None


def work_items(recipe: RecipeConfig, data: PreparedData, split: str = "train") -> Work:
    """The ordered work list of `split`, and where it comes from."""
    cap = recipe.generate.num_sequences
    if data.prompt_set is not None and split in ("train", "heldout"):
        return prompt_set_items(recipe, data, cap if split == "train" else None, split)
    if recipe.generate.mode == "sample":
        path = data.corpus.root / "prompts.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tokenizer = load_tokenizer(data.tokenizer_dir)
        items = [(r["id"], tokenizer(r["text"])["input_ids"]) for r in rows[:cap]]
        source = {"kind": "prompts", "file": str(path), "sha256": sha256_file(path), "items": len(items)}
    else:
        path = data.tokens_dir / f"{split}.npy"
        tokens = np.load(path, mmap_mode="r")
        seq_len = recipe.data.seq_len
        blocks = len(tokens) // seq_len if cap is None else min(cap, len(tokens) // seq_len)
        items = [
            (f"b{i:07d}", tokens[i * seq_len : (i + 1) * seq_len].astype(np.int64).tolist())
            for i in range(blocks)
        ]
        source = {
            "kind": "corpus blocks",
            "file": str(path),
            "sha256": sha256_file(path),
            "items": len(items),
            "seq_len": seq_len,
        }
    if not items:
        raise DistillError(f"generate: nothing to do, the {source['kind']} in {path} are empty")
    return Work(items, source)


def prompt_set_items(recipe: RecipeConfig, data: PreparedData, cap: int | None, split: str = "train") -> Work:
    """The work list of a data.prompts set: prompts formatted with the teacher's chat template (sample
    mode), or prompt + given response, the teacher scoring the response's positions (score mode:
    the positions before a response are not scored)."""
    from distill.prompts import PromptSet, encode

    prompts = PromptSet(data.prompt_set)
    rows = prompts.rows(split)[:cap]
    tokenizer = load_tokenizer(data.tokenizer_dir)
    items, starts = [], []
    for row in rows:
        prompt, response = encode(row, tokenizer)
        if recipe.generate.mode == "sample":
            items.append((row["id"], prompt))
        elif response is None:
            raise DistillError(
                f"generate.mode: score scores the responses data.prompts gives, and row {row['id']} of "
                f"{recipe.data.prompts} has none (use generate.mode: sample, or a set with responses)"
            )
        else:
            items.append((row["id"], prompt + response))
            starts.append(len(prompt) - 1)
    path = prompts.root / ("prompts.jsonl" if split == "train" else "heldout.jsonl")
    template = getattr(tokenizer, "chat_template", None) if recipe.data.chat else None
    source = {
        "kind": "prompt set",
        "file": str(path),
        "sha256": sha256_file(path),
        "items": len(items),
        "chat_template": hash_json(template) if template else None,
    }
    if not items:
        raise DistillError(f"generate: nothing to do, the prompt set {path} is empty")
    return Work(items, source, starts or None)


# NOTE: scoring speed on 2 CPU cores, fp32 (parameters, transformers tokens/s, vLLM tokens/s), measured on
# an 18.5 M-parameter Llama (bench/results/teacher_capture.json) and SmolLM2-135M (real_teacher.json), and
# vLLM's start (the larger of the two). Time per token is taken as linear in the parameters through these
# points; vLLM scores a little faster per token at both, so its start decides: see docs/teacher.md.
CPU_SCORE_SPEED = ((18_487_680, 3168.0, 3544.0), (134_515_008, 415.0, 488.0))
VLLM_CPU_START_S = 27.0


def cpu_score_seconds(parameters: int, tokens: int) -> tuple[float, float]:
    """Estimated seconds to score `tokens` on CPU: (transformers, vLLM with its start)."""
    (p0, hf0, vl0), (p1, hf1, vl1) = CPU_SCORE_SPEED
    at = (parameters - p0) / (p1 - p0)

    def per_token(a: float, b: float) -> float:
        return max(1 / a + at * (1 / b - 1 / a), 1e-6)

    return tokens * per_token(hf0, hf1), VLLM_CPU_START_S + tokens * per_token(vl0, vl1)


def choose_backend(recipe: RecipeConfig, model: Path, device: str, items: list[Item]) -> tuple[str, str]:
    """The engine that captures this job, and why: `teacher.backend` when it names one; for `auto`, vLLM on
    GPUs, for sampling, and whenever its engine is already up (kept from this run's other store); for
    scoring on CPU, whichever cpu_score_seconds expects to finish first; transformers without vLLM.
    Decided on the whole split, so every `--shard I/N` job of it decides alike."""
    from importlib.util import find_spec

    from distill.models import stored_parameters
    from distill.vllm.engine import engine_kept

    if recipe.teacher.backend != "auto":
        return recipe.teacher.backend, f"teacher.backend: {recipe.teacher.backend}"
    if find_spec("vllm") is None:
        return "hf", "vLLM is not installed"
    if device != "cpu":
        return "vllm", f"on {device}"
    if recipe.generate.mode == "sample":
        return "vllm", "sampling on CPU, 2-3x the tokens/s of transformers"
    try:
        kept = engine_kept(teacher_engine_args(recipe, model))
    except DistillError:  # engine arguments vLLM would refuse: not an engine that is running
        kept = False
    if kept:
        return "vllm", "its engine is already running"
    tokens = sum(len(ids) for _, ids in items)
    parameters = stored_parameters(model) or CPU_SCORE_SPEED[-1][0]
    hf, vllm = cpu_score_seconds(parameters, tokens)
    why = (
        f"scoring {tokens:,} tokens with {parameters / 1e6:.1f} M parameters on CPU: about {hf:.0f} s in "
        f"transformers, {vllm:.0f} s in vLLM with its start"
    )
    return ("hf" if hf <= vllm else "vllm"), why


def store_identity(
    recipe: RecipeConfig,
    model: Path,
    data: PreparedData,
    source: dict,
    vocab: int,
    dtype: str,
    backend: str,
) -> dict:
    g = recipe.generate
    capture = {"backend": backend, "dtype": dtype, "items_per_shard": g.items_per_shard}
    if g.mode == "sample":
        capture.update(
            samples_per_prompt=g.samples_per_prompt,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
        )
    teacher = {k: v for k, v in model_fingerprint(model, recipe.cache_path).items() if k != "path"}
    return {  # content only: where the inputs lie is `made_from`, so a moved cache keeps its stores
        "mode": g.mode,
        "k": g.top_k,
        "vocab_size": vocab,
        "teacher": teacher,
        "tokenizer_hash": tokenizer_hash(data.tokenizer_dir)
        if (data.tokenizer_dir / "tokenizer.json").exists()
        else None,
        "source": {k: v for k, v in source.items() if k != "file"},
        "capture": capture,
        "encoding": {"format": STORE_FORMAT, "id_bits": id_bits(vocab), "logprob_scale": LOGPROB_SCALE},
    }


def make_teacher(recipe: RecipeConfig, model: Path, device: str, dtype: str, backend: str):
    k = recipe.generate.top_k
    if backend == "hf":
        max_len = recipe.generate.engine.get("max_model_len")
        return HfTeacher(
            str(model), k, device, resolve_dtype(dtype, device), recipe.generate.batch_size, max_len
        )
    return VllmTeacher(teacher_engine_args(recipe, model), k)


def generate(
    run: Run,
    shard: tuple[int, int] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    split: str = "train",
) -> TeacherStore:
    """Capture the teacher into a store (default `<run>/teacher`, or `<run>/teacher.shard-I-of-N`;
    `<run>/teacher-validation` for the held-out split)."""
    started = time.perf_counter()
    recipe = for_split(run.recipe, split)
    g = recipe.generate
    data, model = run.data, run.teacher
    device = resolve_device(recipe.device)
    # "auto" is bfloat16 on GPUs and float32 on CPUs, decided in one place (models.resolve_dtype)
    dtype = str(resolve_dtype(recipe.teacher.dtype, device)).removeprefix("torch.")
    # The model's own vocabulary (ids the teacher can emit), which may exceed the tokenizer's.
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    work = work_items(recipe, data, split)
    items, source, starts = work.items, work.source, work.starts
    num_shards = math.ceil(len(items) / g.items_per_shard)
    base = {"train": run.store, "validation": run.validation_store, "heldout": run.heldout_store}[split]
    if out is None:
        out = base if shard is None else base.with_name(f"{base.name}.shard-{shard[0]}-of-{shard[1]}")
    if g.top_k > vocab:
        raise DistillError(
            f"generate.top_k={g.top_k} exceeds the teacher's vocabulary ({vocab} tokens, {model / 'config.json'})"
        )
    backend, why = choose_backend(recipe, model, device, items)
    made_with = None if overwrite else _recorded_backend(out)
    if recipe.teacher.backend == "auto" and made_with not in (None, backend):
        backend, why = made_with, f"continuing {out}, which it began"  # so a resumed store stays one store
    if recipe.teacher.backend == "auto":
        name = "vLLM" if backend == "vllm" else "transformers"
        print(f"generate: teacher.backend auto: {name} ({why})", flush=True)
    identity = store_identity(recipe, model, data, source, vocab, dtype, backend)
    made_from = {"teacher": str(model), "source": source["file"], "tokenizer": str(data.tokenizer_dir)}
    manifest = open_or_create(out, identity, num_shards, list(shard) if shard else None, overwrite, made_from)
    key = identity_key(identity)
    mine = [i for i in range(num_shards) if shard is None or i % shard[1] == shard[0]]
    todo = [i for i in mine if not _shard_done(out, manifest, shard_name(i))]
    if todo:
        teacher = make_teacher(recipe, model, device, dtype, backend)
        settings = SampleSettings(g.samples_per_prompt, g.max_new_tokens, g.temperature, g.top_p, g.seed)
        try:
            for i in todo:
                lo = i * g.items_per_shard
                chunk = items[lo : lo + g.items_per_shard]
                if g.mode == "sample":
                    captures = teacher.sample(chunk, settings, lo)
                else:
                    captures = teacher.score(chunk)
                    if starts:
                        first = starts[lo : lo + len(chunk)]
                        captures = [
                            c.from_position(s, len(ids))
                            for c, s, (_, ids) in zip(captures, first, chunk, strict=True)
                        ]
                entry = write_shard(out / shard_name(i), captures, identity["encoding"]["id_bits"], key)
                record_shard(
                    out, manifest, shard_name(i), {"index": i, "items": [lo, lo + len(chunk)], **entry}
                )
                print(
                    f"generate: {shard_name(i)} ({len(todo) - todo.index(i) - 1} left), {entry['rows']} rows, "
                    f"{entry['bytes'] / max(entry['positions'], 1):.1f} bytes/token",
                    flush=True,
                )
        finally:
            teacher.close()
    store = TeacherStore(out)
    stage = "generate" if split == "train" else f"generate-{split}"
    run.manifest.record(
        stage if shard is None else f"{stage}.shard-{shard[0]}-of-{shard[1]}",
        "done",
        hash_json(identity),
        {
            "store": str(out),
            **{k: v for k, v in store.summary().items() if k in ("rows", "positions", "bytes_per_token")},
        },
        time.perf_counter() - started,
    )
    return store


def _recorded_backend(root: Path) -> str | None:
    """The engine that captured the shards already in the store at `root` (None: no shard yet)."""
    path = root / "manifest.json"
    if not path.exists():
        return None
    manifest = read_json(path)
    return manifest["identity"].get("capture", {}).get("backend") if manifest.get("shards") else None


def _shard_done(root: Path, manifest: dict, name: str) -> bool:
    """Recorded in the manifest and intact on disk (a damaged shard is redone)."""
    entry = manifest["shards"].get(name)
    path = root / name
    if entry is None or not path.is_file():
        return False
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        print(f"generate: {path} fails its checksum; redoing it", flush=True)
        del manifest["shards"][name]
        return False
    return True


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage): the teacher store, and the
    held-out store when generate.validation_sequences asks for one."""
    from distill.stages import Stage, dump

    layout = RunDir(recipe.run_dir)
    roots = [layout.store] + ([layout.validation_store] if recipe.generate.validation_sequences else [])
    answers_heldout = recipe.data.prompts is not None and recipe.data.heldout_prompts > 0
    if answers_heldout:
        roots.append(layout.heldout_store)

    def go(ctx, redo: bool) -> dict:
        from distill.vllm.engine import kept_engines

        run = ctx.run()
        with kept_engines():  # one teacher engine for both stores when their engine arguments agree
            out = {"store": str(generate(run, overwrite=redo).root)}
            if recipe.generate.validation_sequences:
                out["validation_store"] = str(generate(run, overwrite=redo, split="validation").root)
            if answers_heldout:
                out["heldout_store"] = str(generate(run, overwrite=redo, split="heldout").root)
        return out

    def intact_stores(ctx) -> list[Path] | None:
        """The stores' manifests if every shard matches them; None sends generate back to work (it redoes
        what is damaged or missing and keeps the rest)."""
        for root in roots:
            if not (root / "manifest.json").exists():
                return None
            problem = TeacherStore(root).problem()
            if problem:
                ctx.log(f"generate: {problem}")
                return None
        return [root / "manifest.json" for root in roots]

    def plan(ctx) -> list[str]:
        model = recipe.teacher.model or "the pretrained tiny teacher"
        backend = recipe.teacher.backend
        if backend == "auto" and (recipe.generate.mode == "sample" or resolve_device(recipe.device) != "cpu"):
            backend = "vllm"
        if backend == "hf":
            return [f"distill generate {layout.recipe_file}   (transformers on {model}, in process)"]
        engine = json.dumps(dict(recipe.generate.engine))
        if backend == "auto":  # scoring on CPU: the teacher's and the job's sizes decide (choose_backend)
            return [
                f"distill generate {layout.recipe_file}   (transformers or vllm.LLM, whichever is expected "
                f"to finish first, on {model}, engine {engine}, in process)"
            ]
        return [f"distill generate {layout.recipe_file}   (vllm.LLM on {model}, engine {engine}, in process)"]

    reads_no_store = recipe.train.mode == "on_policy" and recipe.train.on_policy.lmbda >= 1.0
    return [
        Stage(
            "generate",
            {"teacher": dump(recipe.teacher), "generate": dump(recipe.generate)},
            run=go,
            outputs=intact_stores,
            plan=plan,
            off="train.mode on_policy with lmbda 1 reads no store" if reads_no_store else None,
        )
    ]
