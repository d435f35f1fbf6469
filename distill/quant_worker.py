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


def modifiers(scheme: str, lm_head: bool = False):
    """The llm-compressor recipe of each scheme; lm_head stays in full precision (as usual) unless
    `lm_head` is set, when the scheme's `Linear` target takes it too."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    # the output layer by name as well: vLLM matches a "Linear" target to its linear layers' classes, and
    # its output layer (ParallelLMHead) is not one of them
    targets, ignore = (["Linear", "re:.*lm_head$"], []) if lm_head else ("Linear", ["lm_head"])
    if scheme == "w8a8":  # int8 weights and dynamic per-token int8 activations; SmoothQuant eases them
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets=targets, scheme="W8A8", ignore=ignore),
        ]
    if scheme == "w4a16":  # int4 weights, 16-bit activations
        return [GPTQModifier(targets=targets, scheme="W4A16", ignore=ignore)]
    if scheme == "fp8":  # fp8 weights and dynamic fp8 activations: no calibration data needed
        return [QuantizationModifier(targets=targets, scheme="FP8_DYNAMIC", ignore=ignore)]
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
    parser.add_argument("--lm-head", action="store_true", help="quantize the output layer too")
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
        recipe=modifiers(args.scheme, args.lm_head),
        max_seq_length=args.seq_len,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
