"""Prune, then distill: how much of SmolLM2-135M-Instruct a student cut to half its size gets back, and
with what (issue #17's recovery study).

    .venv/bin/python bench/prune_recovery.py [--seeds 0 1 2] [--measured-seed 0]

Students, all of 70.8 M parameters (the teacher has 134.5 M), trained alike: recipes/smollm2-135m.yaml's
steps, batch, learning rate and teacher samples (its run's teacher store, copied into a bench run):
- `depth`: 12 of the 30 layers, the block whose removal moves the teacher's distribution least dropped
  (`student.cut.select: kl`); `even`: 12 evenly spaced layers; `width`: all 30 layers, narrower (residual
  width 384 of 576, 6 of 9 heads in 2 of 3 KV groups, 1160 of 1536 MLP channels, by activation).
- Each untrained (the pruned model as it is), and trained: `sft` (CE on the teacher's samples), `kd`
  (forward KL on the top-32 plus the sampled tail: the unbiased loss of docs/kd-vs-sft.md), `kd_hidden`
  (kd + train.hidden: cosine between the student's layers just after the dropped block and mid-way and
  the teacher layers they stand for).
Judged where no objective reaches (distill.heldout.measure, dense teacher, fp32): bits per byte, full-
vocabulary KL(teacher || student) and top-1 agreement on corpus test documents, `outside` documents (text
not in the corpus) and the teacher's answers to the held-out instruction prompts; the expected acceptance
as the teacher's draft (greedy, k = serve.num_speculative_tokens, the serving benchmark's prompts); for
`--measured-seed`, the acceptance vLLM measures with the student as the teacher's draft_model, and per
architecture the tokens/s vLLM serves alone. Comparisons are paired: the same documents, students of the
same seed, a bootstrap over seeds and documents (bench/kd_vs_sft.py's `paired`).

Writes bench/results/prune_recovery.json and docs/prune-recovery.md (generated from the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kd_vs_sft import aggregate, measured_acceptance, paired  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
NAME = "smollm2-prune"  # the bench's run directory, beside the recipe's own
SOURCE_RUN = "smollm2-135m"
STORES = ("teacher", "teacher-validation", "teacher-heldout")

CUTS = {  # name: (description, student.cut overrides)
    "depth": ("depth: 12 layers, KL-chosen block dropped", ["student.cut.num_layers=12", "student.cut.select=kl"]),
    "even": ("depth: 12 evenly spaced layers", ["student.cut.num_layers=12"]),
    "width": ("width: 30 layers, 384 wide, 6/2 heads, 1160 MLP",
              ["student.cut.hidden_size=384", "student.cut.num_heads=6", "student.cut.num_kv_heads=2",
               "student.cut.intermediate_size=1160"]),
}  # fmt: skip
KD = ["train.loss=forward_kl", "train.temperature=1.0", "train.tail=sample", "train.ce_weight=0"]
TRAININGS = {  # name: (description, train overrides); `hidden` pairs are filled in from the cut's layers
    "sft": ("SFT (CE on the teacher's samples)", ["train.loss=ce"]),
    "kd": ("KD (top-32 + sampled tail)", KD),
    "kd_hidden": ("KD + hidden-state cosine", KD),
}
VARIANTS = ["depth/untrained", "depth/sft", "depth/kd", "depth/kd_hidden", "even/untrained", "even/kd",
            "width/untrained", "width/sft", "width/kd"]  # fmt: skip
COMPARISONS = [  # (a, b, what it answers)
    ("depth/kd", "depth/sft", "KD against SFT"),
    ("width/kd", "width/sft", "KD against SFT, width cut"),
    ("depth/kd_hidden", "depth/kd", "the hidden-state loss added to KD"),
    ("width/kd", "depth/kd", "width against depth pruning (equal parameters)"),
    ("even/kd", "depth/kd", "evenly spaced against KL-chosen layers"),
]
SOURCES = ("test", "outside", "instructions")
METRICS = ("bits_per_byte", "kl", "top1")


def recipe_for(cut: str, extra: list[str] = ()):
    from distill.config import load_recipe

    overrides = [f"name={NAME}", "tracking.wandb=disabled", "student.cut.layers=null", *CUTS[cut][1], *extra]
    return load_recipe(RECIPE, overrides), overrides


def cut_dir(cut: str) -> Path:
    """The pruned student (made once, cached by distill) of `cut`."""
    from distill.models import local_models

    recipe, _ = recipe_for(cut)
    return Path(local_models(recipe, log=lambda line: print(line, flush=True)).student.model)


def hidden_pairs(cut: str) -> list[list[int]]:
    """Student layers just after the dropped block and mid-way through the rest, each paired with the
    teacher layer it was cut from (a width cut keeps every layer: the same two depths)."""
    kept = json.loads((cut_dir(cut) / "distill-cut.json").read_text())["layers"]
    after = next((i for i in range(1, len(kept)) if kept[i] != kept[i - 1] + 1), len(kept) // 3)
    middle = (after + len(kept) - 1) // 2
    return [[after, kept[after]], [middle, kept[middle]]]


def prepare_run(run_dir: Path) -> None:
    """The bench run's teacher stores: the recipe's run's, copied (made by `distill run` if missing)."""
    source = run_dir.parent / SOURCE_RUN
    if not (source / "teacher" / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "distill", "run", str(RECIPE), "--only", "generate"], check=True, cwd=ROOT
        )
    for name in STORES:
        if (source / name).exists() and not (run_dir / name).exists():
            shutil.copytree(source / name, run_dir / name)


def train_all(cuts_trainings: list[tuple[str, str]], seeds: list[int], run_dir: Path) -> dict[str, float]:
    seconds = {}
    for seed in seeds:  # every variant of a seed before the next seed: partial results stay paired
        for cut, training in cuts_trainings:
            out = f"bench-{cut}-{training}-s{seed}"
            if (run_dir / out / "final" / "config.json").exists():
                continue
            extra = list(TRAININGS[training][1])
            if training == "kd_hidden":
                extra.append(f"train.hidden={{pairs: {hidden_pairs(cut)}, loss: cosine, weight: 1.0}}")
            _, overrides = recipe_for(cut, extra)
            cmd = [sys.executable, "-m", "distill", "train", str(RECIPE), *overrides, f"train.output={out}",
                   f"train.seed={seed}", f"train.eval_every={10**6}", "train.eval_batches=1", "--overwrite",
                   "--no-progress"]  # fmt: skip
            print("$", " ".join(cmd[3:]), flush=True)
            started = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds[out] = time.perf_counter() - started
            print(f"  {seconds[out]:.0f} s", flush=True)
    return seconds


def judge(students: dict[str, Path], run_dir: Path, documents: int, done: dict, save=None) -> dict:
    """Per student: per-document figures by source and the expected acceptance; `done` kept as it is;
    `save(figures)` after each student (a killed bench resumes from there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.acceptance import draft_tokens, predict, teacher_continuations
    from distill.heldout import Documents, measure, outside_documents, serving_prompts
    from distill.models import local_models
    from distill.stages.prepare import prepare
    from distill.store import TeacherStore
    from distill.tokenizer import load_tokenizer

    recipe = local_models(recipe_for("depth")[0])
    data = prepare(recipe)
    teacher_dir = Path(recipe.teacher.model)
    tokenizer = load_tokenizer(teacher_dir)
    texts = {"test": data.corpus.texts("test"), "outside": [d["text"] for d in outside_documents()]}
    docs = {s: Documents.encode(t, tokenizer, recipe.data.seq_len, documents) for s, t in texts.items()}
    if (run_dir / "teacher-heldout" / "manifest.json").exists():
        docs["instructions"] = Documents.responses(
            list(TeacherStore(run_dir / "teacher-heldout").rows()), tokenizer
        )
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    bench, k = recipe.serve.bench, recipe.serve.num_speculative_tokens
    continuations = teacher_continuations(
        teacher_dir, serving_prompts(bench, data.tokens_dir), bench.max_tokens, 0.0
    )
    out = dict(done)
    if "teacher" not in out:
        out["teacher"] = {s: measure(teacher, None, d) for s, d in docs.items()}
    for name, path in students.items():
        if name in out:
            continue
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        row = {s: measure(model, teacher, d) for s, d in docs.items()}
        row["expected_acceptance"] = predict(draft_tokens(path, continuations), continuations, k, 0.0)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        out[name] = row
        if save:
            save(out)
        print(f"judged {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def served_speed(model_dir: Path) -> dict[str, float]:
    """vLLM serving `model_dir` alone: the serving benchmark's prompts at once, greedy, output tokens/s."""
    from vllm import LLM, SamplingParams

    from distill.heldout import serving_prompts
    from distill.models import local_models
    from distill.stages.prepare import prepare
    from distill.vllm.engine import engine_kwargs, shutdown_engine

    recipe = local_models(recipe_for("depth")[0])
    prompts = [
        {"prompt_token_ids": ids} for ids in serving_prompts(recipe.serve.bench, prepare(recipe).tokens_dir)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=recipe.serve.bench.max_tokens, ignore_eos=True)
    llm = LLM(**engine_kwargs(str(model_dir)))
    try:
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            best = max(best, tokens / (time.perf_counter() - started))
    finally:
        shutdown_engine(llm)
    return {"tokens_per_s": best, "requests": len(prompts), "max_tokens": recipe.serve.bench.max_tokens}


# --------------------------------------------------------------------------- summary


def student_name(variant: str, seed: int) -> str:
    cut, training = variant.split("/")
    return cut if training == "untrained" else f"{cut}-{training}-s{seed}"


def summarize(judged: dict, seeds: list[int], measured: dict, speed: dict) -> dict:
    rng = np.random.default_rng(0)
    sources = [s for s in SOURCES if s in judged["teacher"]]
    teacher = {f"{s}_bits_per_byte": aggregate(judged["teacher"][s], "bits_per_byte") for s in sources}
    rows = {}
    for v in VARIANTS:  # each over the seeds it was trained with (an untrained cut: one for all)
        have = [seed for seed in seeds if student_name(v, seed) in judged]
        names = [student_name(v, seed) for seed in have]
        if not names:
            continue
        row = {"parameters": judged[names[0]]["parameters"], "seeds": have, "per_seed": {}}
        for s in sources:
            for m in METRICS:
                values = [aggregate(judged[n][s], m) for n in names]
                row["per_seed"][f"{s}_{m}"] = values
                row[f"{s}_{m}"] = float(np.mean(values))
        row["expected_acceptance"] = float(
            np.mean([judged[n]["expected_acceptance"]["acceptance_rate"] for n in names])
        )
        row["measured_acceptance"] = measured.get(names[0], {}).get("acceptance_rate")
        row["tokens_per_s"] = speed.get(v.split("/")[0], {}).get("tokens_per_s")
        rows[v] = row
    for v, row in rows.items():  # the share of the teacher-to-pruned gap recovered, against its own cut
        base = rows.get(f"{v.split('/')[0]}/untrained")
        if base is None or v.endswith("untrained"):
            continue
        for s in sources:
            gap = base[f"{s}_bits_per_byte"] - teacher[f"{s}_bits_per_byte"]
            row[f"{s}_bpb_recovered"] = (base[f"{s}_bits_per_byte"] - row[f"{s}_bits_per_byte"]) / gap
            row[f"{s}_kl_recovered"] = (base[f"{s}_kl"] - row[f"{s}_kl"]) / base[f"{s}_kl"]
    comparisons = []
    for a, b, what in COMPARISONS:
        if a not in rows or b not in rows:
            continue
        both = [seed for seed in seeds if all(student_name(v, seed) in judged for v in (a, b))]
        entry = {"a": a, "b": b, "what": what, "seeds": both}  # paired over the seeds both were trained with
        for s in sources:
            for m in METRICS:
                runs = [[judged[student_name(v, seed)][s] for seed in both] for v in (a, b)]
                entry[f"{s}_{m}"] = paired(runs[0], runs[1], m, rng)
        comparisons.append(entry)
    return {"teacher": teacher, "variants": rows, "comparisons": comparisons}


def render(result: dict) -> str:
    """docs/prune-recovery.md from the JSON (never edited by hand)."""
    s = result["summary"]
    t = s["teacher"]
    lines = [
        "# Prune, then distill: the recovery study on SmolLM2-135M-Instruct",
        "",
        "<!-- generated by bench/prune_recovery.py from bench/results/prune_recovery.json; do not edit -->",
        "",
        f"Teacher SmolLM2-135M-Instruct ({result['teacher_parameters'] / 1e6:.1f} M parameters); every student "
        f"{s['variants']['depth/untrained']['parameters'] / 1e6:.1f} M, trained {result['steps']} steps of "
        f"batch {result['batch_size']} on the same teacher samples (recipes/smollm2-135m.yaml), seeds "
        f"{', '.join(map(str, result['seeds']))} (each comparison over the seeds both of its students were "
        f"trained with; the seeds of each are listed below). Held-out: {result['documents']['test']} corpus test "
        "documents, "
        f"{result['documents']['outside']} `outside` documents (not in the corpus) and the teacher's answers to "
        f"{result['documents'].get('instructions', 0)} held-out instruction prompts. bpb and KL: lower is "
        "better; `recovered`: the share of the gap between the untrained cut and the teacher that training "
        "closed (bpb; KL, whose teacher value is 0). Measured acceptance and tokens/s: vLLM, seed "
        f"{result['measured_seed']}, greedy, k = {result['k']}, on this machine ({result['machine']}).",
        "",
        f"Teacher: test bpb {t['test_bits_per_byte']:.3f}, outside bpb {t['outside_bits_per_byte']:.3f}"
        + (
            f", instruction answers bpb {t['instructions_bits_per_byte']:.3f}"
            if "instructions_bits_per_byte" in t
            else ""
        )
        + f"; vLLM alone {result['speed'].get('teacher', {}).get('tokens_per_s', float('nan')):.0f} tokens/s.",
        "",
        "| student | seeds | test bpb | outside bpb | KL test | KL outside | top-1 test | top-1 instr. | recovered bpb "
        "test / outside | recovered KL test | expected acc. | measured acc. | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt=".3f"):
        return "" if x is None else format(x, fmt)

    for v in VARIANTS:
        r = s["variants"].get(v)
        if r is None:
            continue
        cut, training = v.split("/")
        name = f"{CUTS[cut][0]}, {'untrained' if training == 'untrained' else TRAININGS[training][0]}"
        recovered = "" if training == "untrained" else (
            f"{r['test_bpb_recovered']:.0%} / {r['outside_bpb_recovered']:.0%}")  # fmt: skip
        lines.append(
            f"| {name} | {'' if training == 'untrained' else ', '.join(map(str, r.get('seeds', result['seeds'])))} | "
            f"{f(r['test_bits_per_byte'])} | {f(r['outside_bits_per_byte'])} | {f(r['test_kl'])} | "
            f"{f(r['outside_kl'])} | {f(r['test_top1'])} | {f(r.get('instructions_top1'))} | {recovered} | "
            f"{'' if training == 'untrained' else format(r['test_kl_recovered'], '.0%')} | "
            f"{f(r['expected_acceptance'])} | {f(r['measured_acceptance'])} | {f(r['tokens_per_s'], '.0f')} |"
        )
    lines += ["", "Paired differences (a - b, mean over seeds, 95% bootstrap interval over seeds and documents):", "",
              "| a against b | seeds | test bpb | outside bpb | KL test | KL outside | top-1 instr. |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip

    def d(c, key):
        if key not in c:
            return ""
        x = c[key]
        return f"{x['diff']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"

    for c in s["comparisons"]:
        lines.append(
            f"| {c['what']} (`{c['a']}` − `{c['b']}`) | {', '.join(map(str, c.get('seeds', result['seeds'])))} | "
            f"{d(c, 'test_bits_per_byte')} | {d(c, 'outside_bits_per_byte')} | "
            f"{d(c, 'test_kl')} | {d(c, 'outside_kl')} | {d(c, 'instructions_top1')} |"
        )
    lines += ["", "Per seed (test bpb / outside bpb / test KL):", ""]
    for v in VARIANTS:
        r = s["variants"].get(v)
        if r is None or v.endswith("untrained"):
            continue
        p = r["per_seed"]
        cells = [f"seed {seed}: {a:.3f} / {b:.3f} / {c:.3f}" for seed, a, b, c in
                 zip(r.get("seeds", result["seeds"]), p["test_bits_per_byte"], p["outside_bits_per_byte"],
                     p["test_kl"], strict=True)]  # fmt: skip
        lines.append(f"- `{v}`: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--measured-seed", type=int, default=0)
    parser.add_argument(
        "--train",
        nargs="+",
        metavar="VARIANT",
        help="train only these variants' missing seeds (default: all)",
    )
    parser.add_argument("--documents", type=int, default=48, help="test and outside documents each")
    parser.add_argument("--no-vllm", action="store_true", help="skip measured acceptance and tokens/s")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune_recovery.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "prune-recovery.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs table from --out")
    args = parser.parse_args()
    if args.render_only:
        Path(args.docs).write_text(render(json.loads(Path(args.out).read_text())))
        return

    import os

    from distill.models import local_models

    started = time.perf_counter()
    recipe = local_models(recipe_for("depth")[0])
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run(run_dir)
    trained = [tuple(v.split("/")) for v in VARIANTS if not v.endswith("untrained")]
    seconds = train_all(
        [(c, t) for c, t in trained if f"{c}/{t}" in (args.train or VARIANTS)], args.seeds, run_dir
    )
    students = {c: cut_dir(c) for c in CUTS}
    finals = {
        f"{c}-{t}-s{s}": run_dir / f"bench-{c}-{t}-s{s}" / "final" for c, t in trained for s in args.seeds
    }
    students.update({name: path for name, path in finals.items() if (path / "config.json").exists()})
    judged_path = run_dir / "bench-prune-recovery-judged.json"  # per-document figures, to re-summarise from
    done = json.loads(judged_path.read_text()) if judged_path.exists() else {}
    done = {k: v for k, v in done.items() if f"bench-{k}" not in seconds}  # retrained: judged anew
    judged = judge(
        students,
        run_dir,
        args.documents,
        done,
        save=lambda figures: judged_path.write_text(json.dumps(figures)),
    )
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    measured = {k: v for k, v in previous.get("measured", {}).items() if f"bench-{k}" not in seconds}
    speed = dict(previous.get("speed", {}))
    if not args.no_vllm:
        for v in VARIANTS:
            name = student_name(v, args.measured_seed)
            if not v.endswith("untrained") and name not in measured:
                measured[name] = measured_acceptance(recipe, students[name])
                print(f"measured {name}: {measured[name]}", flush=True)
        for arch, model in (
            ("teacher", Path(recipe.teacher.model)),
            ("depth", students["depth"]),
            ("width", students["width"]),
        ):
            if arch not in speed:
                speed[arch] = served_speed(model)
                print(f"served {arch}: {speed[arch]}", flush=True)
        speed["even"] = speed["depth"]  # the same architecture
    teacher_parameters = sum(int(np.prod(shape)) for shape in _shapes(Path(recipe.teacher.model)))
    result = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "steps": recipe.train.max_steps,
        "batch_size": recipe.train.batch_size,
        "seeds": args.seeds,
        "measured_seed": args.measured_seed,
        "k": recipe.serve.num_speculative_tokens,
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "teacher_parameters": teacher_parameters,
        "documents": {s: len(judged["teacher"][s]["nll"]) for s in SOURCES if s in judged["teacher"]},
        "cuts": {c: {"overrides": CUTS[c][1], "record": _record(students[c])} for c in CUTS},
        "hidden_pairs": hidden_pairs("depth"),
        "train_seconds": {**previous.get("train_seconds", {}), **seconds},
        "seconds": time.perf_counter() - started,
        "measured": measured,
        "speed": speed,
        "summary": summarize(judged, args.seeds, measured, speed),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.docs).write_text(render(result))
    print(render(result))


def _shapes(model_dir: Path):
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118
                yield weights.get_slice(name).get_shape()


def _record(path: Path) -> dict:
    made = json.loads((path / "distill-cut.json").read_text())
    chosen = made.get("chosen") or {}
    return {"layers": made["layers"], "select": chosen.get("select", "even"), "width": chosen.get("width")}


if __name__ == "__main__":
    main()
