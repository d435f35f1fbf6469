"""Training tokens/s and peak memory of `distill train` vs TRL's GKDTrainer, same work, in one run.

    .venv/bin/python bench/train_step.py [--steps 30 --batch 16 --seq-len 256 --top-k 64 --repeats 2] [--cache DIR]

The embedded tiny recipe (recipes/tiny.yaml: teacher 4 layers x 256, student 2 layers x 128, 4,096-token
vocabulary) with a short teacher pretraining (weights do not change the cost):
1. `distill pretrain` builds the teacher; `distill generate` (score mode, transformers backend) stores its
   top-k over `steps x batch` corpus blocks, so each trainer sees every sequence once.
2. `distill train` (forward KL, temperature 1) trains the student from that store.
3. TRL's GKDTrainer (bench/trl_gkd_worker.py, run by .venv-bench's Python, built on demand by
   packaging/setup-bench.sh) trains the same initial student (distill's `build_tiny_llama`, same seed,
   saved once) on the same token blocks against the same teacher, with the same batch, lr schedule,
   AdamW settings, clipping and steps; lmbda=0 and beta=0 make GKD forward KL on the fixed sequences.
Tokens are target tokens (B x (T - 1) per step); tokens/s is steady state, after the first
`--log-every` steps. Peak memory is each training command's peak RSS (its ru_maxrss from wait4). Each
trainer runs `--repeats` times, alternating with the other; the fastest run of each is reported.
The objectives are the same divergence but not the same numbers: distill's forward KL is over the
teacher's stored top-k plus one bucket for the rest of the vocabulary, TRL's over the full vocabulary
from the teacher's logits.
TRL runs the teacher forward at every step; distill reads the stored top-k, so its end-to-end figure adds
the `distill generate` time: train tokens / (generate seconds + train seconds), whole commands.
Ratios are what to read: absolute figures on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "recipes" / "tiny.yaml"
DISTILL = [str(ROOT / ".venv" / "bin" / "python"), "-m", "distill"]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd` to completion; its wall seconds, peak RSS (MiB) and stdout. Fails loudly with its log."""
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        stdout = proc.stdout.read()
        # NOTE: wait4 gives this child's own rusage (ru_maxrss in KiB on Linux), not the running maximum
        # over every child so far that RUSAGE_CHILDREN would give the second command.
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{stdout[-2000:]}\n{log.read_text()[-4000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def recipe_overrides(args, work: Path, cache: Path) -> list[str]:
    pretrain_steps = args.pretrain_steps
    return [
        f"runs_dir={work / 'runs'}",
        f"cache_dir={cache}",
        "tracking.wandb=disabled",
        f"data.seq_len={args.seq_len}",
        f"pretrain.max_steps={pretrain_steps}",
        f"pretrain.warmup_steps={max(1, pretrain_steps // 10)}",
        f"pretrain.eval_every={pretrain_steps}",
        f"pretrain.save_every={pretrain_steps}",
        "teacher.backend=hf",
        "generate.mode=score",
        f"generate.top_k={args.top_k}",
        f"generate.num_sequences={args.steps * args.batch}",
        "train.loss=forward_kl",
        "train.temperature=1.0",
        "train.ce_weight=0.0",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        "train.grad_accum=1",
        f"train.lr={args.lr}",
        f"train.warmup_steps={args.warmup_steps}",
        f"train.log_every={args.log_every}",
        # evaluation and checkpoints only after the last step, outside every timed window
        f"train.eval_every={args.steps}",
        f"train.save_every={args.steps}",
    ]


def write_initial_student(recipe, out: Path) -> None:
    """The student `distill train` starts from (same builder, same seed), saved for TRL to load."""
    from transformers.utils import logging

    from distill.models import build_tiny_llama
    from distill.stages.prepare import prepare
    from distill.tokenizer import load_tokenizer

    logging.disable_progress_bar()
    tokenizer = load_tokenizer(prepare(recipe).tokenizer_dir)
    model = build_tiny_llama(recipe.student.tiny, tokenizer, seed=recipe.train.seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_store_sequences(store_dir: Path, out: Path) -> int:
    """The token blocks the teacher store holds, one JSON list per line; returns their target positions."""
    from distill.store import TeacherStore

    positions = 0
    with open(out, "w") as fh:
        for row in TeacherStore(store_dir).rows():
            fh.write(json.dumps({"input_ids": [int(t) for t in row.input_ids]}) + "\n")
            positions += row.num_positions
    return positions


def steady_tokens_per_s(metrics: Path) -> dict:
    """Target tokens/s over the logged windows after the first (warm-up), from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    if len(rows) < 2:
        sys.exit(f"{metrics}: need at least two logged windows (lower --log-every or raise --steps)")
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in pairwise(rows))
    tokens = rows[-1]["tokens"] - rows[0]["tokens"]
    return {
        "tokens": rows[-1]["tokens"],
        "steady_steps": rows[-1]["step"] - rows[0]["step"],
        "steady_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def trl_command(args, recipe, teacher: str, student: Path, data: Path, out: Path) -> list[str]:
    t = recipe.train
    flags = {
        "--student": student,
        "--teacher": teacher,
        "--data": data,
        "--out": out,
        "--steps": t.max_steps,
        "--batch": t.batch_size,
        "--lr": t.lr,
        "--warmup-steps": t.warmup_steps,
        "--min-lr-ratio": t.min_lr_ratio,
        "--weight-decay": t.weight_decay,
        "--beta1": t.beta1,
        "--beta2": t.beta2,
        "--max-grad-norm": t.max_grad_norm,
        "--seed": t.seed,
        "--log-every": t.log_every,
    }
    cmd = [str(BENCH_PYTHON), str(ROOT / "bench" / "trl_gkd_worker.py")]
    for flag, value in flags.items():
        cmd += [flag, str(value)]
    return cmd


def print_table(r: dict) -> None:
    d, t = r["distill"], r["trl"]
    lines = [
        ("", "distill", "TRL GKD", "ratio"),
        (
            "train tokens/s (steady)",
            f"{d['tokens_per_s']:,.0f}",
            f"{t['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_ratio_distill_over_trl']:.2f}x distill/TRL",
        ),
        (
            "peak RSS, MiB",
            f"{d['peak_rss_mb']:,.0f}",
            f"{t['peak_rss_mb']:,.0f}",
            f"{r['peak_rss_ratio_trl_over_distill']:.2f}x TRL/distill",
        ),
        ("train command, s", f"{d['command_seconds']:.1f}", f"{t['command_seconds']:.1f}", ""),
        ("teacher capture (generate), s", f"{r['generate']['command_seconds']:.1f}", "-", ""),
        ("teacher capture peak RSS, MiB", f"{r['generate']['peak_rss_mb']:,.0f}", "-", ""),
        (
            "end to end tokens/s",
            f"{d['end_to_end_tokens_per_s']:,.0f}",
            f"{t['end_to_end_tokens_per_s']:,.0f}",
            f"{r['end_to_end_ratio_distill_over_trl']:.2f}x distill/TRL",
        ),
    ]
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    for label, *cells in lines:
        print(
            "  ".join([label.ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells, widths[1:], strict=True)])
        )
    g = r["generate"]
    print(
        f"generate: {g['positions']:,} positions in {g['command_seconds']:.1f}s "
        f"({g['seconds_per_1k_tokens']:.3f} s per 1,000 tokens, {g['stage_seconds']:.1f}s inside the stage)"
    )


def build_inputs(args, work: Path, cache: Path) -> dict:
    """Teacher (pretrain), its store (generate), the initial student and the store's sequences for TRL."""
    from distill.config import load_recipe

    overrides = recipe_overrides(args, work, cache)
    recipe = load_recipe(TINY, overrides)
    print(
        f"pretrain: teacher {recipe.teacher.tiny.num_layers} x {recipe.teacher.tiny.hidden_size}", flush=True
    )
    pre = run_measured([*DISTILL, "pretrain", str(TINY), *overrides, "--no-progress"], work / "pretrain.log")
    teacher = next(
        line.split(": ", 1)[1].removesuffix(" (reused)")
        for line in pre["stdout"].splitlines()
        if line.startswith("teacher: ")
    )
    print(f"generate: top-{args.top_k} over {args.steps * args.batch} blocks", flush=True)
    gen = run_measured([*DISTILL, "generate", str(TINY), *overrides], work / "generate.log")
    stage_seconds = json.loads((recipe.run_dir / "manifest.json").read_text())["stages"]["generate"][
        "seconds"
    ]
    student_init, sequences = work / "student-init", work / "sequences.jsonl"
    write_initial_student(recipe, student_init)
    positions = write_store_sequences(recipe.run_dir / "teacher", sequences)
    generate = {
        "positions": positions,
        "command_seconds": gen["seconds"],
        "stage_seconds": stage_seconds,
        "seconds_per_1k_tokens": 1000 * gen["seconds"] / positions,
        "peak_rss_mb": gen["peak_rss_mb"],
    }
    return {
        "recipe": recipe,
        "overrides": overrides,
        "teacher": teacher,
        "student_init": student_init,
        "sequences": sequences,
        "generate": generate,
        "pretrain_seconds": pre["seconds"],
    }


def time_distill(inputs: dict, work: Path, repeat: int) -> dict:
    cmd = [*DISTILL, "train", str(TINY), *inputs["overrides"], "--no-progress", "--overwrite"]
    run = run_measured(cmd, work / f"distill-train-{repeat}.log")
    result = steady_tokens_per_s(inputs["recipe"].run_dir / "student" / "metrics.jsonl")
    return {**result, "command_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def time_trl(args, inputs: dict, work: Path, repeat: int) -> dict:
    recipe = inputs["recipe"]
    cmd = trl_command(
        args, recipe, inputs["teacher"], inputs["student_init"], inputs["sequences"], work / f"trl-{repeat}"
    )
    run = run_measured(cmd, work / f"trl-train-{repeat}.log")
    result = json.loads(run["stdout"].strip().splitlines()[-1])
    return {**result, "command_seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def best_of(runs: list[dict]) -> dict:
    """The fastest repeat, with every repeat's tokens/s and the highest peak RSS of all of them."""
    best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    best["tokens_per_s_each"] = [r["tokens_per_s"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def summarise(args, inputs: dict, distill: dict, trl: dict) -> dict:
    if trl["tokens"] != distill["tokens"]:
        sys.exit(f"token counts differ: distill {distill['tokens']}, TRL {trl['tokens']}")
    gen = inputs["generate"]
    # NOTE: whole commands on both sides (start-up and model loading included): distill's teacher
    # capture plus its training, against TRL's training, which runs the teacher itself.
    distill["end_to_end_tokens_per_s"] = distill["tokens"] / (
        gen["command_seconds"] + distill["command_seconds"]
    )
    trl["end_to_end_tokens_per_s"] = trl["tokens"] / trl["command_seconds"]
    recipe = inputs["recipe"]
    return {
        "setup": {
            "model_teacher": recipe.teacher.tiny.model_dump(),
            "model_student": recipe.student.tiny.model_dump(),
            **{k: v for k, v in vars(args).items() if k not in ("cache", "work", "out")},
            "cpus": os.cpu_count(),
            "trl_version": trl["trl_version"],
        },
        "generate": gen,
        "distill": distill,
        "trl": trl,
        "tokens_per_s_ratio_distill_over_trl": distill["tokens_per_s"] / trl["tokens_per_s"],
        "peak_rss_ratio_trl_over_distill": trl["peak_rss_mb"] / distill["peak_rss_mb"],
        "end_to_end_ratio_distill_over_trl": distill["end_to_end_tokens_per_s"]
        / trl["end_to_end_tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each trainer")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (no accumulation)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (data.seq_len)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher logprobs stored per position")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=5, help="log window; the first one is warm-up")
    parser.add_argument("--pretrain-steps", type=int, default=60, help="teacher pretraining steps")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each trainer; best kept")
    parser.add_argument("--cache", help="distill cache dir (corpus, tokenizer, teacher); default: a temp dir")
    parser.add_argument("--work", help="keep runs and models here instead of a temp dir")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "packaging" / "setup-bench.sh")], check=True)
    setup_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = build_inputs(args, work, Path(args.cache) if args.cache else work / "cache")
        distill_runs, trl_runs = [], []
        # NOTE: alternating repeats, best of each: on a shared 2-core machine, load from elsewhere only
        # ever slows a run down, so the fastest run of each is the closest to its real cost.
        for repeat in range(args.repeats):
            print(f"train {repeat + 1}/{args.repeats}: distill", flush=True)
            distill_runs.append(time_distill(inputs, work, repeat))
            print(f"train {repeat + 1}/{args.repeats}: TRL GKD", flush=True)
            trl_runs.append(time_trl(args, inputs, work, repeat))

    results = summarise(args, inputs, best_of(distill_runs), best_of(trl_runs))
    results["timings"] = {
        "setup_bench_seconds": setup_seconds,
        "pretrain_command_seconds": inputs["pretrain_seconds"],
        "total_seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out} in {results['timings']['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
