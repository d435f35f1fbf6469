"""Why the test suite runs one compute thread per process: training steps of two processes side by side
with OpenMP's default thread count against one thread each, and a vLLM engine started the suite's way.

    .venv/bin/python bench/threads.py [--steps 30 --widths 128 512]

Part 1, threads. A small Llama (2 layers, the given width, vocabulary 4,096) takes `--steps` training
steps of 16 x 64 tokens (fp32, AdamW), in four setups: alone with the default thread count (every core),
alone with one thread, and two such processes at once, each with the default or with one thread. Two
pytest-xdist workers on a 2-core machine are the last two.

Part 2, engine start. `vllm.LLM` on a micro model, from the import of vLLM to a finished greedy request:
vLLM's default (engine core and worker in `spawn` processes) against `VLLM_ENABLE_V1_MULTIPROCESSING=0`
(both in the calling process), as the suite runs them.

Writes bench/results/threads.json; docs/tests.md's figures are generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(threads: int, width: int, steps: int) -> float:
    """Seconds for `steps` training steps (after 3 warm-up steps) in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    config = LlamaConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=2 * width, vocab_size=4096, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 4096, (16, 64))

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


def engine(model: str) -> float:
    """Seconds from importing vLLM to a finished 8-token greedy request on `model`, in this process."""
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(ROOT))
    from distill.vllm.engine import engine_kwargs

    llm = LLM(**engine_kwargs(model, max_model_len=256))
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=8, temperature=0))
    return time.perf_counter() - started


def child(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip


def seconds_of(procs: list[subprocess.Popen]) -> list[float]:
    out = []
    for proc in procs:
        text, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a measuring process exited with {proc.returncode}")
        out.append(next(float(line.split()[1]) for line in text.splitlines() if line.startswith("SECONDS ")))
    return out


def threads_part(width: int, steps: int) -> dict:
    one = {"OMP_NUM_THREADS": "1"}
    rows = {
        "alone, default threads": seconds_of([child("--train", "0", str(width), str(steps))]),
        "alone, 1 thread": seconds_of([child("--train", "1", str(width), str(steps), env=one)]),
        "2 at once, default threads": seconds_of(
            [child("--train", "0", str(width), str(steps)) for _ in range(2)]
        ),
        "2 at once, 1 thread each": seconds_of(
            [child("--train", "1", str(width), str(steps), env=one) for _ in range(2)]
        ),
    }
    out = {name: {"seconds": max(s), "per_process": s} for name, s in rows.items()}
    out["ratio_two_default_over_two_single"] = (
        out["2 at once, default threads"]["seconds"] / out["2 at once, 1 thread each"]["seconds"]
    )
    return out


def micro_model(where: Path) -> Path:
    """A 2-layer Llama of width 128 with a 4,096-token byte-level BPE tokenizer, saved for vLLM."""
    sys.path.insert(0, str(ROOT))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = [" ".join(f"w{i}x{j}" for j in range(200)) for i in range(50)]
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=4096, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def engine_part(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(micro_model(Path(tmp) / "micro"))
        setups = {"vLLM default (spawned engine core and worker)": {},
                  "in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}  # fmt: skip
        out = {name: {"seconds": []} for name in setups}
        for _ in range(repeats):  # interleaved, so drift hits both
            for name, env in setups.items():
                out[name]["seconds"] += seconds_of([child("--engine", model, env=env)])
    for row in out.values():
        row["median"] = sorted(row["seconds"])[len(row["seconds"]) // 2]
    default, inproc = (row["median"] for row in out.values())
    out["ratio_default_over_in_process"] = default / inproc
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "threads.json"))
    args = parser.parse_args()
    if args.train:
        print("SECONDS", train(*(int(v) for v in args.train)), flush=True)
        return
    if args.engine:
        print("SECONDS", engine(args.engine), flush=True)
        return
    result = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU, fp32",
        "steps": args.steps,
        "threads": {str(w): threads_part(w, args.steps) for w in args.widths},
        "engine_start": engine_part(args.repeats),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
