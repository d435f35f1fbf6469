"""The loop's validation: held-out CE and top-k KL to a held-out teacher store, bits per byte (and with the
teacher in memory, full-vocabulary KL and top-1 agreement) on held-out human text, and the expected
acceptance as the teacher's draft."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from distill.losses import SparseTeacher, cross_entropy, kd_loss
from distill.training.data import StoreItems, TokenBlocks

if TYPE_CHECKING:
    from distill.training.loop import TrainJob


def evaluate_loss(model, blocks: TokenBlocks, batch_size: int, max_batches: int, device) -> float:
    """Mean next-token CE over the first `max_batches` validation micro-batches."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(min(max_batches, math.ceil(blocks.num_blocks / batch_size))):
            ids = blocks.batch(range(b * batch_size, min((b + 1) * batch_size, blocks.num_blocks)))[
                "input_ids"
            ]
            ids = ids.to(device)
            loss_sum, n = cross_entropy(model(input_ids=ids).logits, ids)
            total, count = total + loss_sum.item(), count + n
    model.train()
    return total / count


def evaluate_kl(model, items: StoreItems, batch_size: int, max_batches: int, device) -> float:
    """Mean forward KL(teacher || model) per target token on a held-out teacher store (T=1).

    With top-k targets the teacher's tail is one bucket (the same bucketing on the model's side), so
    this is the KL between the two distributions over the top-k plus "the rest"; a lower bound of the
    full-vocabulary KL, and exact when k covers the vocabulary.
    """
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(min(max_batches, math.ceil(items.num_items / batch_size))):
            batch = items.batch(range(b * batch_size, min((b + 1) * batch_size, items.num_items)))
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            parts = kd_loss(
                logits,
                SparseTeacher(batch["topk_ids"], batch["topk_logprobs"]),
                batch["loss_mask"],
                batch["input_ids"],
                "forward_kl",
                tail="bucket",
            )
            total, count = total + parts.kd.item(), count + parts.tokens
    model.train()
    return total / max(count, 1)


class HeldOutText:
    """Validation in units the objective does not train on: bits per byte of human text the student
    never saw (the corpus's validation split, and text from outside the corpus), and with a teacher in
    memory its full-vocabulary KL to the teacher and top-1 agreement (distill.heldout)."""

    def __init__(self, job: TrainJob, documents: int, accelerator):
        from transformers import AutoModelForCausalLM

        from distill.heldout import Documents
        from distill.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(job.tokenizer_dir)
        self.docs = {
            name: Documents.encode(texts, tokenizer, job.seq_len, documents)
            for name, texts in job.heldout.items()
        }
        from distill.training.launch import is_zero3

        self.device, self.teacher = accelerator.device, None
        # NOTE: a frozen model loaded inside a ZeRO-3 run is partitioned and cannot run on its own, so
        # under ZeRO-3 the loop logs bits per byte only; `distill eval` measures the full KL densely.
        if job.heldout_teacher is not None and not is_zero3(accelerator):
            import torch

            self.teacher = AutoModelForCausalLM.from_pretrained(str(job.heldout_teacher), dtype=torch.float32)
            self.teacher.to(self.device).eval()

    def evaluate(self, model, batch_size: int) -> dict[str, float]:
        """{<name>_bpb, <name>_kl_full, <name>_top1} for each held-out text."""
        from distill.heldout import measure, summarize

        row = {}
        for name, docs in self.docs.items():
            figures = summarize(measure(model, self.teacher, docs, batch_size, self.device))
            row[f"{name}_bpb"] = figures["bits_per_byte"]
            if "kl" in figures:
                row[f"{name}_kl_full"], row[f"{name}_top1"] = figures["kl"], figures["top1_agreement"]
        return row


def evaluate_acceptance(model, job: TrainJob, batch_size: int) -> float:
    """Expected acceptance of the model as the teacher's draft on held-out prompts: it samples
    completions (a fixed seed, so evaluations compare), the teacher scores them, and the overlap
    sum_v min(p_model, p_teacher) is averaged over the completion positions."""
    import torch

    from distill.training.onpolicy import acceptance_sum

    source, prompts = job.on_policy, job.val_prompts
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        batch = source.batch_for(model, chunk, [f"v{lo + i}" for i in range(len(chunk))], job.cfg.seed + lo)
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        accepted, positions = acceptance_sum(logits, batch)
        total, count = total + accepted, count + positions
    model.train(was_training)
    return total / max(count, 1)
