"""llm-compressor's `oneshot` on one model and one scheme; run by `distill quantize` with `.venv-quant`'s
Python (llm-compressor cannot share vLLM's environment), so this file imports nothing from distill.

    .venv-quant/bin/python distill/quant_worker.py --model DIR --out DIR --scheme w8a8 --calibration FILE \
        --samples 64 --seq-len 256

`--calibration` is a JSON list of token-id lists (the caller cuts them from the teacher store or corpus).
The output is a compressed-tensors Hugging Face directory (config with its quantization_config, the
tokenizer) that vLLM and transformers load by path.
"""

from __future__ import annotations

import argparse
import json
import sys


def modifiers(scheme: str):
    """The llm-compressor recipe of each scheme; lm_head stays in full precision (as usual)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    if scheme == "w8a8":  # int8 weights and dynamic per-token int8 activations; SmoothQuant eases them
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    if scheme == "w4a16":  # int4 weights, 16-bit activations
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    if scheme == "fp8":  # fp8 weights and dynamic fp8 activations: no calibration data needed
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    raise SystemExit(f"unknown scheme {scheme!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scheme", required=True, choices=("w8a8", "w4a16", "fp8"))
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "auto" if torch.cuda.is_available() else torch.float32  # fp32 on CPUs (no bf16 hardware)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    with open(args.calibration) as fh:
        rows = [ids[: args.seq_len] for ids in json.load(fh)][: args.samples]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=modifiers(args.scheme),
        max_seq_length=args.seq_len,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
