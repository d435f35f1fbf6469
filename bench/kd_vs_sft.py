"""KD objectives against the SFT baseline, judged where no objective reaches (issue #13).

    .venv/bin/python bench/kd_vs_sft.py [--recipe recipes/tiny.yaml] [--seeds 0 1 2] [--measured-seeds 0]

Every variant trains the same student (same size, steps, batch and sequences: the run's teacher store)
with `distill train`, from the same initial weights per seed. The run must have its teacher store
(`distill run RECIPE --only generate`). Each student is then judged on:
- bits per byte of the corpus's test split and of `outside` text (distill.heldout: ships with Python,
  not in the corpus), whole documents up to data.seq_len tokens;
- full-vocabulary KL(teacher || student) and top-1 agreement on the same documents (dense teacher);
- expected acceptance as the teacher's draft (distill.acceptance, the serving benchmark's prompts,
  greedy, k = serve.num_speculative_tokens), and for --measured-seeds the acceptance vLLM measures with
  the student as the teacher's draft_model (the same prompts, greedy, counters from get_metrics()).
Each variant is compared with SFT paired, document by document: per-document values averaged over the
seeds, then a bootstrap over documents (95% interval of the difference of the aggregates).

Writes bench/results/kd_vs_sft.json and docs/kd-vs-sft.md (the table, generated from the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KD = ["train.loss=forward_kl", "train.temperature=1.0"]  # pinned: only the tail and CE share differ
VARIANTS = {  # name: (description, train overrides)
    "sft": ("SFT baseline: CE on the teacher's samples", ["train.loss=ce"]),
    "topk_bucket": (
        "top-32 KD, tail bucket (the old default)",
        [*KD, "train.tail=bucket", "train.ce_weight=0"],
    ),
    "topk_renormalize": (
        "top-32 KD, renormalised head",
        [*KD, "train.tail=renormalize", "train.ce_weight=0"],
    ),
    "sampled_tail": ("top-32 + sampled tail KD (unbiased)", [*KD, "train.tail=sample", "train.ce_weight=0"]),
    "bucket_ce": ("top-32 KD, tail bucket + 0.5 CE", [*KD, "train.tail=bucket", "train.ce_weight=0.5"]),
    "sampled_tail_ce": (
        "top-32 + sampled tail KD + 0.5 CE",
        [*KD, "train.tail=sample", "train.ce_weight=0.5"],
    ),
}
BOOTSTRAP = 2000


def train_all(recipe: str, variants: list[str], seeds: list[int], run_dir: Path) -> dict[str, float]:
    seconds = {}
    for name in variants:
        for seed in seeds:
            out = f"bench-{name}-s{seed}"
            if (run_dir / out / "final" / "config.json").exists():
                continue
            started = time.perf_counter()
            # validation only at the end (eval_every is bookkeeping: the same training either way)
            cmd = [sys.executable, "-m", "distill", "train", recipe, *VARIANTS[name][1], f"train.output={out}",
                   f"train.seed={seed}", f"train.eval_every={10**6}", "--overwrite", "--no-progress"]  # fmt: skip
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds[out] = time.perf_counter() - started
    return seconds


def judge(recipe, run_dir: Path, students: dict[str, Path], done: dict | None = None) -> dict[str, dict]:
    """Per student: per-document held-out figures by source, and the expected acceptance (`done`: the
    figures of students judged before, whose directories are unchanged, kept as they are)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.acceptance import draft_tokens, predict, teacher_continuations
    from distill.heldout import Documents, measure, outside_documents, serving_prompts
    from distill.pipeline import open_run
    from distill.tokenizer import load_tokenizer

    run = open_run(recipe)
    data, teacher_dir = run.data, run.teacher
    tokenizer = load_tokenizer(data.tokenizer_dir)
    texts = {"test": data.corpus.texts("test"), "outside": [d["text"] for d in outside_documents()]}
    docs = {s: Documents.encode(t, tokenizer, recipe.data.seq_len) for s, t in texts.items()}
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    bench, k = recipe.serve.bench, recipe.serve.num_speculative_tokens
    continuations = teacher_continuations(
        teacher_dir, serving_prompts(bench, data.tokens_dir), bench.max_tokens, 0.0
    )
    out = {"teacher": {s: measure(teacher, None, d) for s, d in docs.items()}}
    for name, path in students.items():
        if done and name in done:
            out[name] = done[name]
            continue
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        row = {s: measure(model, teacher, d) for s, d in docs.items()}
        row["expected_acceptance"] = predict(draft_tokens(path, continuations), continuations, k, 0.0)
        out[name] = row
        print(f"judged {name}", flush=True)
    return out


def measured_acceptance(recipe, draft: Path) -> dict[str, float]:
    """vLLM: the teacher with `draft` as its draft_model, greedy over the serving benchmark's prompts."""
    from vllm import LLM, SamplingParams

    from distill.heldout import serving_prompts
    from distill.pipeline import open_run
    from distill.vllm.engine import engine_kwargs, shutdown_engine

    run = open_run(recipe)
    k = recipe.serve.num_speculative_tokens
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
    llm = LLM(**engine_kwargs(str(run.teacher), speculative_config=spec, disable_log_stats=False))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=recipe.serve.bench.max_tokens, ignore_eos=True)
        prompts = [
            {"prompt_token_ids": ids} for ids in serving_prompts(recipe.serve.bench, run.data.tokens_dir)
        ]
        llm.generate(prompts, params, use_tqdm=False)
        counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    finally:
        shutdown_engine(llm)
    drafted = counters["vllm:spec_decode_num_draft_tokens"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    drafts = counters["vllm:spec_decode_num_drafts"]
    return {"acceptance_rate": accepted / drafted, "mean_acceptance_length": 1 + accepted / drafts,
            "draft_tokens": drafted}  # fmt: skip


# --------------------------------------------------------------------------- statistics


def aggregate(per_doc: dict[str, list[float]], metric: str, index=None) -> float:
    idx = np.arange(len(per_doc["nll"])) if index is None else index
    if metric == "bits_per_byte":
        return float(
            np.sum(np.asarray(per_doc["nll"])[idx])
            / (math.log(2) * np.sum(np.asarray(per_doc["bytes"])[idx]))
        )
    return float(np.mean(np.asarray(per_doc[metric])[idx]))


def paired(a: list[dict], b: list[dict], metric: str, rng) -> dict[str, float]:
    """mean over seeds of (a - b) on the aggregate, a[i] and b[i] trained from the same seed, with a 95%
    interval from a two-level bootstrap (seeds, then documents, resampled together for both sides, so
    both the training seed's and the documents' variance count), and the share of documents where a is
    better (values averaged over the seeds)."""
    n, seeds = len(a[0]["nll"]), len(a)

    def diff(seed_idx, doc_idx) -> float:
        return float(
            np.mean([aggregate(a[s], metric, doc_idx) - aggregate(b[s], metric, doc_idx) for s in seed_idx])
        )

    diffs = [diff(rng.integers(0, seeds, seeds), rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]

    def per_doc(rows):
        if metric == "bits_per_byte":
            return np.mean([np.asarray(r["nll"]) / np.asarray(r["bytes"]) for r in rows], axis=0)
        return np.mean([np.asarray(r[metric]) for r in rows], axis=0)

    da, db = per_doc(a), per_doc(b)
    better = float(np.mean(da < db)) if metric in ("bits_per_byte", "kl") else float(np.mean(da > db))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": diff(range(seeds), None), "ci95": [float(lo), float(hi)], "docs_better": better}


METRICS = (("bits_per_byte", "test"), ("bits_per_byte", "outside"), ("kl", "test"), ("kl", "outside"),
           ("top1", "test"), ("top1", "outside"))  # fmt: skip


def summarize(judged: dict, variants: list[str], seeds: list[int], measured: dict) -> dict:
    rng = np.random.default_rng(0)
    out = {
        "teacher": {
            f"{s}_bits_per_byte": aggregate(judged["teacher"][s], "bits_per_byte")
            for s in ("test", "outside")
        }
    }
    runs = {
        v: {s: [judged[f"{v}-s{seed}"][s] for seed in seeds] for s in ("test", "outside")} for v in variants
    }
    for v in variants:
        row = {"description": VARIANTS[v][0], "overrides": VARIANTS[v][1], "per_seed": {}}
        for metric, source in METRICS:
            key = f"{source}_{metric}"
            per_seed = [aggregate(judged[f"{v}-s{seed}"][source], metric) for seed in seeds]
            row["per_seed"][key] = per_seed
            row[key] = float(np.mean(per_seed))
            if v != "sft":
                row[f"{key}_vs_sft"] = paired(runs[v][source], runs["sft"][source], metric, rng)
        exp = [judged[f"{v}-s{seed}"]["expected_acceptance"]["acceptance_rate"] for seed in seeds]
        row["per_seed"]["expected_acceptance"] = exp
        row["expected_acceptance"] = float(np.mean(exp))
        got = [measured[f"{v}-s{seed}"]["acceptance_rate"] for seed in seeds if f"{v}-s{seed}" in measured]
        row["measured_acceptance"] = float(np.mean(got)) if got else None
        out[v] = row
    return out


# --------------------------------------------------------------------------- the docs table


def render(result: dict) -> str:
    """docs/kd-vs-sft.md from the JSON (never edited by hand)."""
    s = result["summary"]
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [
        "# KD against the SFT baseline, on text no objective reaches",
        "",
        "<!-- generated by bench/kd_vs_sft.py from bench/results/kd_vs_sft.json; do not edit -->",
        "",
        f"Recipe `{result['recipe']}`, {result['steps']} steps, seeds {seeds}; every variant trains the same "
        "student on the same teacher samples. Held-out text: the corpus's test split "
        f"({result['documents']['test']} documents) and `outside` ({result['documents']['outside']} documents "
        "of IDLE's guide, change logs and Python's license, which ship with Python and are not in the corpus). "
        "Bits per byte (bpb) and full-vocabulary KL: lower is better. Differences are against SFT trained "
        "from the same seed, averaged over the seeds, with a 95% interval from a bootstrap over seeds and "
        "documents together; "
        f"measured acceptance: vLLM, seed(s) {', '.join(map(str, result['measured_seeds']))}, greedy, "
        f"k = {result['k']}.",
        "",
        f"Teacher: test bpb {s['teacher']['test_bits_per_byte']:.3f}, outside bpb "
        f"{s['teacher']['outside_bits_per_byte']:.3f}.",
        "",
        "| variant | test bpb | vs SFT | outside bpb | vs SFT | KL test | KL outside | vs SFT | top-1 test | "
        "top-1 outside | expected acc. | measured acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def vs(row, key):
        if f"{key}_vs_sft" not in row:
            return ""
        d = row[f"{key}_vs_sft"]
        return f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

    for v in result["variants"]:
        r = s[v]
        measured = f"{r['measured_acceptance']:.3f}" if r["measured_acceptance"] is not None else ""
        lines.append(
            f"| {r['description']} | {r['test_bits_per_byte']:.3f} | {vs(r, 'test_bits_per_byte')} | "
            f"{r['outside_bits_per_byte']:.3f} | {vs(r, 'outside_bits_per_byte')} | {r['test_kl']:.3f} | "
            f"{r['outside_kl']:.3f} | {vs(r, 'outside_kl')} | {r['test_top1']:.3f} | {r['outside_top1']:.3f} | "
            f"{r['expected_acceptance']:.3f} | {measured} |"
        )
    lines += ["", "Per seed (test bpb / outside bpb / outside KL):", ""]
    for v in result["variants"]:
        p = s[v]["per_seed"]
        cells = [f"{a:.3f} / {b:.3f} / {c:.3f}" for a, b, c in zip(p["test_bits_per_byte"],
                 p["outside_bits_per_byte"], p["outside_kl"], strict=True)]  # fmt: skip
        lines.append(f"- {s[v]['description']}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--measured-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kd_vs_sft.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "kd-vs-sft.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs table from --out")
    parser.add_argument(
        "--from-judged", action="store_true", help="re-summarise the saved per-document figures"
    )
    args = parser.parse_args()
    if args.render_only:
        Path(args.docs).write_text(render(json.loads(Path(args.out).read_text())))
        return

    from distill.config import load_recipe

    recipe = load_recipe(args.recipe)
    run_dir = recipe.run_dir
    seconds = {} if args.from_judged else train_all(args.recipe, args.variants, args.seeds, run_dir)
    students = {f"{v}-s{s}": run_dir / f"bench-{v}-s{s}" / "final" for v in args.variants for s in args.seeds}
    judged_path = run_dir / "bench-kd-vs-sft-judged.json"  # per-document figures, to re-summarise from
    # students are retrained only when their final/ is missing: the figures of existing ones are kept
    done = json.loads(judged_path.read_text()) if judged_path.exists() else {}
    if args.from_judged:
        judged = done
    else:
        judged = judge(
            recipe, run_dir, students, {k: v for k, v in done.items() if f"bench-{k}" not in seconds}
        )
        judged_path.write_text(json.dumps(judged))
    previous = json.loads(Path(args.out).read_text())["measured"] if Path(args.out).exists() else {}
    measured = {k: v for k, v in previous.items() if k in students and f"bench-{k}" not in seconds}
    for v in args.variants if not args.from_judged else []:
        for seed in args.measured_seeds:
            if f"{v}-s{seed}" in measured:
                continue
            measured[f"{v}-s{seed}"] = measured_acceptance(recipe, students[f"{v}-s{seed}"])
            print(f"measured {v}-s{seed}: {measured[f'{v}-s{seed}']}", flush=True)
    result = {
        "recipe": args.recipe,
        "steps": recipe.train.max_steps,
        "seeds": args.seeds,
        "measured_seeds": args.measured_seeds,
        "variants": args.variants,
        "k": recipe.serve.num_speculative_tokens,
        "documents": {s: len(judged["teacher"][s]["nll"]) for s in ("test", "outside")},
        "train_seconds": seconds,
        "measured": measured,
        "summary": summarize(judged, args.variants, args.seeds, measured),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.docs).write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
