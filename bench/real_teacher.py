"""The real teacher (SmolLM2-135M-Instruct, from its GGUF file): capture speed, vLLM vs transformers, in
sample and score mode, against this CPU's measured FLOP limit, and teacher-store bytes per token at its
49,152-word vocabulary, in one run.

    .venv/bin/python bench/real_teacher.py [--blocks 32 --seq-len 256 --prompts 16 --max-new-tokens 64]

- Work: score mode scores `--blocks` corpus train blocks of `--seq-len` tokens (its tokenizer); sample
  mode answers `--prompts` instruction prompts (data.prompts: instructions, in its chat template) with
  `--max-new-tokens` tokens each (EOS may end one earlier: tokens/s counts what was produced). Top-32.
- FLOP limit: the best of several fp32 GEMMs (2048 x 2048, torch, all this process's threads), and the
  model's forward cost per token, 2 x its parameters (the tied 49,152 x 576 head counted once as the
  matmul it is, embeddings lookups free) plus attention (2 x 2 x layers x context x width). A backend's
  utilization is its tokens/s x that cost / the measured GEMM rate.
- Size: the vLLM captures of both modes written as our store and, as the baseline, as int32 ids +
  float16 logprobs in the same zstd Parquet (bench/teacher_capture.py's baseline).
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
sys.path.insert(0, str(ROOT / "bench"))

from teacher_capture import baseline_bytes, capture_speed, tokens_of  # noqa: E402

from distill.config import load_recipe  # noqa: E402
from distill.store import id_bits, shard_name, write_shard  # noqa: E402
from distill.teacher import SampleSettings  # noqa: E402

K = 32
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"


def gemm_flops(n: int = 2048, tries: int = 5) -> float:
    """The best fp32 GEMM rate this process reaches (FLOP/s)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def flops_per_token(config: dict, context: int) -> float:
    """Forward FLOPs per token: 2 x the matmul parameters (layers, and the head once) + attention."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * config["intermediate_size"]  # q, k, v, o, MLP
    attention = 2 * 2 * layers * context * config["num_attention_heads"] * head_dim  # scores and values
    return 2 * (layers * per_layer + h * vocab) + attention


def parameters(model_dir: Path) -> int:
    """Parameters in the safetensors files (the tied head stored once)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as weights:
            total += sum(int(np.prod(weights.get_slice(n).get_shape())) for n in weights.keys())  # noqa: SIM118
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_teacher.json"))
    args = parser.parse_args()

    import torch

    from distill.models import local_models
    from distill.prompts import PromptSet, encode
    from distill.stages.prepare import prepare
    from distill.tokenizer import load_tokenizer

    # NOTE: a run directory of its own, so that a real run of the recipe is never touched (prepare records
    # itself in the run directory, and a different recipe there would make the next `distill run` redo it)
    overrides = ["tracking.wandb=disabled", f"data.num_prompts={max(args.prompts, 16)}",
                 f"runs_dir={tempfile.mkdtemp(prefix='distill-bench-')}"]  # fmt: skip
    recipe = local_models(load_recipe(RECIPE, overrides))  # the GGUF converted (cached) and the cut made
    data = prepare(recipe)
    teacher = Path(recipe.teacher.model)
    config = json.loads((teacher / "config.json").read_text())
    tokenizer = load_tokenizer(data.tokenizer_dir)
    tokens = np.load(data.tokens_dir / "train.npy")
    blocks = [(f"b{i}", tokens[i * args.seq_len : (i + 1) * args.seq_len].astype(np.int64).tolist())
              for i in range(args.blocks)]  # fmt: skip
    prompts = [(r["id"], encode(r, tokenizer)[0]) for r in PromptSet(data.prompt_set).rows()[: args.prompts]]
    settings = SampleSettings(1, args.max_new_tokens, 1.0, 1.0, 0)
    mean_prompt = sum(len(ids) for _, ids in prompts) / len(prompts)

    peak = gemm_flops()
    cost = {"score": flops_per_token(config, args.seq_len // 2),
            "sample": flops_per_token(config, int(mean_prompt + args.max_new_tokens / 2))}  # fmt: skip
    speed, captures = capture_speed(teacher, blocks, prompts, settings, max_model_len=1024, batch_size=8)
    score_caps, sample_caps = captures["score"], captures["sample"]
    for mode in ("score", "sample"):
        for backend in ("hf", "vllm"):
            speed[f"{backend}_{mode}_flop_utilization"] = (
                speed[f"{backend}_{mode}_tokens_per_s"] * cost[mode] / peak
            )

    size = {}
    vocab = config["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, caps in (("score", score_caps), ("sample", sample_caps)):
            positions = tokens_of(caps)
            ours = (
                write_shard(Path(tmp) / f"{mode}-{shard_name(0)}", caps, id_bits(vocab))["bytes"] / positions
            )
            plain = baseline_bytes(caps) / positions
            raw = K * (4 + 2) + 4 + 2
            size[mode] = {"positions": positions, "store_bytes_per_token": ours,
                          "int32_fp16_zstd_bytes_per_token": plain, "int32_fp16_raw_bytes_per_token": raw,
                          "ratio_vs_zstd": plain / ours, "ratio_vs_raw": raw / ours}  # fmt: skip

    results = {
        "teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "parameters": parameters(teacher),
        "vocab_size": vocab,
        "id_bits": id_bits(vocab),
        "k": K,
        "work": {
            "blocks": args.blocks,
            "seq_len": args.seq_len,
            "prompts": len(prompts),
            "mean_prompt_tokens": mean_prompt,
            "max_new_tokens": args.max_new_tokens,
        },  # fmt: skip
        "cpu": {
            "gemm_fp32_gflops": peak / 1e9,
            "threads": torch.get_num_threads(),
            "forward_gflop_per_token": {m: c / 1e9 for m, c in cost.items()},
        },  # fmt: skip
        "speed": speed,
        "size": size,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
