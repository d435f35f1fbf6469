"""The evaluation stage: lm-eval on the teacher and the students with identical settings.

Each model is evaluated through lm-eval's Python API (`simple_evaluate`) with one backend, dtype, batch
size, few-shot count and seed for all. Its raw results land in `runs/<name>/eval/models/<model>/`
(`results.json`, and `samples/<task>.jsonl` with every document's metric values, which the gate's paired
comparison reads); they are reused while the model's files and the evaluation settings are unchanged.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.artifacts import (
    atomic_write_json,
    atomic_write_text,
    hash_json,
    hash_tree,
    read_json,
)
from distill.config import EvalConfig, RecipeConfig
from distill.errors import DistillError
from distill.run import Run, RunDir

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"
LOCAL_TASKS = ("distill_ppl", "distill_outside_ppl", "distill_cloze", "distill_nextword")
MATCH_METRICS = {"kl": False, "top1_agreement": True}  # teacher_match metric: higher is better
BYTES_METRICS = {"byte_agreement": True}  # eval.byte_agreement's, for any tokenizer
GATE_FAILED = 3  # exit status of `distill eval` when the gate fails (0: it passes)


@dataclass(frozen=True)
class EvalModel:
    name: str  # teacher, student, or the name given with --model
    path: Path
    role: str  # teacher | student | quantized | baseline (evaluated, not gated)
    base: str | None = None  # a quantized student's unquantized student


def eval_models(run: Run, extra: dict[str, str] | None = None) -> list[EvalModel]:
    """The teacher, the run's student and any models named on the command line (students too). The named
    ones are checked first: a wrong name or path is refused before the teacher is resolved (or pretrained)."""
    from distill.models import check_causal_lm

    named = []
    for name, path in (extra or {}).items():
        if name == "teacher" or not name.replace("-", "").replace("_", "").isalnum():
            raise DistillError(
                f"--model {name}={path}: the name must be letters, digits, - or _, not 'teacher'"
            )
        named.append(EvalModel(name, check_causal_lm(path, f"--model {name}"), "student"))
    models = [EvalModel("teacher", run.teacher, "teacher")]
    if run.recipe.eval.initial:  # the student before training: shown, not gated
        from distill.models import initial_student

        start = initial_student(run.recipe, run.student_tokenizer, run.serve_dir / "initial-student")
        models.append(EvalModel("initial", start, "baseline"))
    student = run.student
    baseline = run.baseline  # the SFT baseline `distill run` trains: shown, not gated
    if (baseline / "config.json").exists():
        models.append(EvalModel("sft", baseline, "baseline"))
    if (student / "config.json").exists():
        models.append(EvalModel("student", student, "student"))
        for quant in run.quantized_students():  # distill quantize
            models.append(EvalModel(f"student-{quant.name}", quant, "quantized", "student"))
    names = {m.name for m in named}
    models = [m for m in models if m.name not in names] + named
    if not any(m.role in ("student", "quantized") for m in models):
        raise DistillError(
            f"no student to evaluate: {student} does not exist (run `distill train` first, or name one "
            "with --model NAME=DIR)"
        )
    return models


# --------------------------------------------------------------------------- tasks


def bytes_task(source: str) -> str:
    return f"distill_bytes_{source}"


def match_task(source: str) -> str:
    """The task name teacher_match results go under (and gate criteria name)."""
    return f"distill_match_{source}"


def task_manager(cfg: EvalConfig, corpus_dir: Path, outside_dir: Path):
    """lm-eval's TaskManager with our local tasks (eval/tasks) first; lm-eval's own tasks are indexed
    only when the recipe names one (indexing all of them takes seconds)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())
    builtin = any(t not in LOCAL_TASKS for t in cfg.tasks)
    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=builtin,
        metadata={
            "distill_corpus_dir": str(corpus_dir),
            "distill_outside_dir": str(outside_dir),
            "distill_seed": cfg.seed,
        },
    )


class _QuietCustomDataset(logging.Filter):
    """Drop lm-eval's advice to pass dataset kwargs with --metadata: distill passes them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass
class TaskSet:
    """What eval.tasks resolve to: each requested name's leaf tasks (a group such as mmlu has many),
    the leaf Task objects, and the aggregate metrics each group reports."""

    requested: dict[str, list[str]]
    leaves: dict[str, Any]
    group_metrics: dict[str, list[str]]

    def metrics(self, name: str) -> list[str]:
        if name in self.group_metrics:
            return self.group_metrics[name]
        return task_metrics(self.leaves[name])


def load_tasks(cfg: EvalConfig, manager) -> TaskSet:
    """eval.tasks, checked before any model is loaded: unknown names (with the close ones), datasets
    that need the hub while it cannot be reached, gate criteria on a task or metric that is not run."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    for i, name in enumerate(cfg.tasks):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.8)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DistillError(f"eval.tasks[{i}]: unknown lm-eval task {name!r}{hint}")
    hub_tasks = [t for t in cfg.tasks if t not in LOCAL_TASKS]
    if hub_tasks and not os.environ.get("HF_DATASETS_OFFLINE") and not _hub_reachable():
        # fail fast from the local datasets cache instead of retrying a hub that is not there
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    tasks = TaskSet({}, {}, {})
    for name in cfg.tasks:
        try:
            loaded = get_task_dict([name], manager)
        except Exception as exc:
            if name in hub_tasks and os.environ.get("HF_DATASETS_OFFLINE"):
                raise DistillError(
                    f"eval.tasks: {name} needs its dataset from the Hugging Face hub, which cannot be "
                    "reached from here, and it is not in the local datasets cache (HF_DATASETS_CACHE); "
                    f"run once where the hub is reachable, or use the local tasks ({', '.join(LOCAL_TASKS)})"
                ) from exc
            raise DistillError(f"eval.tasks: lm-eval could not load {name}: {exc}") from exc
        leaves = _walk(loaded, tasks.group_metrics)
        tasks.leaves.update(leaves)
        tasks.requested[name] = list(leaves)
    matched = {match_task(source) for source in cfg.teacher_match}
    for i, c in enumerate(cfg.gate.criteria):
        where = f"eval.gate.criteria[{i}]"
        if c.task in matched:
            if c.metric == "kl" and c.min_value is None:
                raise DistillError(
                    f"{where}: the teacher's KL to itself is 0, so kl takes an absolute ceiling (min_value), "
                    "not min_retention or max_drop"
                )
            if c.metric not in MATCH_METRICS:
                raise DistillError(
                    f"{where}.metric: {c.task} produces {', '.join(MATCH_METRICS)}, not {c.metric!r}"
                )
            continue
        if c.task in {bytes_task(source) for source in cfg.teacher_match} and cfg.byte_agreement is not False:
            if c.metric not in BYTES_METRICS:
                raise DistillError(f"{where}.metric: {c.task} produces byte_agreement, not {c.metric!r}")
            continue
        if c.task.startswith(("distill_match_", "distill_bytes_")):
            off = " with eval.byte_agreement false" if c.task.startswith("distill_bytes_") else ""
            raise DistillError(
                f"{where}.task: {c.task!r} is not measured (eval.teacher_match: "
                f"{', '.join(cfg.teacher_match) or 'none'}{off})"
            )
        if c.task not in tasks.leaves and c.task not in tasks.group_metrics:
            raise DistillError(
                f"{where}.task: {c.task!r} is not evaluated (eval.tasks: {', '.join(cfg.tasks)})"
            )
        metrics = tasks.metrics(c.task)
        if c.metric not in metrics:
            produced = ", ".join(metrics) or "no aggregate metric (gate on one of its tasks)"
            raise DistillError(
                f"{where}.metric: {c.task} does not produce {c.metric!r}; it produces {produced}"
            )
    return tasks


def _walk(task_dict: dict, group_metrics: dict[str, list[str]]) -> dict[str, Any]:
    """Leaf tasks of lm-eval's nested task dict; each group's aggregate metrics into `group_metrics`."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            name = getattr(key, "group_name", None) or str(key)
            aggregates = getattr(key, "aggregate_metric_list", None) or []
            group_metrics[name] = [_metric_name(a) for a in aggregates]
            out.update(_walk(value, group_metrics))
        else:
            out[key] = value
    return out


def _metric_name(aggregate) -> str:
    return aggregate["metric"] if isinstance(aggregate, dict) else aggregate.metric


def task_metrics(task) -> list[str]:
    return [m["metric"] for m in task.config.metric_list or []] or list(task.aggregation())


# --------------------------------------------------------------------------- models


def _max_len(cfg: EvalConfig, model: Path) -> int:
    if cfg.max_model_len:
        return cfg.max_model_len
    return int(json.loads((model / "config.json").read_text()).get("max_position_embeddings", 2048))


def make_lm(cfg: EvalConfig, model: EvalModel, url: str | None = None):
    """An lm-eval LM for `model` on the recipe's backend (built once, used for every task)."""
    from lm_eval.api.registry import get_model

    from distill.models import resolve_device, resolve_dtype
    from distill.vllm.engine import engine_kwargs

    device = resolve_device("auto")
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    if cfg.backend == "hf":
        args = {"pretrained": str(model.path), "dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        return get_model("hf").create_from_arg_obj(args, {"batch_size": cfg.batch_size, "device": device})
    if cfg.backend == "vllm":
        args = engine_kwargs(str(model.path), max_model_len=_max_len(cfg, model.path), seed=cfg.seed)
        args["pretrained"] = args.pop("model")
        args.setdefault("dtype", dtype)
        args["trust_remote_code"] = cfg.trust_remote_code
        return get_model("vllm").create_from_arg_obj(args, {"batch_size": cfg.batch_size})
    # local-completions: a running OpenAI-compatible server answers for this model
    args = {
        "base_url": f"{url.rstrip('/')}/v1/completions",
        "model": served_model(url),
        "tokenizer": str(model.path),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": _max_len(cfg, model.path),
        "num_concurrent": 1,
        "max_retries": 3,
        "seed": cfg.seed,
    }
    return get_model("local-completions").create_from_arg_obj(args, {"batch_size": cfg.batch_size})


def served_model(url: str) -> str:
    """The name the server at `url` serves its (first) model under (`/v1/models`)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=30) as resp:
            return json.load(resp)["data"][0]["id"]
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise DistillError(
            f"eval.servers: no OpenAI-compatible model list at {url}/v1/models ({exc})"
        ) from exc


@contextmanager
def model_server(cfg: EvalConfig, model: EvalModel, log_dir: Path):
    """local-completions: the URL of the model's server, from eval.servers or a `vllm serve` started
    for this model until the block ends. Other backends: None."""
    if cfg.backend != "local-completions":
        yield None
        return
    if model.name in cfg.servers:
        yield cfg.servers[model.name]
        return
    from distill.vllm.engine import engine_kwargs
    from distill.vllm.server import VllmServer

    args = engine_kwargs(str(model.path), max_model_len=_max_len(cfg, model.path), seed=cfg.seed)
    args["trust_remote_code"] = cfg.trust_remote_code
    with VllmServer(args, log_dir / f"server-{model.name}.log") as server:
        yield server.url


def close_lm(lm) -> None:
    """Stop a vLLM backend's engine now (left to interpreter exit it can abort the process)."""
    from distill.vllm.engine import shutdown_engine

    engine = getattr(lm, "model", None)
    if engine is not None and hasattr(engine, "llm_engine"):
        shutdown_engine(engine)


# --------------------------------------------------------------------------- running


def settings_of(cfg: EvalConfig, corpus_hash: str) -> dict:
    """Everything besides the model that the numbers depend on: a change re-evaluates."""
    import importlib.metadata as md

    return {
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "bootstrap_iters": cfg.bootstrap_iters,
        "max_model_len": cfg.max_model_len,
        "tasks": list(cfg.tasks),
        "local_tasks": hash_tree(TASKS_DIR),
        "corpus": corpus_hash,
        "lm_eval": md.version("lm_eval"),
    }


def evaluate_lm(lm, cfg: EvalConfig, manager, tasks: TaskSet) -> dict:
    """lm-eval over every task; rolling-loglikelihood tasks (perplexity) without the tokenizer's BOS,
    since lm-eval's rolling windows start with one already."""
    import lm_eval

    def is_rolling(name):
        return all(
            tasks.leaves[leaf].OUTPUT_TYPE == "loglikelihood_rolling" for leaf in tasks.requested[name]
        )

    rolling = [n for n in tasks.requested if is_rolling(n)]
    others = [n for n in tasks.requested if n not in rolling]
    api = cfg.backend == "local-completions"
    merged: dict[str, Any] = {"results": {}, "samples": {}, "higher_is_better": {}, "n-samples": {}}
    for names, bos in ((rolling, False), (others, True if api else None)):
        if not names:
            continue
        lm.add_bos_token = bos
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            bootstrap_iters=cfg.bootstrap_iters,
            log_samples=True,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
        for key in ("results", "samples", "higher_is_better", "n-samples"):
            merged[key].update(out.get(key, {}))
    return merged


@dataclass
class TeacherMatch:
    """eval.teacher_match: each model's full-vocabulary KL to the teacher and top-1 agreement on held-out
    documents (distill.heldout), as lm-eval-shaped results under distill_match_<source>, so the gate,
    the report and the paired comparisons read them like any task; with eval.byte_agreement, the share
    of the teacher's text bytes each model predicts under distill_bytes_<source>. A model with another
    tokenizer than the teacher's gets the byte agreement only: its token ids are not the teacher's."""

    teacher: Path
    docs: dict[str, Any]  # source -> heldout.Documents
    batch_size: int
    trust_remote_code: bool = False
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # source -> (prompt, continuation)
    _teacher_model: Any = None
    _device: str = "cpu"

    @classmethod
    def build(
        cls, cfg: EvalConfig, teacher: Path, texts: dict[str, list[str]], agreement: bool = False
    ) -> TeacherMatch:
        from transformers import AutoTokenizer

        from distill.heldout import Documents, require_outside

        tokenizer = AutoTokenizer.from_pretrained(str(teacher), trust_remote_code=cfg.trust_remote_code)
        if "outside" in cfg.teacher_match:
            require_outside(texts["outside"], "eval.teacher_match")
        docs = {
            source: Documents.encode(
                texts[source], tokenizer, cfg.teacher_match_tokens, cfg.teacher_match_documents
            )
            for source in cfg.teacher_match
            if source != "instructions"
        }
        if "instructions" in cfg.teacher_match:  # the teacher's answers to the held-out prompts
            docs["instructions"] = Documents.responses(texts["instructions"], tokenizer)
        match = cls(teacher, docs, cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
        if agreement:
            match.pairs = match._agreement_pairs(tokenizer, cfg.teacher_match_tokens)
        return match

    def _agreement_pairs(self, tokenizer, tokens: int) -> dict[str, list[tuple[str, str]]]:
        """Per source, (prompt, continuation) texts: a document's first tokens/2 tokens and the teacher's
        greedy continuation to `tokens`, or a held-out prompt and the teacher's answer; each cut at the
        teacher's first special token, spelled byte for byte (special tokens as their text, as a
        cross-tokenizer student read them in training)."""
        from distill.acceptance import teacher_continuations
        from distill.crosstok import token_bytes

        spelled = token_bytes(tokenizer, "teacher")
        specials = set(tokenizer.all_special_ids)

        def text(ids: list[int]) -> str:
            return b"".join(spelled[i] for i in ids).decode("utf-8", errors="replace")

        def upto_special(ids: list[int]) -> list[int]:
            return next((ids[:n] for n, i in enumerate(ids) if i in specials), ids)

        half = tokens // 2
        out = {}
        for source, docs in self.docs.items():
            if docs.starts is not None:  # the teacher's answers, as stored
                raw = [(ids[: s + 1], ids[s + 1 :]) for ids, s in zip(docs.ids, docs.starts, strict=True)]
            else:
                prompts = [ids[:half] for ids in docs.ids if len(ids) > half]
                raw = []
                if prompts:  # greedy, stopping where the teacher would (its EOS, then padding)
                    greedy = teacher_continuations(self.teacher, prompts, tokens - half, 0.0,
                                                   batch_size=self.batch_size, ignore_eos=False)  # fmt: skip
                    raw = [(p, greedy.tokens[i, half:].tolist()) for i, p in enumerate(prompts)]
                    _free_accelerator_memory()
            bos = tokenizer.bos_token_id
            pairs = [(text(p[1:] if p and p[0] == bos else p), text(upto_special(c))) for p, c in raw]
            out[source] = [(p, c) for p, c in pairs if p and c]
            if not out[source]:
                raise DistillError(
                    f"eval.byte_agreement: no {source} document has a prompt and a continuation to measure "
                    f"(more than eval.teacher_match_tokens/2 = {half} tokens, prompt text besides BOS, a "
                    "continuation before the teacher's first special token): change eval.teacher_match_tokens, "
                    "or set eval.byte_agreement: false"
                )
        return out

    def _load(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from distill.models import resolve_device

        device = resolve_device("auto")
        # NOTE: fp32 on CPUs, bf16 on GPUs: the log-softmax and the KL are taken in fp32 either way.
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        extra = {}
        if "quantization_config" in json.loads((Path(path) / "config.json").read_text()):
            from transformers.utils.quantization_config import CompressedTensorsConfig

            # a compressed-tensors student, decompressed to float: its quantized weights, float arithmetic
            extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=self.trust_remote_code, **extra
        )
        return model.to(device).eval(), device

    def results(self, model: EvalModel) -> dict[str, dict]:
        """{"results", "higher_is_better", "samples"} for `model`, one task per source and measure."""
        from distill.heldout import byte_agreement, measure
        from distill.tokenizer import load_tokenizer, other_vocabulary

        out: dict[str, dict] = {"results": {}, "higher_is_better": {}, "samples": {}}
        if self._teacher_model is None and (self.pairs or model.role != "teacher"):
            self._teacher_model, self._device = self._load(self.teacher)
        lm, device = self._teacher_model, self._device
        if model.role != "teacher":
            lm = self._load(model.path)[0]
        if model.role == "teacher" or not other_vocabulary(model.path, self.teacher):
            for source, docs in self.docs.items():
                if model.role == "teacher":  # the teacher against itself, by definition
                    per_doc = {"kl": [0.0] * len(docs.ids), "top1": [1.0] * len(docs.ids)}
                else:
                    per_doc = measure(lm, self._teacher_model, docs, self.batch_size, device)
                rows = [
                    {"doc_id": i, "kl": kl, "top1_agreement": top1}
                    for i, (kl, top1) in enumerate(zip(per_doc["kl"], per_doc["top1"], strict=True))
                ]
                _add_task(out, match_task(source), rows, MATCH_METRICS)
        if self.pairs:
            tokenizer = load_tokenizer(model.path)
            context = min(getattr(lm.config, "max_position_embeddings", 2048), 2048)
            for source, pairs in self.pairs.items():
                if not pairs:
                    continue
                per = byte_agreement(lm, tokenizer, pairs, context, device)
                rows = [
                    {"doc_id": i, "byte_agreement": a / b, "bytes": b}
                    for i, (a, b) in enumerate(zip(per["agreed"], per["bytes"], strict=True))
                ]
                _add_task(out, bytes_task(source), rows, BYTES_METRICS)
        if model.role != "teacher":
            del lm
            _free_accelerator_memory()
        return out


def _add_task(out: dict[str, dict], task: str, rows: list[dict], metrics: dict[str, bool]) -> None:
    """Per-document rows as an lm-eval-shaped task: each metric's mean over documents and its stderr."""
    row: dict[str, Any] = {"alias": task}
    for metric in metrics:
        values = [r[metric] for r in rows]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        row[f"{metric},none"] = mean
        row[f"{metric}_stderr,none"] = math.sqrt(var / len(values))
    out["results"][task] = row
    out["higher_is_better"][task] = dict(metrics)
    out["samples"][task] = rows


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():  # the next model's vLLM engine checks free GPU memory at start
        torch.cuda.empty_cache()


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def sample_rows(samples: list[dict], metrics: list[str]) -> list[dict]:
    """Per document: its id, hash and the per-document value of each metric (for paired comparisons)."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        row = {"doc_id": s["doc_id"], "doc_hash": s.get("doc_hash")}
        row.update({m: _jsonable(s[m]) for m in metrics if m in s})
        rows.append(row)
    return rows


def evaluate_model(
    model: EvalModel,
    cfg: EvalConfig,
    settings: dict,
    manager,
    tasks,
    out_root: Path,
    cache_dir: Path,
    url=None,
    match: TeacherMatch | None = None,
) -> dict:
    """The model's results: reused from `out_root/<name>` when its files and the settings match, else
    evaluated now and written there (samples first, results.json last: a kill leaves no half result)."""
    from distill.models import model_fingerprint

    fingerprint = model_fingerprint(model.path, cache_dir)
    key = results_key(fingerprint, settings)
    out = out_root / model.name
    done = reusable(out, key)
    if done is not None:
        return done
    started = time.perf_counter()
    lm = make_lm(cfg, model, url)
    try:
        raw = evaluate_lm(lm, cfg, manager, tasks)
    finally:
        close_lm(lm)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, samples in raw["samples"].items():
        rows = sample_rows(samples, tasks.metrics(name) if name in tasks.leaves else [])
        atomic_write_text(out / "samples" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    match_error = None
    try:
        matched = match.results(model) if match is not None else None
    except Exception as exc:  # noqa: BLE001 - a criterion on these metrics then fails closed, naming it
        matched, match_error = None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if matched is not None:
        raw["results"].update(matched["results"])
        raw["higher_is_better"].update(matched["higher_is_better"])
        for name, rows in matched["samples"].items():
            atomic_write_text(out / "samples" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    record = {
        "key": key if match_error is None else None,  # a failed teacher match is retried next time
        "model": {"name": model.name, "role": model.role, "base": model.base, **fingerprint},
        "settings": settings,
        "results": _jsonable_tree(raw["results"]),
        "higher_is_better": raw["higher_is_better"],
        "n_samples": raw["n-samples"],
        "seconds": time.perf_counter() - started,
        "teacher_match_error": match_error,
    }
    atomic_write_json(out / "results.json", record)
    record["reused"] = False
    return record


def results_key(fingerprint: dict, settings: dict) -> str:
    """What a model's results depend on: its config and weights (by content, not path) and the settings."""
    return hash_json(
        {"config": fingerprint["config_hash"], "weights": fingerprint["weights_hash"], **settings}
    )


def reusable(out: Path, key: str) -> dict | None:
    """The results written to `out` for `key` (marked reused), or None."""
    if (out / "results.json").exists():
        done = read_json(out / "results.json")
        if done.get("key") == key:
            return {**done, "reused": True}
    return None


def copy_results(source: Path, model: EvalModel, out: Path) -> dict:
    """The results of a model evaluated in this call with the same config, weights and tokenizer files (a
    copy under another name), written as `model`'s: the same documents scored the same way score the same."""
    record = read_json(source / "results.json")
    record["model"] = {**record["model"], "name": model.name, "role": model.role, "base": model.base,
                       "path": str(model.path)}  # fmt: skip
    record["seconds"] = 0.0
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for path in (source / "samples").glob("*.jsonl"):
        atomic_write_text(out / "samples" / path.name, path.read_text())
    atomic_write_json(out / "results.json", record)
    return {**record, "reused": True, "same_as": source.name}


def _jsonable_tree(obj):
    if isinstance(obj, dict):
        return {k: _jsonable_tree(v) for k, v in obj.items()}
    return _jsonable(obj)


# --------------------------------------------------------------------------- the stage


def scores(record: dict) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value, metric_stderr: value}} from a results.json record, numbers only."""
    out = {}
    for task, values in record["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key:
                continue
            metric = key.split(",")[0]
            row[metric] = value if isinstance(value, int | float) else None
        out[task] = row
    return out


def read_samples(out: Path) -> dict[str, list[dict]]:
    return {
        p.stem: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for p in sorted((out / "samples").glob("*.jsonl"))
    }


def other_tokenizers(cfg: EvalConfig, models: list[EvalModel]) -> list[str]:
    """The models whose tokenizer is not the teacher's (students trained across tokenizers), after
    refusing what cannot be measured on them: token-level gate criteria, and the draft's acceptance."""
    from distill.tokenizer import other_vocabulary
    from distill.vllm.engine import NOT_A_DRAFT

    teacher = models[0].path
    strangers = [m.name for m in models[1:] if other_vocabulary(m.path, teacher)]
    if not strangers:
        return []
    which = f"{', '.join(strangers)} {'has' if len(strangers) == 1 else 'have'} another tokenizer than the teacher's"
    for i, c in enumerate(cfg.gate.criteria):
        if c.task.startswith("distill_match_"):
            source = c.task.removeprefix("distill_match_")
            raise DistillError(
                f"eval.gate.criteria[{i}]: {c.task} {c.metric} compares token ids, and {which}; gate on "
                f"{bytes_task(source)} byte_agreement (the same question in bytes) instead"
            )
    if cfg.gate.min_acceptance_rate is not None and "student" in strangers:
        raise DistillError(
            f"eval.gate.min_acceptance_rate: the student has another tokenizer than the teacher's: "
            f"{NOT_A_DRAFT}; set it to null"
        )
    return strangers


def evaluate(run: Run, extra: dict[str, str] | None = None, log=print) -> dict:
    """Evaluate the teacher and every student, write eval's results (eval/results.json) and have the gate
    write its verdict (eval/gate.json, with the serving benchmark's acceptance when it is measured);
    return the verdict.

    Bad input (unknown task, missing model, a gate metric a task lacks) raises before any model runs.
    A model whose evaluation crashes fails the gate (fail closed); so does a run killed midway, since
    gate.json says "evaluating" until the decision replaces it."""
    from distill import gate
    from distill.heldout import prepare_outside, read_texts
    from distill.models import model_fingerprint

    started = time.perf_counter()
    recipe, data = run.recipe, run.data
    cfg = recipe.eval
    outside = prepare_outside(recipe.cache_path)
    manager = task_manager(cfg, data.corpus.root, outside)
    tasks = load_tasks(cfg, manager)
    models = eval_models(run, extra)
    if "distill_outside_ppl" in cfg.tasks:
        from distill.heldout import require_outside

        require_outside(read_texts(outside / "outside.jsonl"), "eval.tasks: distill_outside_ppl")
    strangers = other_tokenizers(cfg, models)
    match = None
    if cfg.teacher_match:
        texts = {"test": data.corpus.texts("test"), "outside": read_texts(outside / "outside.jsonl")}
        if "instructions" in cfg.teacher_match:
            from distill.store import TeacherStore

            done = (run.heldout_store / "manifest.json").exists() and TeacherStore(run.heldout_store).complete
            if not done:
                raise DistillError(
                    f"eval.teacher_match: instructions reads the teacher's answers to the held-out prompts, "
                    f"and {run.heldout_store} is not complete: run `distill generate --split heldout` first"
                )
            texts["instructions"] = list(TeacherStore(run.heldout_store).rows())
        gated = any(c.task.startswith("distill_bytes_") for c in cfg.gate.criteria)
        agreement = cfg.byte_agreement if cfg.byte_agreement is not None else bool(strangers or gated)
        match = TeacherMatch.build(cfg, models[0].path, texts, agreement)
    out = run.eval_dir
    gate.begin_evaluation(run)
    settings = settings_of(cfg, data.corpus.content_hash)
    settings["outside"] = outside.name  # its content hash: Python's own files differ between releases
    if match is not None:  # the KL depends on the teacher, the documents and the device's dtype too
        from distill.models import resolve_device

        settings["teacher_match"] = {
            "device": resolve_device("auto"),
            "teacher": model_fingerprint(match.teacher, recipe.cache_path)["weights_hash"],
            "documents": hash_json({s: d.ids for s, d in match.docs.items()}),
        }
        if match.pairs:  # the teacher's greedy continuations depend on its weights, already keyed above
            settings["teacher_match"]["byte_agreement"] = hash_json(match.pairs)
    records: dict[str, dict] = {}
    first_by_key: dict[str, str] = {}  # results key + tokenizer files: the model evaluated with them here
    samples: dict[str, dict[str, list[dict]]] = {}
    crashed = []
    for model in models:
        log(
            f"eval: {model.name} ({model.path}) on {', '.join(cfg.tasks)} with lm-eval's {cfg.backend} backend"
        )
        if model.role == "quantized" and cfg.backend != "hf":
            from distill.vllm.kernels import scheme_of, serving_problem

            problem = serving_problem(scheme_of(model.path))
            if problem:  # vLLM would start and die at the first request: fail this model with the reason
                crashed.append(f"{model.name}: {problem}")
                log(f"eval: {crashed[-1]}")
                continue
        key = None
        try:
            key = results_key(model_fingerprint(model.path, recipe.cache_path), settings)
            record = reusable(out / "models" / model.name, key)
            from distill.tokenizer import tokenizer_files_hash

            same = hash_json([key, tokenizer_files_hash(model.path)])
            if record is None and same in first_by_key:  # a copy of a model evaluated above
                record = copy_results(out / "models" / first_by_key[same], model, out / "models" / model.name)
            if record is None:
                with model_server(cfg, model, out) as url:
                    record = evaluate_model(
                        model, cfg, settings, manager, tasks, out / "models", recipe.cache_path, url, match
                    )
        except Exception as exc:  # fail closed: the gate cannot pass on a model it could not evaluate
            crashed.append(
                f"{model.name}: evaluation failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
            )
            log(f"eval: {crashed[-1]}")
            continue
        records[model.name] = record
        if record["key"] == key:  # complete (a failed teacher match is retried, so never copied)
            first_by_key.setdefault(same, model.name)
        if record.get("teacher_match_error"):
            log(f"eval: {model.name}: no teacher match: {record['teacher_match_error']}")
        samples[model.name] = read_samples(out / "models" / model.name)
        how = f"{record['seconds']:.0f}s"
        if record["reused"]:
            source = f" as {record['same_as']}" if "same_as" in record else ""
            how = f"reused (same files and settings{source})"
        log(f"eval: {model.name}: {_headline(record)} [{how}]")
    decision = gate.decide(cfg.gate, records, samples)
    decision["errors"] = crashed + decision["errors"]
    decision["passed"] = bool(decision["passed"] and not crashed and "teacher" in records)
    decision["models"] = {
        name: {
            "path": r["model"]["path"],
            "role": r["model"]["role"],
            "scores": scores(r),
            "seconds": r["seconds"],
        }
        for name, r in records.items()
    }
    evaluated = [m for m in models if m.name in records]  # not the models whose evaluation crashed
    for name, row in _expected_acceptance(recipe, evaluated, data.tokens_dir, log).items():
        if name in decision["models"]:
            decision["models"][name]["expected_acceptance"] = row
    decision["settings"] = settings
    decision["eval_passed"] = decision["passed"]
    atomic_write_json(run.eval_results, decision)
    decision = gate.write(run, cfg.gate, recipe.cache_path)  # with `distill bench serve`'s, if measured
    run.manifest.record(
        "eval",
        "passed" if decision["passed"] else "failed",
        hash_json(settings),
        {"gate": str(run.gate_file), "passed": decision["passed"]},
        time.perf_counter() - started,
    )
    return decision


def _expected_acceptance(
    recipe: RecipeConfig, models: list[EvalModel], tokens_dir: Path, log
) -> dict[str, dict]:
    """Each draft candidate's expected acceptance in the serving benchmark, predicted offline
    (distill.acceptance); informational, so a failure is reported and the evaluation goes on."""
    from distill.acceptance import draft_acceptance

    try:
        return draft_acceptance(recipe, models, tokens_dir, log)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the gate's decision must still be written
        log(f"eval: no expected acceptance: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return {}


def _headline(record: dict) -> str:
    parts = []
    first = {"bits_per_byte": 0, "acc": 0, "exact_match": 0}
    for task, row in scores(record).items():
        values = [(m, v) for m, v in row.items() if not m.endswith("_stderr") and v is not None]
        shown = sorted(values, key=lambda mv: first.get(mv[0], 1))[:2]
        parts.append(f"{task} " + " ".join(f"{m} {v:.4g}" for m, v in shown))
    return "; ".join(parts)


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage). Its inputs include the serving
    workload, since it predicts the serving benchmark's acceptance (distill.acceptance)."""
    from distill.stages import Stage, dump

    layout = RunDir(recipe.run_dir)
    workload = recipe.serve.bench.model_dump(
        include={"requests", "prompt_tokens", "max_tokens", "temperature"}
    )

    def go(ctx, redo: bool) -> dict:
        decision = evaluate(ctx.run(), log=ctx.log)
        # the verdict so far: the serving benchmark's acceptance may still join it (bench)
        return {"gate": str(layout.gate_file), "passed": decision["passed"],
                "eval_passed": decision["eval_passed"]}  # fmt: skip

    tasks = ", ".join(recipe.eval.tasks)
    return [
        Stage(
            "eval",
            {
                "eval": dump(recipe.eval),
                "expected_acceptance": {"k": recipe.serve.num_speculative_tokens, **workload},
            },
            run=go,
            outputs=lambda ctx: [layout.gate_file],
            plan=lambda ctx: [
                f"distill eval {layout.path}   (lm-eval {recipe.eval.backend} backend: {tasks})"
            ],
        )
    ]
