"""Expected speculative-decoding acceptance of a draft, predicted offline for the serving benchmark.

`distill bench serve` measures acceptance from vLLM's counters while the teacher, with the draft, answers
the benchmark's requests: the openings of held-out test blocks (serve.bench.prompt_tokens), continued
for serve.bench.max_tokens tokens at serve.bench.temperature, k = serve.num_speculative_tokens draft
tokens per step. This module predicts the same figures with transformers and no server:

1. The teacher continues the same prompts (greedy at temperature 0, seeded sampling above).
2. The draft reads each prompt + continuation in one forward pass; at every completion position it
   proposes its argmax, as vLLM's draft-model proposer does by default (draft_sample_method greedy).
3. At temperature 0 speculative decoding is exact: the output is the teacher's greedy continuation, a
   draft token is accepted when it equals the teacher's token, and a step that starts at position t
   accepts the leading run of matches among its k proposals, then the teacher adds one token. The
   steps are walked exactly as the engine takes them. Above 0 the teacher accepts the draft's token d_t
   with probability a_t = p_teacher(d_t) at the request temperature, and a step that starts at t
   accepts sum_{i=1..k} prod_{j<i} a_{t+j} tokens in expectation, averaged over every start.

The result has vLLM's definitions: acceptance_rate = accepted draft tokens / draft tokens, and
mean_acceptance_length = 1 + accepted / steps (tokens per verification step, the teacher's own
included); `alpha` is the per-token acceptance (the match rate at temperature 0, the mean a_t above).
What differs from the measurement: the teacher's numerics (transformers, not vLLM's kernels), so a
near-tie between two tokens can break the other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

TEACHER_TOP = 64  # the teacher's top tokens kept per position above temperature 0 (a lower bound on p)


@dataclass
class Continuations:
    """The teacher's continuations of the benchmark prompts: tokens (B, P + M), the prompt length P, and
    above temperature 0 the teacher's tempered top probabilities at the M completion positions."""

    tokens: Any  # torch.LongTensor (B, P + M)
    prompt_len: int
    top_ids: Any = None  # (B, M, TEACHER_TOP)
    top_probs: Any = None


def _batches(count: int, size: int):
    for lo in range(0, count, size):
        yield slice(lo, min(lo + size, count))


def _load(path: Path, field: str, device: str | None):
    """(model in eval mode on the detected device: bf16 on GPUs, fp32 on CPUs, device)."""
    from distill.models import load_causal_lm, resolve_device, resolve_dtype

    device = device or resolve_device("auto")
    return load_causal_lm(path, field, resolve_dtype("auto", device)).to(device).eval(), device


def teacher_continuations(
    teacher_dir: Path, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int = 0,
    batch_size: int = 16, device: str | None = None, ignore_eos: bool = True,
) -> Continuations:  # fmt: skip
    import torch

    model, device = _load(teacher_dir, "teacher", device)
    if len({len(p) for p in prompts}) != 1:
        raise DistillError("expected acceptance: the benchmark prompts must have one length")
    prompt_len = len(prompts[0])
    ids = torch.tensor(prompts, dtype=torch.long)
    torch.manual_seed(seed)
    sampling = {"do_sample": False}
    if temperature > 0:  # the whole distribution, as vLLM's requests (no top-k or top-p)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out, top_ids, top_probs = [], [], []
    with torch.no_grad():
        for part in _batches(len(prompts), batch_size):
            chunk = ids[part].to(device)
            seqs = model.generate(
                chunk,
                attention_mask=torch.ones_like(chunk),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else 0,  # the benchmark ignores EOS
                pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
                **sampling,
            )
            out.append(seqs.cpu())
            if temperature > 0:
                logits = model(input_ids=seqs).logits[:, prompt_len - 1 : -1].float()
                probs, top = torch.softmax(logits / temperature, dim=-1).topk(TEACHER_TOP, dim=-1)
                top_ids.append(top.cpu())
                top_probs.append(probs.cpu())
    del model
    if temperature > 0:
        return Continuations(torch.cat(out), prompt_len, torch.cat(top_ids), torch.cat(top_probs))
    return Continuations(torch.cat(out), prompt_len)


def draft_tokens(draft_dir: Path, c: Continuations, batch_size: int = 16, device: str | None = None):
    """The draft's argmax at each completion position of the teacher's continuations: (B, M)."""
    import torch

    model, device = _load(draft_dir, "draft", device)
    out = []
    with torch.no_grad():
        for part in _batches(len(c.tokens), batch_size):
            logits = model(input_ids=c.tokens[part].to(device)).logits
            out.append(logits[:, c.prompt_len - 1 : -1].argmax(-1).cpu())
    return torch.cat(out)


def greedy_steps(matches: np.ndarray, k: int) -> tuple[int, int]:
    """(accepted draft tokens, verification steps) of greedy speculative decoding over one continuation,
    given which completion positions the draft predicts right. The first completion token comes from
    the prefill; each step proposes k tokens, keeps the leading run of matches and adds the teacher's
    own next token."""
    accepted = steps = 0
    t = 1
    while t + k <= len(matches):
        run = 0
        while run < k and matches[t + run]:
            run += 1
        accepted, steps = accepted + run, steps + 1
        t += run + 1
    return accepted, steps


def expected_accepted(a: np.ndarray, k: int) -> np.ndarray:
    """E[accepted draft tokens] of a step starting at each position where k proposals fit:
    sum_{i=1..k} prod_{j<i} a_{t+j}."""
    n = len(a) - k + 1
    if n <= 0:
        return np.zeros(0)
    chain, total = np.ones(n), np.zeros(n)
    for i in range(k):
        chain = chain * a[i : i + n]
        total += chain
    return total


def predict(drafted, c: Continuations, k: int, temperature: float) -> dict[str, Any]:
    """The predicted benchmark figures of a draft whose proposals are `drafted` (B, M)."""
    if temperature == 0:
        matches = (drafted == c.tokens[:, c.prompt_len :]).numpy()
        accepted = steps = 0
        for row in matches:
            a, s = greedy_steps(row, k)
            accepted, steps = accepted + a, steps + s
        alpha, positions = float(matches[:, 1:].mean()), int(matches[:, 1:].size)
    else:
        probs = (c.top_probs * (c.top_ids == drafted.unsqueeze(-1))).sum(-1).double().numpy()
        per_start = [expected_accepted(row[1:], k) for row in probs]
        accepted, steps = float(sum(s.sum() for s in per_start)), sum(len(s) for s in per_start)
        alpha, positions = float(probs[:, 1:].mean()), int(probs[:, 1:].size)
    if steps == 0:
        raise DistillError(
            f"expected acceptance: serve.bench.max_tokens={c.tokens.shape[1] - c.prompt_len} leaves no room "
            f"for a step of k={k} draft tokens"
        )
    return {
        "acceptance_rate": accepted / (steps * k),
        "mean_acceptance_length": 1 + accepted / steps,
        "alpha": alpha,
        "positions": positions,
        "steps": steps,
        "num_speculative_tokens": k,
        "temperature": temperature,
    }


def draft_acceptance(recipe, models, tokens_dir: Path, log=print) -> dict[str, dict[str, Any]]:
    """The expected acceptance of each draft candidate in `models` (the students and the SFT baseline;
    not the teacher, not quantized forms) as the teacher's draft, at the serving benchmark's settings
    and on its prompts (from the corpus's test split in `tokens_dir`)."""
    from distill.heldout import serving_prompts
    from distill.vllm.engine import draft_problem

    teacher = next((m for m in models if m.role == "teacher"), None)
    drafts = []
    for m in models:
        problem = (
            draft_problem(m.path, teacher.path) if teacher and m.role in ("student", "baseline") else None
        )
        if problem:  # a student with its own tokenizer proposes ids the teacher does not read
            log(f"eval: {m.name}: no expected acceptance: {problem}")
        elif m.role in ("student", "baseline"):
            drafts.append(m)
    if not drafts or teacher is None:
        return {}
    bench, k = recipe.serve.bench, recipe.serve.num_speculative_tokens
    continuations = teacher_continuations(
        teacher.path,
        serving_prompts(bench, tokens_dir),
        bench.max_tokens,
        bench.temperature,
        seed=recipe.train.seed,
    )
    out = {}
    for model in drafts:
        row = predict(draft_tokens(model.path, continuations), continuations, k, bench.temperature)
        log(f"eval: {model.name}: expected acceptance as the teacher's draft {row['acceptance_rate']:.3f}, "
            f"mean acceptance length {row['mean_acceptance_length']:.2f} (k={k}, temperature {bench.temperature:g}, "
            f"{len(continuations.tokens)} benchmark prompts)")  # fmt: skip
        out[model.name] = row
    return out
