"""On-policy distillation: the student samples, the teacher (a vLLM server) scores, the student learns.

A micro-batch is on-policy with probability `train.on_policy.lmbda`, decided by a coin that is a pure
function of (seed, micro-batch index), so every process and every resumed run draws the same kinds.
An on-policy micro-batch: this process's prompts (a seeded order over the corpus prompts), completions
sampled by the current student, the teacher's top-k and sampled-token logprobs on the completion
positions, collated like a store batch (the loss mask covers the completion only).

Two objectives: `divergence` (train.loss over the teacher's top-k on the student's samples, as GKD) and
`sampled_reverse_kl` (a policy gradient with per-token advantage log p_teacher - log p_student of the
sampled token, which needs one teacher logprob per token). The metric that predicts draft quality is
the expected acceptance: the mean over completion positions of sum_v min(p_student, p_teacher), here
over the teacher's top-k (a lower bound, exact when k covers the teacher's support).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import OnPolicyConfig
from distill.store import collate

STUDENT_SAMPLE_SALT = 0x5A3D


@dataclass
class Prompts:
    ids: list[list[int]]

    @classmethod
    def from_corpus(cls, prompts_jsonl, tokenizer, prompt_tokens: int) -> Prompts:
        """The corpus prompts (openings of train documents), each cut to its last `prompt_tokens` tokens."""
        rows = [json.loads(line) for line in Path(prompts_jsonl).read_text().splitlines() if line.strip()]
        return cls([tokenizer(r["text"])["input_ids"][-prompt_tokens:] for r in rows])

    @classmethod
    def from_blocks(cls, tokens_npy, prompt_tokens: int, count: int) -> Prompts:
        """Held-out prompts: the first `prompt_tokens` tokens of consecutive blocks of a split."""
        tokens = np.load(tokens_npy, mmap_mode="r")
        count = min(count, len(tokens) // prompt_tokens)
        return cls(
            [
                tokens[i * prompt_tokens : (i + 1) * prompt_tokens].astype(np.int64).tolist()
                for i in range(count)
            ]
        )


def draws_on_policy(seed: int, micro_index: int, lmbda: float) -> bool:
    """The coin of micro-batch `micro_index`: the same on every process and after a resume."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    return bool(np.random.default_rng([seed, micro_index, STUDENT_SAMPLE_SALT]).random() < lmbda)


def sample_hf(
    model, prompts: list[list[int]], cfg: OnPolicyConfig, pad_id: int, eos_id: int | None, seed: int
):
    """Completions (token ids, cut after EOS) of each prompt by `model.generate`, reproducible from `seed`."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every completion starts at column `width`
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
        )
    model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        completions.append(row)
    return completions


class OnPolicySource:
    """On-policy micro-batches: student samples scored by the teacher client."""

    def __init__(
        self, prompts: Prompts, client, cfg: OnPolicyConfig, seed: int, pad_id: int, eos_id: int | None
    ):
        self.prompts, self.client, self.cfg, self.seed = prompts, client, cfg, seed
        self.pad_id, self.eos_id, self.k = pad_id, eos_id, client.k
        self._perm: dict[int, np.ndarray] = {}
        self.sampler: VllmSampler | None = None  # set by the loop when train.on_policy.sampler=vllm

    def prompt_indices(self, start: int, count: int) -> list[int]:
        n = len(self.prompts.ids)
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, n)
            if epoch not in self._perm:
                self._perm = {
                    epoch: np.random.default_rng([self.seed, epoch, STUDENT_SAMPLE_SALT]).permutation(n)
                }
            out.append(int(self._perm[epoch][offset]))
        return out

    def batch(self, model, indices: list[int], sample_seed: int) -> dict[str, Any]:
        prompts = [self.prompts.ids[i] for i in indices]
        return self.batch_for(model, prompts, [f"p{i}" for i in indices], sample_seed)

    def batch_for(
        self, model, prompts: list[list[int]], names: list[str], sample_seed: int
    ) -> dict[str, Any]:
        if self.sampler is not None:  # vLLM, with the weights of its last refresh
            completions = self.sampler.sample(prompts, sample_seed)
        else:
            completions = sample_hf(model, prompts, self.cfg, self.pad_id, self.eos_id, sample_seed)
        items = [(name, p + c) for name, p, c in zip(names, prompts, completions, strict=True)]
        # scored from the position that predicts the first completion token
        captures = self.client.score(items, start=[len(p) - 1 for p in prompts])
        return collate(captures, self.k, self.pad_id)


def acceptance_sum(logits, batch: dict[str, Any]) -> tuple[float, int]:
    """(sum over target positions of sum_{v in teacher top-k} min(p_student(v), p_teacher(v)), positions)."""
    import torch

    with torch.no_grad():
        mask = batch["loss_mask"]
        student = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V)
        ids = batch["topk_ids"][mask]  # (N, K)
        p_student = student.gather(-1, ids).exp()
        p_teacher = batch["topk_logprobs"][mask].float().exp()
        # padding slots (fewer than k candidates) carry the floor logprob: exp() is 0 there
        overlap = torch.minimum(p_student, p_teacher).sum(-1)
        return float(overlap.sum()), int(mask.sum())


def sampled_reverse_kl(logits, batch: dict[str, Any]):
    """(summed surrogate loss, summed per-token reverse-KL estimate, tokens) on the sampled tokens.

    The gradient of -sum_t A_t log p_student(x_t), with A_t = log p_teacher(x_t) - log p_student(x_t)
    held constant, is the per-token policy-gradient estimate of the reverse KL's gradient on samples
    from the student itself.
    """
    import torch

    mask = batch["loss_mask"][:, :-1]
    targets = batch["input_ids"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    teacher = batch["token_logprobs"][:, :-1].float()
    advantage = (teacher - logp).detach()
    surrogate = -(advantage * logp)[mask].sum()
    estimate = (logp.detach() - teacher)[mask].sum()
    return surrogate, float(estimate), int(mask.sum())


class VllmSampler:
    """The student in a vLLM engine of its own, for sampling; its weights are reloaded in place from the
    trainer's every `refresh_every` steps (`collective_rpc("reload_weights")`), never restarted.

    Between refreshes the samples come from weights up to N-1 steps old: for `divergence` that only
    moves which positions are trained; `sampled_reverse_kl` is then slightly off-policy (no importance
    correction), so keep refresh_every at 1 for it.
    """

    def __init__(self, model, tokenizer_dir, work_dir, cfg: OnPolicyConfig, max_model_len: int, eos_id):
        from vllm import LLM

        from distill.vllm.engine import engine_kwargs, has_cuda

        self.cfg, self.eos_id, self.dir = cfg, eos_id, Path(work_dir)
        self._export(model, tokenizer_dir)
        # on a GPU the engine shares the card with the trainer: a bounded share, bf16 like training
        gpu = {"gpu_memory_utilization": cfg.sampler_gpu_memory, "dtype": "bfloat16"} if has_cuda() else {}
        self.llm = LLM(**engine_kwargs(str(self.dir), max_model_len=max_model_len, seed=0, **gpu))
        self.refreshed_at: int | None = None

    def _export(self, model, tokenizer_dir=None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(self.dir, safe_serialization=True)
        if tokenizer_dir is not None:
            from distill.tokenizer import load_tokenizer

            load_tokenizer(tokenizer_dir).save_pretrained(self.dir)

    def refresh(self, model, step: int) -> None:
        """Load the trainer's current weights into the engine (in place, no restart)."""
        self._export(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.dir)})
        self.llm.reset_prefix_cache()
        self.refreshed_at = step

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                seed=seed + i,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]

    def close(self) -> None:
        from distill.vllm.engine import shutdown_engine

        shutdown_engine(self.llm)
