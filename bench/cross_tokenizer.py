"""Cross-tokenizer distillation against SFT on the teacher's text, re-tokenized (issue #18).

    .venv/bin/python bench/cross_tokenizer.py [--pairs embedded smollm2] [--seeds 0 1 2]

Two teacher-student pairs whose tokenizers differ:
- `embedded`: recipes/tiny.yaml's embedded teacher (its 4,096-token tokenizer) to tiny.yaml's student
  with a 2,048-token tokenizer trained on the same corpus, on the demo's teacher samples;
- `smollm2`: SmolLM2-135M-Instruct (49,152 tokens, recipes/smollm2-135m.yaml's teacher samples) to the
  embedded teacher's model (4,096 tokens, pretrained on the corpus): a real student of another family.
Every variant of a pair trains the same student from the same initial weights per seed, on the same
sequences for the same steps (the recipe's), with `distill train`:
- `sft`: CE on the teacher's text re-tokenized by the student, the baseline a method must beat;
- `uld`, `byte`: train.cross_tokenizer.method, without CE; `uld_ce`, `byte_ce`: each with 0.5 CE mixed in
  (ULD as its authors train it, beside CE).
Each student is judged in units that do not depend on its tokenizer:
- bits per byte of the corpus's test documents and of `outside` text (distill.heldout; not in the corpus);
- byte agreement with the teacher's greedy continuations of held-out prompts (distill.heldout.
  byte_agreement: the bytes of the continuation whose token the student predicts, teacher-forced).
Each method is compared with sft paired: a bootstrap over seeds and documents (bench/kd_vs_sft.py's).

Writes bench/results/cross_tokenizer.json and docs/cross-tokenizer-study.md (generated from the JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from kd_vs_sft import paired  # noqa: E402  (bench/ scripts share their statistics)

KD = ["train.loss=forward_kl", "train.temperature=1.0"]
VARIANTS = {  # name: (description, train overrides)
    "sft": ("SFT: CE on the teacher's text, re-tokenized", ["train.loss=ce", "train.cross_tokenizer.method=byte"]),
    "uld": ("ULD", [*KD, "train.ce_weight=0", "train.cross_tokenizer.method=uld"]),
    "uld_ce": ("ULD + 0.5 CE", [*KD, "train.ce_weight=0.5", "train.cross_tokenizer.method=uld"]),
    "byte": ("byte-aligned", [*KD, "train.ce_weight=0", "train.cross_tokenizer.method=byte"]),
    "byte_ce": ("byte-aligned + 0.5 CE", [*KD, "train.ce_weight=0.5", "train.cross_tokenizer.method=byte"]),
}  # fmt: skip
PAIRS = {
    "embedded": {
        "recipe": "recipes/tiny.yaml",
        "source_run": "tiny",
        "what": "embedded teacher (4,096 tokens) to tiny.yaml's student with a 2,048-token tokenizer",
    },
    "smollm2": {
        "recipe": "recipes/smollm2-135m.yaml",
        "source_run": "smollm2-135m",
        "what": "SmolLM2-135M-Instruct (49,152 tokens) to the embedded teacher's model (4,096 tokens)",
    },
}
STORES = ("teacher",)
DOCUMENTS = 48  # test and outside documents each
PROMPTS = 32  # held-out prompts the teacher continues greedily
CONTINUATION = 64  # tokens of each greedy continuation
SOURCES = ("test", "outside")


@functools.cache
def embedded_teacher() -> Path:
    """The demo's embedded teacher (pretrained now, or found in the cache)."""
    from distill.config import load_recipe
    from distill.pipeline import open_run

    return open_run(load_recipe(ROOT / PAIRS["embedded"]["recipe"]), "pretrain", progress=False).teacher


STEPS: int | None = None  # --steps: a smoke run, in its own run directory


def overrides(pair: str) -> list[str]:
    base = [f"name=bench-xtok-{pair}", "tracking.wandb=disabled"]
    if STEPS is not None:
        base = [f"name=bench-xtok-{pair}-smoke", "tracking.wandb=disabled", f"train.max_steps={STEPS}",
                "train.warmup_steps=0"]  # fmt: skip
    if pair == "embedded":
        return [*base, "student.tokenizer=corpus", "student.vocab_size=2048"]
    return [*base, "student.cut=null", f"student.model={embedded_teacher()}"]


def recipe_of(pair: str):
    """The pair's recipe, its models local (a GGUF teacher converted once, as the CLI does)."""
    from distill.config import load_recipe
    from distill.models import local_models

    recipe = load_recipe(ROOT / PAIRS[pair]["recipe"], overrides(pair))
    return local_models(recipe, log=lambda line: print(line, flush=True))


def prepare_run(pair: str, run_dir: Path) -> None:
    """The pair's teacher store: its recipe's run's, made by `distill run --only generate` if missing."""
    source = run_dir.parent / PAIRS[pair]["source_run"]
    if not (source / "teacher" / "manifest.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "distill",
            "run",
            PAIRS[pair]["recipe"],
            "--only",
            "generate",
            "--no-progress",
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
    for name in STORES:
        if not (run_dir / name).exists():
            shutil.copytree(source / name, run_dir / name)


def train_all(pair: str, seeds: list[int], run_dir: Path) -> dict[str, float]:
    seconds = {}
    for seed in seeds:  # every variant of a seed before the next: partial results stay paired
        for name, (_, extra) in VARIANTS.items():
            out = f"bench-{name}-s{seed}"
            if (run_dir / out / "final" / "config.json").exists():
                continue
            cmd = [sys.executable, "-m", "distill", "train", PAIRS[pair]["recipe"], *overrides(pair), *extra,
                   f"train.output={out}", f"train.seed={seed}", f"train.eval_every={10**6}", "train.eval_batches=1",
                   "--overwrite", "--no-progress"]  # fmt: skip
            print("$", " ".join(cmd[3:]), flush=True)
            started = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds[f"{pair}/{out}"] = time.perf_counter() - started
            print(f"  {seconds[f'{pair}/{out}']:.0f} s", flush=True)
    return seconds


def greedy_pairs(pair: str, recipe, run) -> list[tuple[str, str]]:
    """(prompt text, the teacher's greedy continuation text) for held-out prompts: the demo's serving
    prompts (test-split openings) for `embedded`, the held-out instruction prompts in the chat template
    for `smollm2`. Special tokens are kept as text, as the student read them in training."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.crosstok import token_bytes
    from distill.heldout import serving_prompts, spread
    from distill.tokenizer import load_tokenizer

    tok = load_tokenizer(run.data.tokenizer_dir)
    if pair == "embedded":
        prompts = serving_prompts(recipe.serve.bench, run.data.tokens_dir)[:PROMPTS]
    else:
        from distill.prompts import PromptSet, encode

        prompts = [encode(r, tok)[0] for r in spread(PromptSet(run.data.prompt_set).rows("heldout"), PROMPTS)]
    teacher = AutoModelForCausalLM.from_pretrained(str(run.teacher), dtype=torch.float32).eval()
    spelled = token_bytes(tok, "teacher")

    def text(ids) -> str:  # the exact bytes of the ids (decode() may clean up spaces)
        return b"".join(spelled[i] for i in ids).decode("utf-8", errors="replace")

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            seq = teacher.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=CONTINUATION,
                                   do_sample=False, pad_token_id=tok.pad_token_id or 0)[0, len(ids):]  # fmt: skip
            out.append((text(ids), text(seq.tolist())))
    return out


def judge(pair: str, students: dict[str, Path], done: dict, save) -> dict:
    """Per student: per-document bits per byte by source, and per-prompt byte agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.heldout import Documents, byte_agreement, measure, outside_documents
    from distill.pipeline import open_run
    from distill.tokenizer import load_tokenizer

    recipe = recipe_of(pair)
    run = open_run(recipe, "pretrain", progress=False)
    texts = {"test": run.data.corpus.texts("test"), "outside": [d["text"] for d in outside_documents()]}
    pairs = done.get("greedy") or greedy_pairs(pair, recipe, run)
    out = {**done, "greedy": pairs}
    for name, path in students.items():
        if name in out:
            continue
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        tok = load_tokenizer(path)
        context = model.config.max_position_embeddings
        row = {
            s: measure(model, None, Documents.encode(t, tok, recipe.data.seq_len, DOCUMENTS))
            for s, t in texts.items()
        }
        row["agreement"] = byte_agreement(model, tok, pairs, context)
        row["vocab"] = len(tok)
        out[name] = row
        save(out)
        print(f"judged {pair}/{name}", flush=True)
    return out


def bpb(per_doc: dict) -> float:
    return float(np.sum(per_doc["nll"]) / (math.log(2) * np.sum(per_doc["bytes"])))


def share(agreement: dict) -> float:
    return float(np.sum(agreement["agreed"]) / np.sum(agreement["bytes"]))


def summarize(judged: dict, seeds: list[int]) -> dict:
    """Per variant: the figures (mean over seeds, and per seed); per method against sft: paired."""
    rng = np.random.default_rng(0)
    rows, comparisons = {}, []
    for name in VARIANTS:
        have = [s for s in seeds if f"{name}-s{s}" in judged]
        if not have:
            continue
        runs = [judged[f"{name}-s{s}"] for s in have]
        row = {"seeds": have, "per_seed": {}}
        for s in SOURCES:
            row["per_seed"][f"{s}_bits_per_byte"] = [bpb(r[s]) for r in runs]
        row["per_seed"]["agreement"] = [share(r["agreement"]) for r in runs]
        row.update({k: float(np.mean(v)) for k, v in row["per_seed"].items()})
        rows[name] = row
    for name in VARIANTS:
        both = [s for s in seeds if f"{name}-s{s}" in judged and f"sft-s{s}" in judged]
        if name == "sft" or not both:
            continue
        a = [judged[f"{name}-s{s}"] for s in both]
        b = [judged[f"sft-s{s}"] for s in both]
        entry = {"a": name, "b": "sft", "seeds": both}
        for s in SOURCES:
            entry[f"{s}_bits_per_byte"] = paired([r[s] for r in a], [r[s] for r in b], "bits_per_byte", rng)
        entry["agreement"] = paired_agreement(a, b, rng)
        comparisons.append(entry)
    return {"variants": rows, "comparisons": comparisons}


def paired_agreement(a: list[dict], b: list[dict], rng) -> dict:
    """`paired` for the byte agreement, byte-weighted over prompts: each prompt given to `paired` as a
    document whose "nll" is its agreed bytes, so that its bits-per-byte aggregate is agreed / (ln 2 x bytes);
    the difference and interval are scaled back by ln 2, and higher is better."""

    def docs(side):
        return [{"nll": r["agreement"]["agreed"], "bytes": r["agreement"]["bytes"]} for r in side]

    x = paired(docs(a), docs(b), "bits_per_byte", rng)
    return {"diff": x["diff"] * math.log(2), "ci95": [v * math.log(2) for v in x["ci95"]],
            "docs_better": 1 - x["docs_better"]}  # fmt: skip


def render(result: dict) -> str:
    """docs/cross-tokenizer-study.md from the JSON (never edited by hand)."""
    lines = [
        "# Across tokenizers: the measured comparison with SFT",
        "",
        "<!-- generated by bench/cross_tokenizer.py from bench/results/cross_tokenizer.json; do not edit -->",
        "",
        "Each method of [Distilling across tokenizers](cross-tokenizer.md) against the baseline it must beat: "
        "SFT on the teacher's text, re-tokenized by the student, at the same student initialisation, sequences "
        f"and steps per seed (seeds {', '.join(map(str, result['seeds']))}). Bits per byte (lower is better) on "
        f"{DOCUMENTS} corpus test documents and {DOCUMENTS} `outside` documents (not in the corpus); byte "
        f"agreement (higher is better): the share of the bytes of the teacher's greedy {CONTINUATION}-token "
        f"continuations of {PROMPTS} held-out prompts whose token the student predicts, teacher-forced. "
        f"Measured on {result['machine']}.",
    ]
    for pair, p in result["pairs"].items():
        s = p["summary"]
        lines += ["", f"## {PAIRS[pair]['what']}", "",
                  f"`{PAIRS[pair]['recipe']}`, {p['steps']} steps of batch {p['batch_size']}; student vocabulary "
                  f"{p['student_vocab']}, teacher's {p['teacher_vocab']}; share of the teacher's target tokens "
                  f"left unaligned in training: {p['unaligned_share']:.1%}.", "",
                  "| variant | seeds | test bpb | outside bpb | byte agreement |", "|---|---|---|---|---|"]  # fmt: skip
        if p.get("start"):
            st = p["start"]
            lines.append(f"| the student before training | | {st['test_bits_per_byte']:.3f} | "
                         f"{st['outside_bits_per_byte']:.3f} | {st['agreement']:.3f} |")  # fmt: skip
        for name, row in s["variants"].items():
            lines.append(
                f"| {VARIANTS[name][0]} | {', '.join(map(str, row['seeds']))} | {row['test_bits_per_byte']:.3f} | "
                f"{row['outside_bits_per_byte']:.3f} | {row['agreement']:.3f} |"
            )
        lines += ["", "Against SFT (method - sft, mean over seeds, 95% bootstrap interval over seeds and documents; "
                  "`beats` where the whole interval is on the better side):", "",
                  "| method | test bpb | outside bpb | byte agreement |", "|---|---|---|---|"]  # fmt: skip
        for c in s["comparisons"]:
            cells = []
            for key, lower_better in (
                ("test_bits_per_byte", True),
                ("outside_bits_per_byte", True),
                ("agreement", False),
            ):
                x = c[key]
                lo, hi = x["ci95"]
                beats = (hi < 0) if lower_better else (lo > 0)
                cells.append(f"{x['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]{' beats' if beats else ''}")
            lines.append(f"| {VARIANTS[c['a']][0]} | " + " | ".join(cells) + " |")
        lines += ["", *verdict(s["comparisons"])]
    took = ", ".join(f"{pair}: {p['seconds'] / 60:.0f} min" for pair, p in result["pairs"].items())
    seeds = " ".join(map(str, result["seeds"]))
    lines += ["", f"Command: `.venv/bin/python bench/cross_tokenizer.py --seeds {seeds}` ({took}, training and "
              "judging in all, on a machine shared with other runs)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def verdict(comparisons: list[dict]) -> list[str]:
    """One line per method: where it beats SFT beyond the paired noise, where SFT beats it, where neither."""
    names = {
        "test_bits_per_byte": "test bpb",
        "outside_bits_per_byte": "outside bpb",
        "agreement": "byte agreement",
    }
    out = []
    for c in comparisons:
        wins, losses, ties = [], [], []
        for key, label in names.items():
            lo, hi = c[key]["ci95"]
            better, worse = (hi < 0, lo > 0) if key != "agreement" else (lo > 0, hi < 0)
            (wins if better else losses if worse else ties).append(label)
        parts = [f"beats SFT on {', '.join(wins)}" if wins else "",
                 f"loses to SFT on {', '.join(losses)}" if losses else "",
                 f"is within the noise of SFT on {', '.join(ties)}" if ties else ""]  # fmt: skip
        out.append(f"- **{VARIANTS[c['a']][0]}** " + "; ".join(p for p in parts if p) + ".")
    return out


def unaligned_share(run_dir: Path, seeds: list[int]) -> float:
    """Unaligned / target tokens over the KD trainings' logged steps."""
    from distill.tracking import read_metrics

    unaligned = targets = 0
    for name in ("uld", "uld_ce", "byte", "byte_ce"):
        for seed in seeds:
            path = run_dir / f"bench-{name}-s{seed}" / "metrics.jsonl"
            for r in read_metrics(path) if path.exists() else []:
                if "targets" in r:
                    unaligned, targets = unaligned + r["unaligned"], targets + r["targets"]
    return unaligned / targets if targets else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cross_tokenizer.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "cross-tokenizer-study.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs page from --out")
    parser.add_argument("--steps", type=int, help="a smoke run: this many steps, in a separate run directory")
    args = parser.parse_args()
    global STEPS
    STEPS = args.steps
    if args.render_only:
        Path(args.docs).write_text(render(json.loads(Path(args.out).read_text())))
        return
    import os

    from distill.tokenizer import load_tokenizer

    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {
        "seeds": args.seeds,
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "pairs": previous.get("pairs", {}),
    }
    for pair in args.pairs:
        started = time.perf_counter()
        recipe = recipe_of(pair)
        run_dir = recipe.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_run(pair, run_dir)
        seconds = train_all(pair, args.seeds, run_dir)
        finals = {f"{v}-s{s}": run_dir / f"bench-{v}-s{s}" / "final" for v in VARIANTS for s in args.seeds}
        if recipe.student.model:  # a pretrained student: judged before training too, for scale
            finals["start"] = Path(recipe.student.model)
        judged_path = run_dir / "bench-cross-tokenizer-judged.json"
        done = json.loads(judged_path.read_text()) if judged_path.exists() else {}
        done = {k: v for k, v in done.items() if f"{pair}/bench-{k}" not in seconds}  # retrained: judged anew
        judged = judge(
            pair, finals, done, save=lambda figures, p=judged_path: p.write_text(json.dumps(figures))
        )
        store_vocab = json.loads((run_dir / "teacher" / "manifest.json").read_text())["identity"][
            "vocab_size"
        ]
        result["pairs"][pair] = {
            "recipe": PAIRS[pair]["recipe"],
            "steps": recipe.train.max_steps,
            "batch_size": recipe.train.batch_size,
            "student_vocab": len(load_tokenizer(finals[f"sft-s{args.seeds[0]}"])),
            "teacher_vocab": store_vocab,
            "unaligned_share": unaligned_share(run_dir, args.seeds),
            "train_seconds": {**result["pairs"].get(pair, {}).get("train_seconds", {}), **seconds},
            # summed over the runs of this script that made the pair's figures (a rerun adds what it did)
            "seconds": result["pairs"].get(pair, {}).get("seconds", 0.0) + time.perf_counter() - started,
            "summary": summarize(judged, args.seeds),
            "start": {
                "test_bits_per_byte": bpb(judged["start"]["test"]),
                "outside_bits_per_byte": bpb(judged["start"]["outside"]),
                "agreement": share(judged["start"]["agreement"]),
            }
            if "start" in judged
            else None,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.docs).write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
