"""Should the demo train as 2 processes? `distill train` of recipes/tiny.yaml's student as one process
vs `accelerate launch` DDP over 2 processes (gloo) with half the per-process batch, so the global batch,
the tokens and the optimisation are the same; wall time end to end (launch included) and the training
loop's tokens/s, on the same teacher store.

    .venv/bin/python bench/train_processes.py [RUN_DIR] [--repeats 2]

RUN_DIR is a run of recipes/tiny.yaml with its teacher stores (default runs/tiny; `make demo` makes it).
Results: bench/results/train_processes.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUPS = {
    "1 process": ["train.distributed.backend=none", "train.distributed.num_processes=1"],
    "DDP 2 processes": ["train.distributed.backend=ddp", "train.distributed.num_processes=2"],
}


def run(run_dir: Path, recipe: Path, name: str, overrides: list[str], batch: int) -> dict:
    out = f"bench-{name.split()[0].lower()}"
    cmd = [sys.executable, "-m", "distill", "train", str(recipe), f"train.output={out}",
           f"train.batch_size={batch}", "tracking.wandb=disabled", *overrides, "--overwrite", "--no-progress"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: distill train exited {done.returncode}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    last = [r for r in rows if "val_kl" in r][-1]
    return {"seconds": seconds, "tokens_per_s_median": statistics.median(speeds), "tokens": last["tokens"],
            "val_kl": last["val_kl"], "output": str(run_dir / out)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    sys.path.insert(0, str(ROOT))
    from distill.config import load_recipe

    # `distill train` rewrites <run>/recipe.yaml with its overrides: read a copy, put the original back
    original = (run_dir / "recipe.yaml").read_text()
    batch = load_recipe(run_dir / "recipe.yaml").train.batch_size
    if batch % 2:
        raise SystemExit(f"train.batch_size={batch} is odd: 2 processes cannot split it evenly")
    results: dict[str, list[dict]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(original)
        try:
            for _ in range(args.repeats):  # interleaved, so drift of the machine hits both
                for name, overrides in SETUPS.items():
                    per_process = batch if name == "1 process" else batch // 2
                    results[name].append(run(run_dir, recipe, name, overrides, per_process))
                    print(f"{name}: {results[name][-1]['seconds']:.1f}s, "
                          f"{results[name][-1]['tokens_per_s_median']:,.0f} tokens/s", flush=True)  # fmt: skip
        finally:
            (run_dir / "recipe.yaml").write_text(original)
    one, two = results["1 process"], results["DDP 2 processes"]
    summary = {
        "recipe": str(run_dir / "recipe.yaml"),
        "global_batch": batch,
        "runs": results,
        "wall_ratio_2_over_1": statistics.median(r["seconds"] for r in two)
        / statistics.median(r["seconds"] for r in one),
        "loop_speed_ratio_2_over_1": statistics.median(r["tokens_per_s_median"] for r in two)
        / statistics.median(r["tokens_per_s_median"] for r in one),
        "same_tokens": one[0]["tokens"] == two[0]["tokens"],
        "val_kl_abs_difference": abs(one[0]["val_kl"] - two[0]["val_kl"]),
    }
    out = ROOT / "bench" / "results" / "train_processes.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"2 processes / 1 process: wall time {summary['wall_ratio_2_over_1']:.2f}x, training-loop tokens/s "
          f"{summary['loop_speed_ratio_2_over_1']:.2f}x; same tokens: {summary['same_tokens']}, held-out KL "
          f"differs by {summary['val_kl_abs_difference']:.1e} -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
