"""The teacher's two backends, capturing per-position top-k logprobs into `Capture`s.

- `VllmTeacher`: vLLM's engine (`vllm.LLM`), the default and the fast path on GPUs.
- `HfTeacher`: plain transformers, for machines without vLLM and as the baseline.

Both offer `sample(items)` (the teacher writes completions) and `score(items)` (top-k at every position
of given sequences; the on-policy stage calls this on the student's samples). `items` are
(id, token_ids) pairs, already tokenized, so both backends see exactly the same tokens.

NOTE: logprobs are raw (before temperature); distillation temperature is applied at training time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.store import Capture

Item = tuple[str, list[int]]


@dataclass(frozen=True)
class SampleSettings:
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


def place_by_rank(entries: list[tuple[int, float, int | None]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_id, logprob, rank) entries of one position -> top-k ids and logprobs in rank order.

    The engine returns the top k plus the actual token (which may rank below k); slots it did not fill
    (fewer than k candidates) get id 0 and logprob -inf, which the store keeps as its floor value.
    """
    # NOTE: the flat form lists the actual token and then the top k, so a token in both appears twice.
    unique = {tid: (lp, rank) for tid, lp, rank in reversed(entries)}
    ranked = sorted((rank, -lp, tid) for tid, (lp, rank) in unique.items() if rank is not None and rank <= k)[
        :k
    ]
    ids = np.zeros(k, dtype=np.int64)
    lps = np.full(k, -np.inf, dtype=np.float64)
    for slot, (_, neg_lp, tid) in enumerate(ranked):
        ids[slot], lps[slot] = tid, -neg_lp
    return ids, lps


def _entries(container: Any, index: int) -> list[tuple[int, float, int | None]]:
    """The (token_id, logprob, rank) entries at one position of vLLM's logprobs (flat or dict form)."""
    if hasattr(container, "start_indices"):  # FlatLogprobs
        lo, hi = container.start_indices[index], container.end_indices[index]
        return list(
            zip(container.token_ids[lo:hi], container.logprobs[lo:hi], container.ranks[lo:hi], strict=True)
        )
    position = container[index]
    return [(tid, lp.logprob, lp.rank) for tid, lp in position.items()] if position else []


def _token_logprob(entries: list[tuple[int, float, int | None]], token: int) -> float:
    for tid, lp, _ in entries:
        if tid == token:
            return lp
    return -math.inf  # the engine always returns the actual token; kept safe all the same


def _capture(item_id: str, ids: list[int], start: int, container: Any, offset: int, k: int, truncated: bool):
    """Build a Capture whose position p uses container[p - start + offset]."""
    positions = len(ids) - 1 - start
    topk_ids = np.zeros((positions, k), dtype=np.int64)
    topk_lps = np.zeros((positions, k), dtype=np.float64)
    token_lps = np.zeros(positions, dtype=np.float64)
    for i in range(positions):
        entries = _entries(container, i + offset)
        topk_ids[i], topk_lps[i] = place_by_rank(entries, k)
        token_lps[i] = _token_logprob(entries, ids[start + 1 + i])
    return Capture(item_id, ids, start, topk_ids, topk_lps, token_lps, truncated)


def fit_prompt(ids: list[int], limit: int) -> tuple[list[int], bool]:
    """Keep the last `limit` tokens of a prompt that is too long (the part the completion continues)."""
    if limit < 1:
        raise DistillError(
            f"generate.max_new_tokens leaves no room for a prompt in the context ({limit} tokens left); "
            "lower it or raise generate.engine.max_model_len"
        )
    return (ids, False) if len(ids) <= limit else (ids[-limit:], True)


class VllmTeacher:
    """The teacher in vLLM's engine, started once and reused for every shard."""

    def __init__(self, engine_args: dict[str, Any], k: int):
        from importlib.util import find_spec

        from distill.vllm.engine import start_engine

        if find_spec("vllm") is None:
            raise DistillError(
                "teacher.backend=vllm needs vLLM: run `make setup` (or use teacher.backend=hf)"
            )

        self.k, self.engine_args = k, engine_args
        self.llm = start_engine(engine_args)  # the engine kept_engines holds, if it has these arguments
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        from distill.vllm.engine import finish_engine

        llm, self.llm = self.llm, None
        if llm is not None:
            finish_engine(llm, self.engine_args)

    def sample(self, items: list[Item], settings: SampleSettings, first_index: int) -> list[Capture]:
        """N completions per prompt; prompt i (global index first_index + i) gets seed settings.seed + that index."""
        from vllm import SamplingParams

        limit = self.max_model_len - settings.max_new_tokens
        prompts, params, truncated = [], [], []
        for i, (_, ids) in enumerate(items):
            fitted, cut = fit_prompt(ids, limit)
            prompts.append({"prompt_token_ids": fitted})
            truncated.append(cut)
            params.append(
                SamplingParams(
                    n=settings.samples_per_prompt,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    max_tokens=settings.max_new_tokens,
                    seed=settings.seed + first_index + i,
                    logprobs=self.k,
                    detokenize=False,
                    flat_logprobs=True,
                )
            )
        captures = []
        for (item_id, _), prompt, cut, out in zip(
            items, prompts, truncated, self.llm.generate(prompts, params, use_tqdm=False), strict=True
        ):
            prompt_ids = prompt["prompt_token_ids"]
            for j, completion in enumerate(out.outputs):
                ids = prompt_ids + list(completion.token_ids)
                captures.append(
                    _capture(f"{item_id}-s{j}", ids, len(prompt_ids) - 1, completion.logprobs, 0, self.k, cut)
                )
        return captures

    def score(self, items: list[Item]) -> list[Capture]:
        """Top-k at every position of each sequence via prompt_logprobs (no generation)."""
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=self.k, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        fitted = [fit_prompt(ids, self.max_model_len - 1) for _, ids in items]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in fitted], params, use_tqdm=False)
        # prompt_logprobs[t] is the distribution of token t given tokens < t: position p reads entry p + 1.
        return [
            _capture(item_id, ids, 0, out.prompt_logprobs, 1, self.k, cut)
            for (item_id, _), (ids, cut), out in zip(items, fitted, outs, strict=True)
        ]


class HfTeacher:
    """The same captures with transformers: a forward pass, log-softmax in fp32, top-k."""

    def __init__(
        self, model_dir: str, k: int, device: str, dtype, batch_size: int, max_len: int | None = None
    ):
        from transformers import AutoModelForCausalLM

        self.k, self.device, self.batch_size = k, device, batch_size
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.max_model_len = max_len or self.model.config.max_position_embeddings

    def score(self, items: list[Item]) -> list[Capture]:
        fitted = [fit_prompt(ids, self.max_model_len) for _, ids in items]
        captures = []
        for lo in range(0, len(items), self.batch_size):
            batch = fitted[lo : lo + self.batch_size]
            for (item_id, _), (ids, cut), (top_ids, top_lps, token_lps) in zip(
                items[lo : lo + self.batch_size], batch, self._topk([ids for ids, _ in batch]), strict=True
            ):
                captures.append(Capture(item_id, ids, 0, top_ids, top_lps, token_lps, cut))
        return captures

    def close(self) -> None:
        self.model = None

    def _topk(self, sequences: list[list[int]]):
        """Per sequence: (P, K) ids, (P, K) logprobs, (P,) next-token logprobs, P = len - 1."""
        import torch

        T = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), T), dtype=torch.long)
        mask = torch.zeros((len(sequences), T), dtype=torch.long)
        for b, s in enumerate(sequences):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for b, s in enumerate(sequences):
            # NOTE: fp32 log-softmax over the whole vocabulary, as vLLM computes its logprobs.
            logprobs = torch.log_softmax(logits[b, : len(s) - 1].float(), dim=-1)  # (P, V)
            top_lps, top_ids = logprobs.topk(self.k, dim=-1)
            nxt = torch.tensor(s[1:], device=logprobs.device)
            token_lps = logprobs.gather(-1, nxt[:, None])[:, 0]
            out.append(
                (top_ids.cpu().numpy(), top_lps.double().cpu().numpy(), token_lps.double().cpu().numpy())
            )
        return out

    def _sampling(self, settings: SampleSettings):
        """Exactly the recipe's sampling: a fresh GenerationConfig, so none of the model's own defaults
        (repetition_penalty, top_k, min_p, ...) bends the draws away from the teacher's distribution,
        which train.tail=sample relies on."""
        from transformers import GenerationConfig

        sampled = settings.temperature > 0
        return GenerationConfig(
            do_sample=sampled,
            temperature=settings.temperature if sampled else None,
            top_p=settings.top_p if sampled else None,
            top_k=0 if sampled else None,
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.samples_per_prompt,
            eos_token_id=self.model.config.eos_token_id,
            pad_token_id=self.model.config.eos_token_id,
        )

    def sample(self, items: list[Item], settings: SampleSettings, first_index: int) -> list[Capture]:
        """Generate per prompt (seeded like vLLM: seed + global prompt index), then score the sequences."""
        import torch

        limit = self.max_model_len - settings.max_new_tokens
        sequences: list[Item] = []
        prompts: list[tuple[int, bool]] = []  # per sequence: prompt length, prompt was truncated
        for i, (item_id, ids) in enumerate(items):
            fitted, cut = fit_prompt(ids, limit)
            torch.manual_seed(settings.seed + first_index + i)
            with torch.no_grad():
                out = self.model.generate(
                    torch.tensor([fitted], device=self.device), generation_config=self._sampling(settings)
                )
            for j, row in enumerate(out.tolist()):
                sequences.append(
                    (f"{item_id}-s{j}", _trim_after_eos(row, len(fitted), self.model.config.eos_token_id))
                )
                prompts.append((len(fitted), cut))
        result = []
        for c, (prompt_len, cut) in zip(self.score(sequences), prompts, strict=True):
            start = prompt_len - 1
            result.append(
                Capture(
                    c.id,
                    c.input_ids,
                    start,
                    c.topk_ids[start:],
                    c.topk_logprobs[start:],
                    c.token_logprobs[start:],
                    cut,
                )
            )
        return result


def _trim_after_eos(row: list[int], prompt_len: int, eos: int | list[int] | None) -> list[int]:
    """Drop the padding generate() adds after a sequence's first EOS (the EOS itself is kept, as vLLM does)."""
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for i in range(prompt_len, len(row)):
        if row[i] in eos_ids:
            return row[: i + 1]
    return row
