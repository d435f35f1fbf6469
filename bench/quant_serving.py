"""W8A8 against fp32 on the real student, served alone by vLLM at concurrency 1, 4 and 16.

    .venv/bin/python bench/quant_serving.py [--run runs/smollm2-135m] [--rounds 2] [--requests 64] [--lm-head]

The students of `distill run recipes/smollm2-135m.yaml`: the KD student (SmolLM2-135M-Instruct cut to 12
of its 30 layers, 70.8 M parameters, fp32 on CPU) and its W8A8 form (`quant/w8a8`, llm-compressor: int8
weights per channel, int8 activations per token, dynamic). Each round is one `distill bench serve` of the
two setups `student` and `student-w8a8`: vLLM's CPU server started for each in turn, vLLM's own benchmark
client at every concurrency (greedy, `--requests` requests of 32 prompt tokens and 64 output tokens, EOS
ignored). What to read is the ratio of output tokens/s, w8a8 over fp32, per round and concurrency: the
two run seconds apart on the same machine; absolute figures on a shared 2-core machine are noisy.
`--lm-head` adds a third setup to every round, W8A8 with the output layer quantized too (`quantize.lm_head: [w8a8]`),
benched from a sibling run that shares the student.

Writes bench/results/quant_serving_<build>.json, one file per vLLM CPU kernel build (avx2, avx512,
avx512_bf16: distill.vllm.kernels.cpu_isa), since the int8 kernels differ most between them;
docs/quantization.md's tables are generated from every such file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("student", "student-w8a8")
HEAD_SETUP = "student-w8a8-lm_head"  # W8A8 with the output layer quantized too (quantize.lm_head)
LEVELS = (1, 4, 16)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni"))


def bench_round(run: Path, requests: int, setups=SETUPS) -> dict:
    """One `distill bench serve` of `setups`; their bench.json rows."""
    levels = "[" + ",".join(str(c) for c in LEVELS) + "]"
    cmd = [str(ROOT / ".venv" / "bin" / "distill"), "bench", "serve", str(run), f"serve.bench.setups=[{','.join(setups)}]",
           f"serve.bench.concurrency={levels}", f"serve.bench.requests={requests}", "serve.bench.max_tokens=64",
           "serve.bench.prompt_tokens=32"]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    # exit status 3 is the run's gate failing without the draft's acceptance, which these setups leave out
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code not in (0, 3):
        raise SystemExit(f"distill bench serve exited with {code}")
    bench = json.loads((run / "serve" / "bench.json").read_text())
    out = {}
    for setup in setups:
        row = bench["setups"][setup]
        out[setup] = {
            str(c): {
                k: row["levels"][str(c)][k]
                for k in ("output_tokens_per_s", "tpot_ms_p50", "ttft_ms_p50", "errors", "output_tokens")
            }
            for c in LEVELS
        }
        out[setup]["bytes"] = row["bytes"]
    return out


def head_run(run: Path) -> Path:
    """A sibling run, `<run>-lm-head`, sharing the run's student and teacher store, whose `quant/w8a8` also
    quantizes the output layer (`quantize.lm_head=[w8a8]`); made (or reused) by `distill quantize`."""
    sibling = run.with_name(f"{run.name}-lm-head")
    (sibling / "student").mkdir(parents=True, exist_ok=True)
    for part in ("student/final", "teacher"):
        if not (sibling / part).is_symlink() and not (sibling / part).exists():
            (sibling / part).symlink_to(run / part, target_is_directory=True)
    cmd = [str(ROOT / ".venv" / "bin" / "distill"), "quantize", str(run), f"name={sibling.name}",
           f"runs_dir={run.parent}", "quantize.lm_head=[w8a8]", "--scheme", "w8a8"]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return sibling


def linear_shapes(model_dir: Path) -> tuple[list[tuple[str, int, int]], tuple[int, int], int]:
    """The (name, K, N) of one decoder layer's linear layers as vLLM fuses them (qkv, o, gate_up, down),
    the output layer's (K, N) (fp32 unless `quantize.lm_head` lists w8a8), and the layer
    count."""
    c = json.loads((model_dir / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    head = c.get("head_dim") or h // c["num_attention_heads"]
    qkv = head * (c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    layer = [("qkv_proj", h, qkv), ("o_proj", head * c["num_attention_heads"], h), ("gate_up_proj", h, 2 * inter),
             ("down_proj", inter, h)]  # fmt: skip
    return layer, (h, c["vocab_size"]), c["num_hidden_layers"]


def profile_linear(model_dir: Path, levels=LEVELS, calls: int = 50) -> dict:
    """Microseconds of the kernels vLLM's CPU build runs for the student's linear layers in one decode step
    of M = the concurrency tokens: fp32 oneDNN matmul (`onednn_mm` on prepacked weights) against W8A8
    (`onednn_scaled_int8_quant`, dynamic per token, then `onednn_scaled_mm` on int8 weights). Every layer
    has its own weights and a pass calls them in order, as a step does, so they stream from memory rather
    than sit in cache; the output layer is timed apart, in fp32 and in W8A8."""
    import torch
    from vllm import _custom_ops as ops

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - started) / calls * 1e6

    layer, (h, vocab), depth = linear_shapes(model_dir)
    torch.manual_seed(0)
    fp32, int8 = [], []
    for _ in range(depth):
        for _, k, n in layer:
            fp32.append((ops.create_onednn_mm((torch.randn(n, k) / k**0.5).t(), 32), k, n))
            weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            int8.append((ops.create_onednn_scaled_mm(weight.t(), torch.rand(n, 1) / 127, torch.float32, True, False, 32), k, n))  # fmt: skip
    head = ops.create_onednn_mm((torch.randn(vocab, h) / h**0.5).t(), 32)
    head_int8 = ops.create_onednn_scaled_mm(torch.randint(-127, 128, (vocab, h), dtype=torch.int8).t(),
                                            torch.rand(vocab, 1) / 127, torch.float32, True, False, 32)  # fmt: skip
    out = {}
    for m in levels:
        inputs = {k: torch.randn(m, k) for k in {k for _, k, _ in layer}}

        def fp32_pass(m=m, inputs=inputs):
            for handler, k, _ in fp32:
                ops.onednn_mm(handler, inputs[k], None)

        def w8a8_pass(m=m, inputs=inputs):
            for handler, k, n in int8:
                x_q, x_s, _ = ops.onednn_scaled_int8_quant(inputs[k], None, None, True)
                ops.onednn_scaled_mm(handler, x_q, torch.empty(m, n), x_s, None, None, None)

        def head_w8a8(m=m):  # what the output layer would cost quantized the same way
            x_q, x_s, _ = ops.onednn_scaled_int8_quant(torch.randn(m, h), None, None, True)
            ops.onednn_scaled_mm(head_int8, x_q, torch.empty(m, vocab), x_s, None, None, None)

        out[str(m)] = {
            "fp32_layers_us": timed(fp32_pass),
            "w8a8_layers_us": timed(w8a8_pass),
            "lm_head_us": timed(lambda m=m: ops.onednn_mm(head, torch.randn(m, h), None)),
            "lm_head_w8a8_us": timed(head_w8a8),
        }
    return out


def summarize(rounds: list[dict], setup: str = "student-w8a8") -> dict:
    ratios = {
        str(c): [
            r[setup][str(c)]["output_tokens_per_s"] / r["student"][str(c)]["output_tokens_per_s"]
            for r in rounds
        ]
        for c in LEVELS
    }
    return {c: {"per_round": v, "mean": sum(v) / len(v), "min": min(v)} for c, v in ratios.items()}


def explain(profile: dict, rounds: list[dict]) -> dict:
    """Per concurrency, a decode step (TPOT, fp32 server, best round) split into the decoder's linear
    layers, the output layer and the rest (attention, norms, sampling, the engine's own work); and the
    speed-up W8A8 could give if only the linear layers' kernels changed, against the measured one."""
    out = {}
    for c, row in profile.items():
        tpot_us = 1000 * min(r["student"][c]["tpot_ms_p50"] for r in rounds)
        saved = row["fp32_layers_us"] - row["w8a8_layers_us"]
        out[c] = {
            **row,
            "fp32_tpot_us": tpot_us,
            "layers_share": row["fp32_layers_us"] / tpot_us,
            "lm_head_share": row["lm_head_us"] / tpot_us,
            "rest_share": max(0.0, 1 - (row["fp32_layers_us"] + row["lm_head_us"]) / tpot_us),
            "kernel_speedup_layers": row["fp32_layers_us"] / row["w8a8_layers_us"],
            "predicted_speedup": tpot_us / (tpot_us - saved),
        }
        if "lm_head_w8a8_us" in row:  # and with the output layer quantized too
            head_saved = row["lm_head_us"] - row["lm_head_w8a8_us"]
            out[c]["predicted_speedup_with_head"] = tpot_us / (tpot_us - saved - head_saved)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "smollm2-135m"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", help="default: bench/results/quant_serving_<this CPU's vLLM build>.json")
    parser.add_argument("--student", default="the KD student", help="what run/student/final is, for the docs")
    parser.add_argument("--profile-only", action="store_true", help="redo the profile on the saved rounds")
    parser.add_argument(
        "--lm-head",
        action="store_true",
        help=f"also bench W8A8 with the output layer quantized ({HEAD_SETUP}: quantize.lm_head=[w8a8], in a "
        "sibling run <run>-lm-head sharing the student), in the same rounds",
    )
    args = parser.parse_args()
    from distill.vllm.kernels import cpu_isa

    build = cpu_isa()
    args.out = args.out or str(ROOT / "bench" / "results" / f"quant_serving_{build}.json")
    run = Path(args.run).resolve()
    if args.profile_only:
        result = json.loads(Path(args.out).read_text())
        result["profile"] = explain(profile_linear(run / "student" / "final"), result["rounds"])
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(
            json.dumps(
                {c: {k: v for k, v in r.items() if k != "modules"} for c, r in result["profile"].items()},
                indent=2,
            )
        )
        return
    for setup, path in (("student", run / "student" / "final"), ("student-w8a8", run / "quant" / "w8a8")):
        if not (path / "config.json").exists():
            raise SystemExit(
                f"{setup}: no model at {path} (run `distill run recipes/smollm2-135m.yaml` first)"
            )
    started = time.perf_counter()
    sibling = head_run(run) if args.lm_head else None
    rounds = []
    for _ in range(args.rounds):
        rounds.append(bench_round(run, args.requests))
        if sibling:  # the same W8A8 setup of the sibling run, right after: one more column of the round
            rounds[-1][HEAD_SETUP] = bench_round(sibling, args.requests, ("student-w8a8",))["student-w8a8"]
    print("profile: the linear layers' kernels, fp32 and W8A8", flush=True)
    profile = profile_linear(run / "student" / "final")
    result = {
        "run": os.path.relpath(run, ROOT) if run.is_relative_to(ROOT) else str(run),
        "student": args.student,
        "requests": args.requests,
        "prompt_tokens": 32,
        "max_tokens": 64,
        "vllm_cpu_build": build,
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}; {' '.join(cpu_flags()) or 'no AVX-512'}), no GPU",
        "rounds": rounds,
        "w8a8_over_fp32": summarize(rounds),
        **({"w8a8_lm_head_over_fp32": summarize(rounds, HEAD_SETUP)} if sibling else {}),
        "profile": explain(profile, rounds),
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_over_fp32")}, indent=2))


if __name__ == "__main__":
    main()
