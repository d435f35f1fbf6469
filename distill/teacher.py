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

    def sample(self, items: list[Item], settings: SampleSettings, first_index: int) -> list[Capture]:
        """N completions per prompt, seeded like vLLM (prompt i, global index first_index + i, draws from its
        own generator seeded settings.seed + that index: the same samples whatever the batch or shard),
        generated batch_size prompts at a time, then scored."""
        limit = self.max_model_len - settings.max_new_tokens
        fitted = [fit_prompt(ids, limit) for _, ids in items]
        sequences: list[Item] = []
        prompts: list[tuple[int, bool]] = []  # per sequence: prompt length, prompt was truncated
        for lo in range(0, len(items), self.batch_size):
            batch = [ids for ids, _ in fitted[lo : lo + self.batch_size]]
            seeds = [settings.seed + first_index + i for i in range(lo, lo + len(batch))]
            rows = self._generate(batch, seeds, settings)
            chunk = zip(items[lo : lo + len(batch)], fitted[lo : lo + len(batch)], strict=True)
            for i, ((item_id, _), (ids, cut)) in enumerate(chunk):
                for j in range(settings.samples_per_prompt):
                    sequences.append((f"{item_id}-s{j}", ids + rows[i * settings.samples_per_prompt + j]))
                    prompts.append((len(ids), cut))
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

    def _generate(
        self, prompts: list[list[int]], seeds: list[int], settings: SampleSettings
    ) -> list[list[int]]:
        """The completions of `prompts` (samples_per_prompt rows each, in order), up to and including the
        first EOS: the prompts left-padded into one batch with a KV cache, each prompt's rows drawing from
        its own generator. Exactly the recipe's sampling (temperature, top_p; no top-k, repetition
        penalty or other defaults of the model's generation config), which train.tail=sample relies on."""
        import torch

        n = settings.samples_per_prompt
        rows = [p for p in prompts for _ in range(n)]
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        eos = self.model.config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=self.device)
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :], mask[b, width - len(r) :] = torch.tensor(r), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        past = None
        with torch.no_grad():
            for _ in range(settings.max_new_tokens):
                step = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                )
                past = step.past_key_values
                logits = step.logits[:, -1].float()
                nxt = self._draw(logits, settings, generators, n)
                for b, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
                    if not finished:
                        out[b].append(token)
                if eos_list:
                    done |= torch.isin(nxt, eos_ids)
                if bool(done.all()):
                    break
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                positions = positions[:, -1:] + 1
        return out

    @staticmethod
    def _draw(logits, settings: SampleSettings, generators, n: int):
        """One token per row: greedy at temperature 0, else from softmax(logits / T) cut to the top_p
        nucleus, row b drawing from the generator of its prompt (b // n)."""
        import torch

        if settings.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # a token stays if the mass before it is below top_p: the most likely token always stays
            drop = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return torch.cat(
            [torch.multinomial(probs[b], 1, generator=generators[b // n]) for b in range(probs.size(0))]
        )
