"""End to end against TRL: distill's teacher capture + training against TRL's GKDTrainer with its teacher
in-process, at one epoch and at several, with the students' held-out bits per byte, in one run.

    .venv/bin/python bench/end_to_end.py [--pairs embedded smollm2] [--epochs 1 3] [--repeats 1]

Two pairs, each on fixed corpus blocks (score mode; TRL's GKD with lmbda 0 and beta 0 is forward KL on
fixed sequences, bench/trl_gkd_worker.py):
- embedded: tiny.yaml's teacher (4 layers x 256, pretrained briefly; weights do not change the cost) and
  student (2 x 128), 4,096-token vocabulary, 30 steps x 16 blocks x 256 tokens per epoch;
- smollm2: SmolLM2-135M-Instruct (its GGUF, 134.5 M parameters) and the 12-layer student cut from it
  (70.8 M, smollm2-135m.yaml), 49,152-token vocabulary, 12 steps x 8 blocks x 256 tokens per epoch: the
  teacher is twice the student, so the teacher's forward is a large share of the work.
distill: `distill generate` once per engine (vLLM, distill's default on CPU and GPU, and transformers),
then `distill train` for each epoch count; its end-to-end time is the generate command plus the train
command. TRL: `GKDTrainer` for each epoch count, the teacher's forward at every step. Same initial student,
blocks, batch, lr schedule, AdamW and clipping on both sides; whole commands (start-up and model loading
included), fp32, 2 CPU cores. TRL's promoted `DistillationTrainer` samples completions at every step
(on-policy), so it does not apply to fixed sequences.
Quality: every final student's bits per byte on 48 corpus test documents and 48 documents from outside
the corpus (distill.heldout), distill minus TRL with a 95% bootstrap interval over documents.
Ratios are what to read: absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import (  # noqa: E402  (bench/ scripts share their measuring)
    BENCH_PYTHON,
    DISTILL,
    TINY,
    run_measured,
    write_initial_student,
    write_store_sequences,
)

SMOLLM2 = ROOT / "recipes" / "smollm2-135m.yaml"
DOCUMENTS = 48
BOOTSTRAP = 2000
ENGINES = ("vllm", "hf")
PAIRS = {
    "embedded": {"recipe": TINY, "steps": 30, "batch": 16, "lr": 1e-3, "warmup": 4, "top_k": 64},
    "smollm2": {"recipe": SMOLLM2, "steps": 12, "batch": 8, "lr": 2e-4, "warmup": 2, "top_k": 32},
}


def overrides(pair: str, engine: str, work: Path, cache: Path, steps: int) -> list[str]:
    p = PAIRS[pair]
    out = [
        f"name=e2e-{pair}-{engine}",
        f"runs_dir={work / 'runs'}",
        f"cache_dir={cache}",
        "tracking.wandb=disabled",
        "data.seq_len=256",
        f"teacher.backend={engine}",
        "generate.mode=score",
        f"generate.top_k={p['top_k']}",
        f"generate.num_sequences={p['steps'] * p['batch']}",
        "train.loss=forward_kl",
        "train.temperature=1.0",
        "train.ce_weight=0.0",
        f"train.max_steps={steps}",
        f"train.batch_size={p['batch']}",
        "train.grad_accum=1",
        f"train.lr={p['lr']}",
        f"train.warmup_steps={p['warmup']}",
        f"train.log_every={max(1, steps // 4)}",
        f"train.eval_every={steps}",  # once, at the end: distill's validation is part of its command
        f"train.save_every={steps}",
        "train.eval_batches=1",
    ]
    if pair == "embedded":
        out += [
            "pretrain.max_steps=60",
            "pretrain.warmup_steps=6",
            "pretrain.eval_every=60",
            "pretrain.save_every=60",
        ]
    else:  # corpus blocks in the teacher's tokenizer instead of the recipe's instruction prompts
        out += ["data.prompts=null", "data.heldout_prompts=0", "eval.teacher_match=[test, outside]"]
    return out


def teacher_and_student(pair: str, recipe_args: list[str], work: Path) -> tuple[str, Path]:
    """The teacher directory and the initial student directory both trainers start from."""
    from distill.config import load_recipe
    from distill.models import local_models

    recipe = load_recipe(PAIRS[pair]["recipe"], recipe_args)
    if pair == "smollm2":  # the GGUF converted and the cut made (both cached)
        recipe = local_models(recipe, log=lambda line: print(line, flush=True))
        return recipe.teacher.model, Path(recipe.student.model)
    pre = run_measured(
        [*DISTILL, "pretrain", str(TINY), *recipe_args, "--no-progress"], work / "pretrain.log"
    )
    teacher = next(
        line.split(": ", 1)[1].removesuffix(" (reused)")
        for line in pre["stdout"].splitlines()
        if line.startswith("teacher: ")
    )
    student = work / f"{pair}-student-init"
    if not (student / "config.json").exists():
        write_initial_student(recipe, student)
    return teacher, student


def trl_command(pair: str, teacher: str, student: Path, data: Path, out: Path, steps: int) -> list[str]:
    from distill.config import TrainConfig

    p, t = PAIRS[pair], TrainConfig()
    flags = {"--student": student, "--teacher": teacher, "--data": data, "--out": out, "--steps": steps,
             "--batch": p["batch"], "--lr": p["lr"], "--warmup-steps": p["warmup"], "--min-lr-ratio": t.min_lr_ratio,
             "--weight-decay": t.weight_decay, "--beta1": t.beta1, "--beta2": t.beta2,
             "--max-grad-norm": t.max_grad_norm, "--seed": t.seed, "--log-every": max(1, steps // 4)}  # fmt: skip
    return [str(BENCH_PYTHON), str(ROOT / "bench" / "trl_gkd_worker.py")] + [
        str(x) for flag, value in flags.items() for x in (flag, value)
    ]


def documents(pair: str, recipe_args: list[str]) -> tuple[dict, Path]:
    """Held-out texts by source, and the tokenizer directory the students share."""
    from distill.config import load_recipe
    from distill.heldout import outside_documents
    from distill.models import local_models
    from distill.stages.prepare import prepare

    recipe = load_recipe(PAIRS[pair]["recipe"], recipe_args)
    if pair == "smollm2":
        recipe = local_models(recipe)
    data = prepare(recipe)
    texts = {"test": data.corpus.texts("test"), "outside": [d["text"] for d in outside_documents()]}
    return texts, data.tokenizer_dir


def judge(model_dir: Path, texts: dict, tokenizer_dir: Path) -> dict:
    """Per source, per document: summed nll (nats) and bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.heldout import Documents, measure
    from distill.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for source, t in texts.items():
        per = measure(model, None, Documents.encode(t, tok, 256, DOCUMENTS))
        out[source] = {"nll": [float(x) for x in per["nll"]], "bytes": [float(x) for x in per["bytes"]]}
    return out


def bpb(per_doc: dict, idx=None) -> float:
    nll, size = np.asarray(per_doc["nll"]), np.asarray(per_doc["bytes"])
    if idx is not None:
        nll, size = nll[idx], size[idx]
    return float(nll.sum() / (math.log(2) * size.sum()))


def paired(a: dict, b: dict, rng) -> dict:
    """bpb(a) - bpb(b) over the same documents, with a 95% bootstrap interval over documents."""
    n = len(a["nll"])
    diffs = [bpb(a, i) - bpb(b, i) for i in (rng.integers(0, n, n) for _ in range(BOOTSTRAP))]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": bpb(a) - bpb(b), "ci95": [float(lo), float(hi)]}


def bench_pair(pair: str, epochs: list[int], repeats: int, work: Path, cache: Path) -> dict:
    p = PAIRS[pair]
    tokens_per_epoch = p["steps"] * p["batch"] * 255  # target tokens: B x (T - 1) per step
    base = overrides(pair, "vllm", work, cache, p["steps"])
    teacher, student_init = teacher_and_student(pair, base, work)
    texts, tokenizer_dir = documents(pair, base)
    result = {"pair": pair, "teacher": teacher, **p, "tokens_per_epoch": tokens_per_epoch, "generate": {},
              "distill": {}, "trl": {}, "quality": {}}  # fmt: skip
    result.pop("recipe")
    sequences = work / f"{pair}-sequences.jsonl"
    for engine in ENGINES:
        args = overrides(pair, engine, work, cache, p["steps"])
        run_dir = work / "runs" / f"e2e-{pair}-{engine}"
        shutil.rmtree(run_dir / "teacher", ignore_errors=True)
        print(f"{pair}: distill generate ({engine})", flush=True)
        gen = run_measured(
            [*DISTILL, "generate", str(p["recipe"]), *args],
            work / f"{pair}-generate-{engine}.log",
        )
        stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["seconds"]
        result["generate"][engine] = {
            "command_seconds": gen["seconds"],
            "stage_seconds": stage,
            "peak_rss_mb": gen["peak_rss_mb"],
        }
        if not sequences.exists():
            write_store_sequences(run_dir / "teacher", sequences)
    for e in epochs:
        steps = e * p["steps"]
        args = overrides(pair, "vllm", work, cache, steps)
        runs = []
        for repeat in range(repeats):
            print(f"{pair}: {e} epoch(s), distill train ({repeat + 1}/{repeats})", flush=True)
            d = run_measured([*DISTILL, "train", str(p["recipe"]), *args, "--no-progress", "--overwrite"],
                             work / f"{pair}-train-{e}-{repeat}.log")  # fmt: skip
            print(f"{pair}: {e} epoch(s), TRL GKD ({repeat + 1}/{repeats})", flush=True)
            out = work / f"{pair}-trl-{e}"
            t = run_measured(
                trl_command(pair, teacher, student_init, sequences, out, steps),
                work / f"{pair}-trl-{e}-{repeat}.log",
            )
            runs.append((d["seconds"], t["seconds"], json.loads(t["stdout"].strip().splitlines()[-1])))
        distill_s = min(r[0] for r in runs)
        trl_s = min(r[1] for r in runs)
        worker = runs[0][2]
        if worker["tokens"] != e * tokens_per_epoch:
            sys.exit(f"{pair}: TRL trained {worker['tokens']} tokens, distill {e * tokens_per_epoch}")
        result["distill"][str(e)] = {"train_command_seconds": distill_s, "each": [r[0] for r in runs]}
        result["trl"][str(e)] = {"command_seconds": trl_s, "each": [r[1] for r in runs],
                                 "steady_tokens_per_s": worker["tokens_per_s"], "trl_version": worker["trl_version"]}  # fmt: skip
        ours = work / "runs" / f"e2e-{pair}-vllm" / "student" / "final"
        judged = {
            "distill": judge(ours, texts, tokenizer_dir),
            "trl": judge(out / "final", texts, tokenizer_dir),
        }
        rng = np.random.default_rng(0)
        result["quality"][str(e)] = {
            source: {
                "distill_bpb": bpb(judged["distill"][source]),
                "trl_bpb": bpb(judged["trl"][source]),
                "distill_minus_trl": paired(judged["distill"][source], judged["trl"][source], rng),
            }
            for source in texts
        }
        print(json.dumps(result["quality"][str(e)]), flush=True)
    for e in epochs:
        tokens = e * tokens_per_epoch
        trl_s = result["trl"][str(e)]["command_seconds"]
        result["trl"][str(e)]["end_to_end_tokens_per_s"] = tokens / trl_s
        for engine in ENGINES:
            total = (
                result["generate"][engine]["command_seconds"]
                + result["distill"][str(e)]["train_command_seconds"]
            )
            result["distill"][str(e)][f"end_to_end_seconds_{engine}"] = total
            result["distill"][str(e)][f"end_to_end_ratio_{engine}"] = trl_s / total
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating runs of each trainer; fastest kept"
    )
    parser.add_argument(
        "--cache", help="distill cache dir; default: the user's (the converted GGUF, the cut)"
    )
    parser.add_argument("--work", help="keep runs and models here instead of a temp dir")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "end_to_end.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "packaging" / "setup-bench.sh")], check=True)
    from distill.config import load_recipe

    cache = Path(args.cache) if args.cache else load_recipe(TINY).cache_path
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results = {"cpus": os.cpu_count(), "documents": DOCUMENTS, "pairs": previous.get("pairs", {})}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for pair in args.pairs:
            results["pairs"][pair] = bench_pair(pair, args.epochs, args.repeats, work, cache)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for pair, r in results["pairs"].items():
        for e in map(str, args.epochs):
            d = r["distill"][e]
            print(f"{pair} x{e}: TRL {r['trl'][e]['command_seconds']:.0f} s; distill "
                  f"{d['end_to_end_seconds_vllm']:.0f} s (vLLM capture, {d['end_to_end_ratio_vllm']:.2f}x), "
                  f"{d['end_to_end_seconds_hf']:.0f} s (HF capture, {d['end_to_end_ratio_hf']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
