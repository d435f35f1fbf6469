"""Does on-policy distillation make a better draft? Expected acceptance of on-policy, mixed and offline KD
students of the same size after the same number of training tokens, on the embedded teacher.

    .venv/bin/python bench/onpolicy_vs_offline.py [--warm-steps 60 --steps 60 --seeds 1 2 3]

The embedded teacher (`recipes/tiny.yaml`, pretrained or reused from the cache) samples a teacher store
(vLLM, `generate.mode=sample`, several completions of each corpus prompt, 32 new tokens, enough that
no offline run repeats one) and a held-out store. tiny.yaml's student
first learns offline for `--warm-steps` (as a real run would: on-policy from a random student samples
noise; seed 0), then continues from that checkpoint for `--steps` more steps, once per mode and seed
(seeds other than the warm-up's, so the offline runs read the store in another order):
- offline: forward KL on teacher samples from the store;
- mixed: GKD's lambda 0.5, half the micro-batches sampled by the student;
- on_policy: every micro-batch sampled by the student (prompts from the same corpus), scored by the
  teacher behind `vllm serve`.
Same batch, prompt and completion lengths, so the trained token counts match (reported). Each student is
then measured the same way: expected acceptance (sum_v min(p_student, p_teacher), teacher top-k) on
completions it samples for held-out prompts, plus KL to the teacher and CE on the held-out store.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import load_recipe  # noqa: E402
from distill.pipeline import open_run  # noqa: E402
from distill.stages.generate import generate  # noqa: E402
from distill.stages.train import train, train_teacher  # noqa: E402
from distill.vllm.engine import teacher_engine_args  # noqa: E402


def train_student(recipe, **kwargs):
    return train(open_run(recipe, train_teacher(recipe), progress=False), **kwargs)


from distill.vllm.server import VllmServer  # noqa: E402

MODES = {
    "offline": ["train.mode=offline"],
    "mixed": ["train.mode=on_policy", "train.on_policy.lmbda=0.5"],
    "on_policy": ["train.mode=on_policy", "train.on_policy.lmbda=1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "onpolicy_vs_offline.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="distill-onpolicy-vs-offline-"))
    # enough teacher samples that no offline run sees one twice (the corpus has 512 prompts)
    sequences = args.batch * (args.warm_steps + args.steps * len(args.seeds))
    base = [
        "tracking.wandb=disabled",
        f"runs_dir={work / 'runs'}",
        "generate.mode=sample",
        f"generate.max_new_tokens={args.new_tokens}",
        f"generate.samples_per_prompt={-(-sequences // 512)}",
        "generate.validation_sequences=64",
        "generate.top_k=32",
        "train.on_policy.prompt_tokens=32",
        f"train.on_policy.max_new_tokens={args.new_tokens}",
        "train.on_policy.eval_prompts=64",
        f"train.batch_size={args.batch}",
        "train.grad_accum=1",
        "train.log_every=10",
        "train.warmup_steps=5",
        "train.keep_last=1",
    ]

    def recipe(*overrides: str):
        return load_recipe(ROOT / "recipes" / "tiny.yaml", [*base, *overrides])

    first = recipe()
    run = open_run(first)
    teacher = run.teacher
    generate(run)  # vLLM in this process, shut down before the server starts
    generate(run, split="validation")
    results: dict = {"batch": args.batch, "new_tokens": args.new_tokens, "warm_steps": args.warm_steps}
    results["steps"], results["runs"] = args.steps, {}
    try:
        with VllmServer(teacher_engine_args(first, teacher), work / "server.log") as server:
            url = f"train.on_policy.teacher_url={server.url}"
            steps = [f"train.max_steps={args.warm_steps}", f"train.eval_every={args.warm_steps}"]
            warm = train_student(recipe(*MODES["offline"], *steps, "train.lr=3e-3", url), progress=False)
            results["warm"] = {"val_acceptance": warm.val_acceptance, "val_kl": warm.val_kl}
            warm_dir = work / "warm"
            shutil.copytree(warm.final_dir, warm_dir)
            for seed in args.seeds:
                for mode, overrides in MODES.items():
                    runs = work / f"{mode}-{seed}"
                    shutil.copytree(work / "runs", runs, ignore=shutil.ignore_patterns("student"))
                    r = train_student(
                        recipe(
                            *overrides,
                            f"runs_dir={runs}",
                            f"student.model={warm_dir}",
                            "student.tiny=null",
                            f"train.seed={seed}",
                            f"train.max_steps={args.steps}",
                            f"train.eval_every={args.steps}",
                            "train.lr=1e-3",
                            url,
                        ),
                        progress=False,
                    )
                    results["runs"][f"{mode}/seed{seed}"] = {
                        "val_acceptance": r.val_acceptance,
                        "val_kl": r.val_kl,
                        "val_ce": r.val_loss,
                        "tokens": r.tokens,
                    }
                    print(mode, seed, results["runs"][f"{mode}/seed{seed}"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for mode in MODES:
        runs = [v for k, v in results["runs"].items() if k.startswith(f"{mode}/")]
        summary[mode] = {
            key: float(np.mean([r[key] for r in runs]))
            for key in ("val_acceptance", "val_kl", "val_ce", "tokens")
        }
        summary[mode]["val_acceptance_min"] = min(r["val_acceptance"] for r in runs)
        summary[mode]["val_acceptance_max"] = max(r["val_acceptance"] for r in runs)
    results["mean_over_seeds"] = summary
    results["acceptance_on_policy_minus_offline"] = (
        summary["on_policy"]["val_acceptance"] - summary["offline"]["val_acceptance"]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
