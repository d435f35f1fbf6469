"""TRL's GKDTrainer on fixed sequences: the peer that bench/train_step.py times against `distill train`.

    .venv-bench/bin/python bench/trl_gkd_worker.py --student DIR --teacher DIR --data FILE.jsonl --out DIR ...

Runs only in .venv-bench (TRL is never installed in .venv); it imports nothing from distill. The student
starts from the directory bench/train_step.py wrote with distill's own initialisation, the teacher is the
model distill pretrained, and the data is the token blocks of distill's teacher store, one JSON list of
input_ids per line. Prints one JSON line: steady-state target tokens/s and the per-step times.

GKD settings for forward KL on fixed sequences: lmbda=0 (never the student's own samples), seq_kd off
(never the teacher's samples), beta=0 (TRL's generalized JSD at beta=0 is F.kl_div(log q, log p), i.e.
KL(teacher || student): forward KL), temperature 1.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="initial student (HF directory)")
    parser.add_argument("--teacher", required=True, help="teacher (HF directory)")
    parser.add_argument("--data", required=True, help="jsonl, one list of input_ids per line")
    parser.add_argument("--out", required=True, help="output_dir of the trainer")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument("--min-lr-ratio", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--beta1", type=float, required=True)
    parser.add_argument("--beta2", type=float, required=True)
    parser.add_argument("--max-grad-norm", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--log-every", type=int, required=True, help="logging steps; also the warm-up skipped"
    )
    return parser.parse_args()


def collate(rows: list[dict]) -> dict:
    """Equal-length blocks, no padding. labels[:, 0] is never a target (nothing predicts it), so masking
    it makes the Trainer's token count (num_items_in_batch) exactly the B x (T - 1) targets."""
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)  # (B, T)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    args = parse_args()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import __version__ as trl_version
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [
        json.loads(line)["input_ids"] for line in Path(args.data).read_text().splitlines() if line.strip()
    ]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise SystemExit(f"expected equal-length blocks, got lengths {sorted(lengths)}")
    seq_len = lengths.pop()
    dataset = Dataset.from_dict({"input_ids": rows})

    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.student)

    config = GKDConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        # distill: linear warmup, then cosine decay to min_lr_ratio x lr, AdamW without decay on norms
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta1=args.beta1,
        adam_beta2=args.beta2,
        max_grad_norm=args.max_grad_norm,
        # NOTE: plain torch.optim.AdamW, the optimizer distill steps; TRL's default here is the fused kernel.
        optim="adamw_torch",
        seed=args.seed,
        data_seed=args.seed,
        # NOTE: fp32 and no activation checkpointing, as distill on CPU; TRL defaults both the other way.
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        lmbda=0.0,
        beta=0.0,
        seq_kd=False,
        temperature=1.0,
        max_length=seq_len,
        disable_dropout=True,
        logging_steps=args.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class StepClock(TrainerCallback):
        """perf_counter at the end of every optimizer step (after clip, step, schedule and logging)."""

        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.save_model(str(Path(args.out) / "final"))  # as distill exports final/

    tokens_per_step = args.batch * (seq_len - 1)
    skip = args.log_every
    timed_steps = len(clock.ends) - skip
    steady_seconds = clock.ends[-1] - clock.ends[skip - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(
        json.dumps(
            {
                "trl_version": trl_version,
                "torch_threads": torch.get_num_threads(),
                "steps": len(clock.ends),
                "seq_len": seq_len,
                "tokens_per_step": tokens_per_step,
                "tokens": tokens_per_step * len(clock.ends),
                "steady_steps": timed_steps,
                "steady_seconds": steady_seconds,
                "tokens_per_s": tokens_per_step * timed_steps / steady_seconds,
                "train_seconds": train_seconds,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
            }
        )
    )


if __name__ == "__main__":
    main()
