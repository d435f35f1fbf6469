"""On-policy rounds: where the time goes, and vLLM vs transformers for each engine's part, in one run.

    .venv/bin/python bench/onpolicy.py [--rounds 6 --batch 8 --prompt-tokens 32 --new-tokens 64]

1. Rounds. The embedded teacher (`distill pretrain recipes/tiny.yaml`, reused from the cache) runs behind
   `vllm serve` on loopback, as in `train.mode=on_policy`; the student is tiny.yaml's. Each round the
   student samples `batch` completions of corpus prompts, the server scores them (top-k prompt logprobs
   from the first completion token), and the student takes one optimizer step (forward KL, the training
   loop's own `micro_batch_loss`). Done twice: the student sampling with transformers `generate`, then
   with its vLLM sampler reloaded from the trainer's weights every round (`refresh_every: 1`, the
   costliest setting; its reload time is reported on its own). Mean seconds per part, first round
   dropped as warm-up.
2. Teacher scoring tokens/s: the round's sequences (all positions) scored by the server and by a
   transformers forward of the same teacher (`HfTeacher`), top-k each.
3. Student sampling tokens/s, transformers `generate` vs a vLLM engine, at three student sizes (freshly
   initialised: weights do not change the cost), per token actually sampled.
Ratios are what to read: absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import TinyModelConfig, load_recipe  # noqa: E402
from distill.models import build_tiny_llama  # noqa: E402
from distill.pipeline import open_run  # noqa: E402
from distill.store import collate  # noqa: E402
from distill.teacher import HfTeacher  # noqa: E402
from distill.tokenizer import load_tokenizer  # noqa: E402
from distill.training.loop import micro_batch_loss  # noqa: E402
from distill.training.onpolicy import Prompts, VllmSampler, sample_hf  # noqa: E402
from distill.vllm.client import TeacherClient  # noqa: E402
from distill.vllm.engine import teacher_engine_args  # noqa: E402
from distill.vllm.server import VllmServer  # noqa: E402

SIZES = {  # name: (hidden, layers, heads, intermediate)
    "student_tiny_yaml": None,
    "width512_layers8": (512, 8, 8, 1536),
    "width1024_layers12": (1024, 12, 16, 3072),
}


class Clock:
    """`with Clock() as c: ...` then c.s is the seconds the block took."""

    def __enter__(self) -> Clock:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.start


def timed(fn):
    with Clock() as clock:
        result = fn()
    return result, clock.s


def rounds(model, recipe, prompts, client, pad, args, sampler=None) -> tuple[dict, list]:
    """Mean seconds of each part of an on-policy round (first round dropped), and the scored items."""
    import torch

    cfg = recipe.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    parts: dict[str, list[float]] = {"sample_s": [], "score_s": [], "train_s": []}
    if sampler is not None:
        parts["refresh_s"] = []
    items = []
    for r in range(args.rounds + 1):
        chunk = prompts[(r * args.batch) % len(prompts) :][: args.batch]
        times = {}
        if sampler is not None:
            with Clock() as clock:
                sampler.refresh(model, r)
            times["refresh_s"] = clock.s
            with Clock() as clock:
                completions = sampler.sample(chunk, seed=r)
        else:
            with Clock() as clock:
                completions = sample_hf(model, chunk, cfg.on_policy, pad, None, seed=r)
        times["sample_s"] = clock.s
        items = [(f"r{r}-{i}", p + c) for i, (p, c) in enumerate(zip(chunk, completions, strict=True))]
        with Clock() as clock:
            captures = client.score(items, start=[len(p) - 1 for p in chunk])
        times["score_s"] = clock.s
        batch = collate(captures, client.k, pad)
        with Clock() as clock:
            model.train()
            loss, _, tokens = micro_batch_loss(model, batch, cfg, 1.0, sampled=True)
            (loss / tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times["train_s"] = clock.s
        if r:  # the first round warms caches and kernels up
            for key, value in times.items():
                parts[key].append(value)
    out = {key: float(np.mean(values)) for key, values in parts.items()}
    out["round_s"] = sum(out.values())
    out["share"] = {key: out[key] / out["round_s"] for key in parts}
    return out, items


def scoring(client, teacher_dir: Path, items, k: int) -> dict:
    import torch

    hf = HfTeacher(str(teacher_dir), k, "cpu", torch.float32, batch_size=len(items))
    hf.score(items[:2])
    client.score(items[:2])
    positions = sum(len(ids) - 1 for _, ids in items)
    best = {"vllm": float("inf"), "hf": float("inf")}
    for _ in range(3):  # alternate, keep each one's best: the machine is shared
        best["vllm"] = min(best["vllm"], timed(lambda: client.score(items))[1])
        best["hf"] = min(best["hf"], timed(lambda: hf.score(items))[1])
    return {
        "positions": positions,
        "vllm_server_tokens_per_s": positions / best["vllm"],
        "transformers_tokens_per_s": positions / best["hf"],
        "ratio_vllm_over_transformers": best["hf"] / best["vllm"],
    }


def sampling(recipe, tokenizer, tokenizer_dir, prompts, work: Path) -> dict:
    cfg = recipe.train.on_policy
    pad = tokenizer.pad_token_id
    out = {}
    for name, shape in SIZES.items():
        tiny = recipe.student.tiny
        if shape is not None:
            hidden, layers, heads, inter = shape
            tiny = TinyModelConfig(
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=heads,
                intermediate_size=inter,
                max_position_embeddings=512,
            )
        model = build_tiny_llama(tiny, tokenizer, seed=0)
        params = sum(p.numel() for p in model.parameters())
        sample_hf(model, prompts[:2], cfg, pad, None, seed=0)
        hf = vllm = float("inf")  # seconds per sampled token (completions may stop early at EOS)
        for seed in (1, 2):
            with Clock() as clock:
                completions = sample_hf(model, prompts, cfg, pad, None, seed=seed)
            hf = min(hf, clock.s / sum(len(c) for c in completions))
        max_len = cfg.prompt_tokens + cfg.max_new_tokens
        with Clock() as start:
            sampler = VllmSampler(model, tokenizer_dir, work / name, cfg, max_len, None)
        try:
            sampler.sample(prompts[:2], seed=0)
            for seed in (1, 2):
                with Clock() as clock:
                    completions = sampler.sample(prompts, seed=seed)
                vllm = min(vllm, clock.s / sum(len(c) for c in completions))
            with Clock() as refresh:
                sampler.refresh(model, 1)
        finally:
            sampler.close()
        out[name] = {
            "parameters": params,
            "transformers_tokens_per_s": 1 / hf,
            "vllm_tokens_per_s": 1 / vllm,
            "ratio_vllm_over_transformers": hf / vllm,
            "vllm_engine_start_s": start.s,
            "vllm_refresh_s": refresh.s,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "onpolicy.json"))
    args = parser.parse_args()

    recipe = load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            "tracking.wandb=disabled",
            "train.mode=on_policy",
            f"generate.top_k={args.top_k}",
            f"train.on_policy.prompt_tokens={args.prompt_tokens}",
            f"train.on_policy.max_new_tokens={args.new_tokens}",
        ],
    )
    run = open_run(recipe)
    data, teacher = run.data, run.teacher
    tokenizer = load_tokenizer(data.tokenizer_dir)
    pad = tokenizer.pad_token_id
    prompts = Prompts.from_corpus(data.corpus.root / "prompts.jsonl", tokenizer, args.prompt_tokens).ids
    results: dict = {"batch": args.batch, "new_tokens": args.new_tokens, "top_k": args.top_k}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with VllmServer(teacher_engine_args(recipe, teacher), work / "server.log") as server:
            max_len = json.loads((teacher / "config.json").read_text())["max_position_embeddings"]
            client = TeacherClient(server.url, args.top_k, max_len)
            student = build_tiny_llama(recipe.student.tiny, tokenizer, seed=0)
            results["rounds_transformers_sampler"], items = rounds(
                student, recipe, prompts, client, pad, args
            )
            sampler = VllmSampler(
                student, data.tokenizer_dir, work / "sampler", recipe.train.on_policy, max_len, None
            )
            try:
                results["rounds_vllm_sampler"], _ = rounds(
                    student, recipe, prompts, client, pad, args, sampler
                )
            finally:
                sampler.close()
            results["teacher_scoring"] = scoring(client, teacher, items, args.top_k)
        results["student_sampling"] = sampling(
            recipe, tokenizer, data.tokenizer_dir, prompts[: args.batch], work
        )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
