"""Teacher capture: vLLM vs transformers throughput, and teacher-store bytes per token, in one run.

    .venv/bin/python bench/teacher_capture.py [--sequences 64] [--seq-len 256] [--out bench/results/...]

1. Speed: a Llama-architecture model of ~16M parameters (8 layers, width 384, our 4,096-token vocabulary),
   freshly initialised (weights do not change the cost), captures top-32 for the same work through both
   backends: score mode (64 corpus blocks x 256 tokens) and sample mode (32 prompts x 64 new tokens).
2. Size: the pretrained embedded teacher (`distill pretrain recipes/tiny.yaml`, reused from the cache)
   scores corpus blocks at k=32; the captures are written as our store and, as the baseline, as plain int32
   ids + float16 logprobs in the same zstd Parquet. For Llama 3's vocabulary (128,256) the same captures
   are written with their ids mapped one-to-one into that range, so ids take 17 bits each; the logprob
   profile is that of a real (small) language model.
Ratios are what to read: absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import io
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
from distill.store import Capture, id_bits, shard_name, write_shard  # noqa: E402
from distill.teacher import HfTeacher, SampleSettings, VllmTeacher  # noqa: E402
from distill.tokenizer import load_tokenizer  # noqa: E402
from distill.vllm.engine import engine_kwargs  # noqa: E402

K = 32
LLAMA3_VOCAB = 128_256


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def tokens_of(captures: list[Capture]) -> int:
    return sum(c.num_positions for c in captures)


def capture_speed(
    model_dir: Path,
    score_items: list[tuple[str, list[int]]],
    sample_items: list[tuple[str, list[int]]],
    settings: SampleSettings,
    max_model_len: int = 512,
    batch_size: int = 16,
) -> tuple[dict, dict[str, list[Capture]]]:
    """Tokens/s of both backends on the same work, score and sample mode (transformers first, freed
    before vLLM starts; each warmed up on the first two score items), and vLLM's captures by mode."""
    import torch

    results = {}
    hf = HfTeacher(str(model_dir), K, "cpu", torch.float32, batch_size=batch_size)
    hf.score(score_items[:2])  # warm-up
    caps, secs = timed(lambda: hf.score(score_items))
    results["hf_score_tokens_per_s"] = tokens_of(caps) / secs
    caps, secs = timed(lambda: hf.sample(sample_items, settings, 0))
    results["hf_sample_tokens_per_s"] = tokens_of(caps) / secs
    hf = None  # free its memory before vLLM starts

    llm, start_secs = timed(
        lambda: VllmTeacher(engine_kwargs(str(model_dir), max_logprobs=K, max_model_len=max_model_len), K)
    )
    results["vllm_engine_start_s"] = start_secs
    llm.score(score_items[:2])  # warm-up
    captures = {}
    captures["score"], secs = timed(lambda: llm.score(score_items))
    results["vllm_score_tokens_per_s"] = tokens_of(captures["score"]) / secs
    captures["sample"], secs = timed(lambda: llm.sample(sample_items, settings, 0))
    results["vllm_sample_tokens_per_s"] = tokens_of(captures["sample"]) / secs
    llm.close()
    for mode in ("score", "sample"):
        results[f"{mode}_ratio_vllm_over_hf"] = (
            results[f"vllm_{mode}_tokens_per_s"] / results[f"hf_{mode}_tokens_per_s"]
        )
    return results, captures


def speed(model_dir: Path, blocks: list[list[int]], prompts: list[list[int]], max_new: int) -> dict:
    score_items = [(f"b{i}", ids) for i, ids in enumerate(blocks)]
    sample_items = [(f"p{i}", ids) for i, ids in enumerate(prompts)]
    return capture_speed(model_dir, score_items, sample_items, SampleSettings(1, max_new, 1.0, 1.0, 0))[0]


def baseline_bytes(captures: list[Capture]) -> int:
    """The same captures as plain int32 ids + float16 logprobs (+ int32 input ids), zstd Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "input_ids": [np.asarray(c.input_ids, np.int32).tobytes() for c in captures],
            "topk_ids": [c.topk_ids.astype(np.int32).tobytes() for c in captures],
            "topk_logprobs": [c.topk_logprobs.astype(np.float16).tobytes() for c in captures],
            "token_logprobs": [c.token_logprobs.astype(np.float16).tobytes() for c in captures],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=9)
    return len(buffer.getvalue())


def remap_to_vocab(captures: list[Capture], vocab: int, seed: int = 0) -> list[Capture]:
    """The same captures with ids sent one-to-one into [0, vocab) (so they need ceil(log2 vocab) bits)."""
    rng = np.random.default_rng(seed)
    table = rng.choice(vocab, size=4096, replace=False)  # the tiny teacher's ids are all < 4096
    return [
        Capture(
            c.id,
            table[np.asarray(c.input_ids)].tolist(),
            c.start,
            table[c.topk_ids],
            c.topk_logprobs,
            c.token_logprobs,
        )
        for c in captures
    ]


def size(teacher_dir: Path, blocks: list[list[int]], work: Path) -> dict:
    llm = VllmTeacher(engine_kwargs(str(teacher_dir), max_logprobs=K, max_model_len=512), K)
    captures = llm.score([(f"b{i}", ids) for i, ids in enumerate(blocks)])
    positions = tokens_of(captures)
    out = {"positions": positions}
    for label, caps, vocab in (
        ("tiny_vocab_4096", captures, 4096),
        ("llama3_vocab_128256", remap_to_vocab(captures, LLAMA3_VOCAB), LLAMA3_VOCAB),
    ):
        ours = write_shard(work / f"{label}-{shard_name(0)}", caps, id_bits(vocab))["bytes"] / positions
        plain = baseline_bytes(caps) / positions
        raw = K * (4 + 2) + 4 + 2  # top-k int32 ids and fp16 logprobs, the token's int32 id and fp16 logprob
        out[label] = {
            "store_bytes_per_token": ours,
            "int32_fp16_zstd_bytes_per_token": plain,
            "int32_fp16_raw_bytes_per_token": raw,
            "ratio_vs_zstd": plain / ours,
            "ratio_vs_raw": raw / ours,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_capture.json"))
    args = parser.parse_args()

    from distill.pipeline import open_run
    from distill.stages.prepare import prepare

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["tracking.wandb=disabled"])
    data = prepare(recipe)
    tokens = np.load(data.tokens_dir / "train.npy")
    blocks = [
        tokens[i * args.seq_len : (i + 1) * args.seq_len].astype(np.int64).tolist()
        for i in range(args.sequences)
    ]
    prompts = [b[:48] for b in blocks[: args.prompts]]
    tokenizer = load_tokenizer(data.tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model-16m"
        model = build_tiny_llama(
            TinyModelConfig(
                hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=6, intermediate_size=1152
            ),
            tokenizer,
        )
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        results = {
            "model_parameters": parameters,
            "sequences": args.sequences,
            "seq_len": args.seq_len,
            "k": K,
        }
        results["speed"] = speed(model_dir, blocks, prompts, args.max_new_tokens)
        teacher = open_run(recipe).teacher
        results["size"] = size(teacher, blocks, Path(tmp))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
