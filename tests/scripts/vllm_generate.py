"""Load a model directory in vLLM's engine and greedily generate; writes JSON results to a file.

Run as a script (vLLM spawns engine processes, so it needs the __main__ guard).
"""

import json
import sys

from distill.vllm.engine import engine_kwargs, shutdown_engine


def main(model_dir: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(model_dir, max_model_len=128, max_logprobs=1))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = ["The list type", "A function returns", "Python modules are"]
    results = []
    for out in llm.generate(prompts, params):
        completion = out.outputs[0]
        results.append(
            {
                "prompt_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "logprobs": [
                    step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
            }
        )
    with open(out_path, "w") as fh:
        json.dump(results, fh)
    shutdown_engine(llm)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
