"""Score the same sequences with the vLLM and the transformers teacher; save both raw captures (npz).

Run as a script (vLLM spawns engine processes, so it needs the __main__ guard).
"""

import sys

import numpy as np

from distill.teacher import HfTeacher, VllmTeacher
from distill.vllm.engine import engine_kwargs


def main(model_dir: str, tokens_path: str, out_path: str) -> None:
    tokens = np.load(tokens_path)
    items = [(f"b{i}", tokens[i * 48 : (i + 1) * 48].astype(np.int64).tolist()) for i in range(8)]
    k = 16
    teacher = VllmTeacher(engine_kwargs(model_dir, max_logprobs=k, max_model_len=64), k)
    vllm_caps = teacher.score(items)
    teacher.close()
    import torch

    hf_caps = HfTeacher(model_dir, k, "cpu", torch.float32, batch_size=4).score(items)
    arrays = {}
    for name, caps in (("vllm", vllm_caps), ("hf", hf_caps)):
        arrays[f"{name}_ids"] = np.stack([c.topk_ids for c in caps])
        arrays[f"{name}_lps"] = np.stack([c.topk_logprobs for c in caps])
        arrays[f"{name}_token_lps"] = np.stack([c.token_logprobs for c in caps])
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:4])
