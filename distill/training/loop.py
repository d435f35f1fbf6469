"""The training loop: `_train`, read top to bottom (setup, micro-batches, backward, step, log, validate,
save, export), with its parts below it.

One loop for every model distill trains: the embedded teacher's pretraining (CE on corpus blocks), the
KD student (offline on the teacher store, or on-policy on its own samples scored by the teacher server),
and the SFT baseline (CE on the store's sequences); one process or a launched DDP / DeepSpeed job.

Exact resume: the micro-batch at global index g is a pure function of (seed, g), and a checkpoint holds
model, optimizer, scheduler and RNG states, so a resumed run computes what the uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.artifacts import (
    atomic_directory,
    read_json,
    remove_stale_temps,
)
from distill.config import TrackingConfig, TrainConfig
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX, SparseTeacher, cross_entropy, fused_kd_loss, kd_loss
from distill.tracking import MetricsLog, NullTracker, make_tracker
from distill.training.checkpoint import check_checkpoints, list_checkpoints, save_checkpoint, settings_hash
from distill.training.data import BlockOrder, CrossStoreItems, StoreItems, TokenBlocks
from distill.training.onpolicy import draws_on_policy
from distill.training.validation import HeldOutText, evaluate_acceptance, evaluate_kl, evaluate_loss


@dataclass
class TrainJob:
    """One run of the loop: what to train, on what, and where its files go."""

    name: str
    out_dir: Path  # checkpoints/step-N/, final/, metrics.jsonl, wandb/
    cfg: TrainConfig
    tracking: TrackingConfig
    tokenizer_dir: Path
    tokens_dir: Path  # train.npy, validation.npy (flat token ids)
    seq_len: int
    build_model: Callable[[], Any]  # returns the initial model (fp32) when not resuming
    store: Path | None = None  # a teacher store: train on its sequences (KD, or CE for the SFT baseline)
    val_store: Path | None = None  # a held-out teacher store: validation KL of the model to the teacher
    on_policy: Any = None  # an onpolicy.OnPolicySource when train.mode=on_policy
    val_prompts: list[list[int]] | None = None  # held-out prompts for val_acceptance (on-policy runs)
    heldout: dict[str, list[str]] = field(default_factory=dict)  # name -> texts: held-out bits per byte
    heldout_teacher: Path | None = None  # a teacher small enough to load: dense KL and top-1 on them
    hidden: Any = None  # a hidden.HiddenSetup when train.hidden is set
    teacher_tokenizer_dir: Path | None = None  # the store's tokenizer when it is not the student's
    cache_dir: Path | None = None  # the recipe's cache (vocab maps between tokenizers)
    model_settings: dict[str, Any] = field(default_factory=dict)  # what build_model builds (for resume)
    device: str = "cpu"
    mixed_precision: str = "no"
    resume: bool = False
    progress: bool = True
    config_dump: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_recipe(
        cls, recipe, role: str, cfg: TrainConfig, data, out_dir: Path, build_model, **kwargs
    ) -> TrainJob:
        """The job for `role` ("teacher", "student") of a recipe, on its prepared data and device (the
        student's own tokenizer and tokens where kwargs give them)."""
        from distill.models import resolve_device

        device = resolve_device(recipe.device)
        kwargs.setdefault("tokenizer_dir", data.tokenizer_dir)
        kwargs.setdefault("tokens_dir", data.tokens_dir)
        kwargs.setdefault("cache_dir", recipe.cache_path)
        return cls(
            name=f"{recipe.name}-{role}",
            out_dir=out_dir,
            cfg=cfg,
            tracking=recipe.tracking,
            seq_len=recipe.data.seq_len,
            build_model=build_model,
            device=device,
            # NOTE: fp32 on CPUs (no bf16 hardware here); bf16 autocast over fp32 master weights on GPUs.
            mixed_precision="bf16" if device == "cuda" else "no",
            config_dump=recipe.model_dump(mode="json"),
            model_settings=getattr(recipe, role).model_dump(mode="json"),
            **kwargs,
        )


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    tokens: int
    val_loss: float
    seconds: float
    val_kl: float | None = None
    val_acceptance: float | None = None
    start_acceptance: float | None = None
    heldout: dict[str, float] = field(default_factory=dict)
    tail: str | None = None  # train.tail as resolved for this run (auto -> sample or bucket)


# --------------------------------------------------------------------------- optimisation


def resolve_tail(cfg: TrainConfig, train_items, store: Path | None) -> str:
    """train.tail for this run: `auto` becomes sample where the unbiased sampled tail applies (forward KL
    at temperature 1 on a store of teacher draws) and nothing else teaches the tail (ce_weight 0), else
    bucket; an explicit sample is checked.

    NOTE: with CE mixed in, the draws' CE already carries the tail and the bucket pins its mass: bucket
    + CE measured better than sample + CE on every held-out figure (docs/kd-vs-sft.md)."""
    if isinstance(train_items, CrossStoreItems):
        return "bucket"  # across tokenizers, what the shared head leaves out is one bin (crosstok)
    draws = isinstance(train_items, StoreItems) and train_items.teacher_draws
    if cfg.tail == "auto":
        fits = cfg.loss == "forward_kl" and cfg.temperature == 1.0 and cfg.mode == "offline" and draws
        fits = fits and cfg.ce_weight == 0
        return "sample" if fits else "bucket"
    if cfg.tail == "sample" and cfg.loss != "ce" and not draws:
        raise DistillError(
            f"train.tail=sample needs a store whose tokens the teacher sampled at temperature 1, top_p 1 "
            f"(generate.mode=sample); {store} holds other tokens: use train.tail=bucket"
        )
    return cfg.tail


def make_optimizer(model, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # NOTE: no empty groups (LoRA has no trainable norms): DeepSpeed drops them, and the scheduler's
    # per-group rates would no longer line up with the optimizer's groups.
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


@dataclass
class _Window:
    sums: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def add(self, parts: dict[str, float], tokens: int) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.tokens += tokens

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.tokens, 1)


def next_token_labels(input_ids, loss_mask):
    """labels (B, T) for `cross_entropy`: token t + 1 is a target where position t is in the mask."""
    import torch

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 1:] = torch.where(loss_mask[:, :-1], input_ids[:, 1:], IGNORE_INDEX)
    return labels


def micro_batch_loss(
    model, batch: dict[str, Any], cfg: TrainConfig, scale: float, sampled: bool = False, teacher=None,
    layer=None,
):  # fmt: skip
    """(loss to backward, summed parts for logging, target tokens) of one micro-batch.

    The summed loss is multiplied by `scale` before backward (see the loop for what it undoes).
    KD losses need teacher top-k in the batch; `ce` trains on the same positions with hard labels.
    `sampled`: the student sampled these sequences (on-policy); they also give the expected acceptance.
    `teacher`: a hidden.HiddenTeacher (train.hidden), whose layer outputs the student's are pulled to.
    `layer`: the student's head.OutputLayer (train.fused_loss), used on store batches of one tokenizer:
    the loss then computes the logits a chunk at a time from the last hidden states.
    """
    ids = batch["input_ids"]
    if sampled or "span_rows" in batch:
        layer = None  # these losses read the full logits
    if teacher is not None:
        return _with_hidden_loss(model, batch, cfg, scale, teacher, layer)
    if layer is not None:
        _, hidden = layer.run(model, input_ids=ids, attention_mask=batch.get("attention_mask"))
        return _loss_on((hidden, layer.module), batch, cfg, scale)
    logits = model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits  # (B, T, V)
    if sampled:
        from distill.training.onpolicy import acceptance_sum, sampled_reverse_kl

        accepted, positions = acceptance_sum(logits, batch)
        extra = {"acceptance": accepted, "sampled_tokens": float(positions), "sampled_batches": 1.0}
        if cfg.on_policy.objective == "sampled_reverse_kl":
            surrogate, estimate, n = sampled_reverse_kl(logits, batch)
            return surrogate * scale, {"kd": estimate, "objective": estimate, **extra}, n
        to_backward, parts, n = _loss_on(logits, batch, cfg, scale)
        return to_backward, {**parts, **extra}, n
    return _loss_on(logits, batch, cfg, scale)


def _with_hidden_loss(model, batch: dict[str, Any], cfg: TrainConfig, scale: float, teacher, layer=None):
    """The logit loss plus train.hidden's, on the positions the logit loss trains (those with a target)."""
    from distill.training.hidden import hidden_loss

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if layer is not None:
        (_, student_states), last = layer.run(model, input_ids=ids, attention_mask=mask, hidden=True)
        to_backward, parts, n = _loss_on((last, layer.module), batch, cfg, scale)
    else:
        out, student_states = model(input_ids=ids, attention_mask=mask, hidden=True)
        to_backward, parts, n = _loss_on(out.logits, batch, cfg, scale)
    positions = batch["loss_mask"].clone()
    positions[:, -1] = False  # the last position predicts nothing
    summed = hidden_loss(student_states, teacher.states(ids, mask), positions, cfg.hidden.loss)
    weight = cfg.hidden.weight
    parts = {**parts, "hidden": summed.item(), "objective": parts["objective"] + weight * summed.item()}
    return to_backward + summed * (weight * scale), parts, n


def _loss_on(logits, batch: dict[str, Any], cfg: TrainConfig, scale: float):
    """The logit loss of a micro-batch; `logits` (B, T, V), or (hidden states, output layer) for the fused
    output layer + loss (distill.losses.fused_kd_loss)."""
    ids = batch["input_ids"]
    if "span_rows" in batch:
        return _cross_loss_on(logits, batch, cfg, scale)
    fused = isinstance(logits, tuple)
    if cfg.loss == "ce" and fused:
        parts = fused_kd_loss(*logits, None, batch["loss_mask"], ids, kd_weight=0.0, ce_weight=scale)
        return parts.total, {"ce": parts.ce.item(), "objective": parts.ce.item()}, parts.tokens
    if cfg.loss == "ce":
        ce_sum, n = cross_entropy(logits, next_token_labels(ids, batch["loss_mask"]))
        return ce_sum * scale, {"ce": ce_sum.item(), "objective": ce_sum.item()}, n
    teacher = SparseTeacher(batch["topk_ids"], batch["topk_logprobs"])
    if cfg.tail == "sample":  # the sequence's own next tokens are the teacher's draws
        teacher = SparseTeacher.from_continuation(
            batch["topk_ids"], batch["topk_logprobs"], ids, batch["token_logprobs"]
        )
    parts = (fused_kd_loss if fused else kd_loss)(
        *(logits if fused else (logits,)),
        teacher,
        batch["loss_mask"],
        ids,
        cfg.loss,
        temperature=cfg.temperature,
        beta=cfg.beta,
        alpha=cfg.alpha,
        tail=cfg.tail,
        # NOTE: the window normalisation is folded into the weights so backward starts from 1 (no copy).
        kd_weight=scale,
        ce_weight=cfg.ce_weight * scale,
    )
    kd, ce = parts.kd.item(), parts.ce.item()
    return parts.total, {"kd": kd, "ce": ce, "objective": kd + cfg.ce_weight * ce}, parts.tokens


def _cross_loss_on(logits, batch: dict[str, Any], cfg: TrainConfig, scale: float):
    """Across tokenizers: the span losses (distill.crosstok) plus CE on the student's own tokens of the
    teacher's text, or that CE alone for loss ce (the SFT baseline on the re-tokenized text)."""
    from distill.crosstok import span_losses

    counts = {key: float(batch[f"count_{key}"]) for key in ("spans", "one_to_one", "targets", "unaligned")}
    ce_sum, ce_tokens = cross_entropy(logits, next_token_labels(batch["input_ids"], batch["loss_mask"]))
    if cfg.loss == "ce":
        return ce_sum * scale, {"ce": ce_sum.item(), "objective": ce_sum.item(), **counts}, ce_tokens
    method = cfg.cross_tokenizer.method
    kd_sum = span_losses(
        logits, batch, method, cfg.loss, cfg.cross_tokenizer.uld_weight, cfg.beta, cfg.alpha
    ).sum()
    # NOTE: the window divides by spans; CE is summed over the student's tokens, so it is first put per
    # span's worth of tokens: loss = KD per span + ce_weight x CE per student token.
    ce_sum = ce_sum * (counts["spans"] / max(ce_tokens, 1))
    total = (kd_sum + cfg.ce_weight * ce_sum) * scale if cfg.ce_weight else kd_sum * scale
    kd, ce = kd_sum.item(), ce_sum.item()
    return total, {"kd": kd, "ce": ce, "objective": kd + cfg.ce_weight * ce, **counts}, int(counts["spans"])


def target_count(batch: dict[str, Any], cfg: TrainConfig) -> int:
    """The targets a micro-batch's summed loss is divided by: its positions with a target, or across
    tokenizers its aligned spans (KD) or the student's completion tokens (CE)."""
    if "span_rows" in batch and cfg.loss != "ce":
        return int(batch["count_spans"])
    return int(batch["loss_mask"][:, :-1].sum())


def _refresh_sampler(job: TrainJob, accelerator, model, step: int, out_dir: Path, rank: int) -> None:
    """Start the student's vLLM sampler on first use; reload its weights every refresh_every steps."""
    from distill.training.onpolicy import VllmSampler

    source, every = job.on_policy, job.cfg.on_policy.refresh_every
    unwrapped = accelerator.unwrap_model(model)
    if source.sampler is None:
        max_len = job.cfg.on_policy.prompt_tokens + job.cfg.on_policy.max_new_tokens
        source.sampler = VllmSampler(
            unwrapped,
            job.tokenizer_dir,
            out_dir / f"sampler-{rank}",
            job.cfg.on_policy,
            max_len,
            source.eos_id,
        )
        source.sampler.refreshed_at = step
    elif step - source.sampler.refreshed_at >= every:
        source.sampler.refresh(unwrapped, step)


def _all_reduce_sum(accelerator, values: list[float]) -> list[float]:
    """Element-wise sums over all processes (the values themselves in a single process)."""
    if accelerator.num_processes == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _end_distributed(accelerator) -> None:
    """Leave the process group cleanly: left to interpreter exit, gloo aborts the process."""
    import torch.distributed as dist

    if accelerator.num_processes > 1 and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the loop


def train(job: TrainJob) -> TrainResult:
    """Train `job.build_model()` (or resume from `job.out_dir`), then export `out_dir/final` in HF format.

    Runs as one process or as each of the processes `accelerate launch` started (DDP or DeepSpeed):
    every process takes its own rows of each global micro-batch, and all of them run this same code.
    """
    from distill.training.launch import check_world, make_accelerator

    cfg = job.cfg
    accelerator = make_accelerator(cfg.distributed, job.device, job.mixed_precision, cfg.grad_accum)
    try:
        check_world(accelerator, cfg.distributed)
        return _train(job, accelerator)
    finally:
        _end_distributed(accelerator)


def _train(job: TrainJob, accelerator) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    from distill.training.head import fused_output_layer
    from distill.training.hidden import student_of
    from distill.training.launch import configure_deepspeed

    cfg, out_dir = job.cfg, Path(job.out_dir)
    main, world = accelerator.is_main_process, accelerator.num_processes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir / "checkpoints")
    accelerator.wait_for_everyone()
    resume_from = check_checkpoints(out_dir, job.resume)

    # ---- setup
    torch.manual_seed(cfg.seed)
    model = job.build_model()
    model.config.use_cache = False
    context = int(getattr(model.config, "max_position_embeddings", job.seq_len))
    teacher = None
    if cfg.hidden is not None:  # the student and its projections train as one module
        from distill.training.hidden import HiddenTeacher, projected

        model = projected(model, cfg.hidden, job.hidden)
        dtype = torch.bfloat16 if job.mixed_precision == "bf16" else torch.float32
        teacher = HiddenTeacher.load(job.hidden, cfg.hidden.pairs, accelerator, dtype)
    layer = fused_output_layer(student_of(model), cfg.fused_loss, log=accelerator.print)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    configure_deepspeed(accelerator, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    if layer is not None and layer.sharded_and_frozen():
        if cfg.fused_loss == "on":
            raise DistillError("train.fused_loss: on, but ZeRO-3 shards the frozen output layer; use auto")
        accelerator.print("fused output layer + loss off: ZeRO-3 shards the frozen output layer (LoRA)")
        layer.remove()
        layer = None
    # The scheduler is stepped by us once per optimizer step; accelerate only saves and restores it.
    accelerator.register_for_checkpointing(scheduler)
    data = _Data.of(job, accelerator, context)
    cfg = cfg.model_copy(update={"tail": resolve_tail(cfg, data.train, job.store)})
    state = _start_state(accelerator, settings_hash(job), resume_from)
    # Only the main process tracks and logs; every process trains.
    tracker = (
        make_tracker(job.tracking, job.name, out_dir, job.config_dump, resume_id=state["wandb_id"])
        if main
        else NullTracker()
    )
    state["wandb_id"] = getattr(tracker, "id", None)
    log = (
        MetricsLog(out_dir / "metrics.jsonl", resume_step=state["step"] if resume_from else None)
        if main
        else None
    )

    try:  # the wandb run is closed however the loop ends (a crash, a NaN, Ctrl-C)
        if job.val_prompts and main and resume_from is None:
            # the starting student's expected acceptance: what on-policy training is measured against
            state["start_acceptance"] = evaluate_acceptance(
                accelerator.unwrap_model(model), job, data.eval_batch
            )
            log.write({"step": 0, "val_acceptance": state["start_acceptance"]})
        # ---- loop
        model.train()
        started = time.perf_counter()
        clock = _Clock(started, state["tokens"])
        bar = tqdm(total=cfg.max_steps, initial=state["step"], unit="step", disable=not (job.progress and main),
                   desc=job.name)  # fmt: skip
        while state["step"] < cfg.max_steps:
            step = state["step"]
            if cfg.mode == "on_policy" and cfg.on_policy.sampler == "vllm":
                _refresh_sampler(job, accelerator, model, step, out_dir, accelerator.process_index)
            micro, sampled = _micro_batches(job, cfg, data, accelerator, model, step)
            window, window_tokens = _accumulate(
                accelerator, model, cfg, micro, sampled, step, out_dir, teacher, layer
            )
            # (DeepSpeed clipped and stepped inside the last backward; these two then only report / no-op.)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens"] += int(window_tokens)
            state["sampled_batches"] += sum(sampled) * world
            state["store_batches"] += (len(sampled) - sum(sampled)) * world
            bar.update(1)

            row: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                row.update(_train_row(accelerator, job, window, state, lr, grad_norm, clock))
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                row.update(_validate(job, data, accelerator, model, step, state))
            if row and main:
                row["step"] = step
                log.write(row)
                tracker.log(row, step=step)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, out_dir, dict(state), cfg.keep_last)
        bar.close()
        final_dir = _export_final(job, accelerator, model, out_dir)
    finally:
        tracker.finish()
        if job.on_policy is not None and job.on_policy.sampler is not None:
            job.on_policy.sampler.close()
    return TrainResult(
        final_dir,
        state["step"],
        state["tokens"],
        state["val_loss"],
        time.perf_counter() - started,
        state.get("val_kl"),
        state.get("val_acceptance"),
        state.get("start_acceptance"),
        state.get("heldout", {}),
        cfg.tail if cfg.loss != "ce" else None,
    )


# --------------------------------------------------------------------------- the loop's parts


@dataclass
class _Data:
    """What a training run reads: its items (the teacher store, or corpus blocks for CE; None when the
    student samples every micro-batch), their order, and the held-out sets validation measures."""

    train: StoreItems | TokenBlocks | None
    order: BlockOrder | None
    val_blocks: TokenBlocks
    val_items: StoreItems | None
    heldout: HeldOutText | None
    # Every process evaluates the same global micro-batches (ZeRO-3 needs all of them in each forward),
    # so the validation figures do not depend on how the batch is split across processes.
    eval_batch: int

    @classmethod
    def of(cls, job: TrainJob, accelerator, context: int) -> _Data:
        """`context`: the model's positions (a re-tokenized store row is cut to fit)."""
        cfg = job.cfg
        if job.store is not None and job.teacher_tokenizer_dir is not None:
            pad = _pad_id(job.tokenizer_dir)
            items = CrossStoreItems(
                job.store, job.teacher_tokenizer_dir, job.tokenizer_dir, context, pad, job.cache_dir
            )
        elif job.store is not None:
            items = StoreItems(job.store, pad_id=_pad_id(job.tokenizer_dir))
        elif cfg.mode == "on_policy" and cfg.on_policy.lmbda >= 1.0:
            items = None  # every micro-batch is sampled by the student
        elif cfg.loss != "ce":
            raise DistillError(f"train.loss={cfg.loss} needs a teacher store (run `distill generate` first)")
        else:
            items = TokenBlocks(job.tokens_dir / "train.npy", job.seq_len)
        return cls(
            train=items,
            order=BlockOrder(items.num_items, cfg.seed) if items is not None else None,
            val_blocks=TokenBlocks(job.tokens_dir / "validation.npy", job.seq_len),
            val_items=StoreItems(job.val_store, pad_id=_pad_id(job.tokenizer_dir)) if job.val_store else None,
            heldout=HeldOutText(job, cfg.eval_batches * cfg.batch_size, accelerator) if job.heldout else None,
            eval_batch=cfg.batch_size * accelerator.num_processes,
        )


def _start_state(accelerator, settings: str, resume_from: Path | None) -> dict[str, Any]:
    """The loop's state: fresh, or the checkpoint's (whose weights, optimizer and RNGs are loaded too)."""
    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "wandb_id": None,
        "val_loss": None,
        "val_kl": None,
        "val_acceptance": None,
        "start_acceptance": None,
        "heldout": {},
        "sampled_batches": 0,  # on-policy micro-batches so far, over all processes
        "store_batches": 0,
        "settings": settings,
    }
    if resume_from is None:
        return state
    saved = read_json(resume_from / "trainer_state.json")
    if saved.get("settings") != settings:
        raise DistillError(
            f"cannot resume from {resume_from}: the training settings, model or data changed since it "
            "was written (an exact resume needs the same ones); use --overwrite to start over"
        )
    accelerator.load_state(str(resume_from))
    accelerator.print(f"resuming from {resume_from} (step {saved['step']})")
    return saved


def _micro_batches(job: TrainJob, cfg: TrainConfig, data: _Data, accelerator, model, step: int):
    """This process's rows of the step's grad_accum global micro-batches (batch_size x processes rows
    each), and whether each was sampled by the student (on-policy) or read from the store."""
    rank, rows = accelerator.process_index, cfg.batch_size * accelerator.num_processes
    micro, sampled = [], []
    for m in range(cfg.grad_accum):
        g = step * cfg.grad_accum + m  # the global micro-batch index
        first = g * rows + rank * cfg.batch_size
        if cfg.mode == "on_policy" and draws_on_policy(cfg.seed, g, cfg.on_policy.lmbda):
            # the current student samples this process's prompts; the teacher scores them
            indices = job.on_policy.prompt_indices(first, cfg.batch_size)
            seed = int(np.random.default_rng([cfg.seed, g, rank]).integers(2**31))
            try:
                micro.append(job.on_policy.batch(accelerator.unwrap_model(model), indices, seed))
            except DistillError as exc:
                last = list_checkpoints(Path(job.out_dir))
                raise DistillError(f"{exc}. Last good checkpoint: {last[-1] if last else 'none'}") from exc
            sampled.append(True)
        else:
            micro.append(data.train.batch(data.order.indices(first, cfg.batch_size)))
            sampled.append(False)
    return micro, sampled


def _accumulate(
    accelerator, model, cfg: TrainConfig, micro, sampled, step: int, out_dir: Path, teacher=None, layer=None
):
    """Forward and backward over the step's micro-batches; (their loss parts, the target tokens of the
    whole window on all processes). A non-finite loss stops before it reaches the weights."""
    # NOTE: every summed loss is divided by the target-token count of the whole window on all
    # processes, so batch 8 x accumulation 1, batch 2 x accumulation 4 and 2 processes x batch 4
    # give the same gradient. Accelerate (or DeepSpeed) divides by grad_accum and DDP/ZeRO average
    # over processes; the scale undoes both.
    (window_tokens,) = _all_reduce_sum(accelerator, [float(sum(target_count(b, cfg) for b in micro))])
    scale = cfg.grad_accum * accelerator.num_processes / max(window_tokens, 1.0)
    window = _Window()
    for batch, is_sampled in zip(micro, sampled, strict=True):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.accumulate(model):
            to_backward, parts, n = micro_batch_loss(model, batch, cfg, scale, is_sampled, teacher, layer)
            # checked on every process before backward, so a NaN never reaches the weights
            (bad,) = _all_reduce_sum(accelerator, [0.0 if math.isfinite(parts["objective"]) else 1.0])
            if bad:
                last = list_checkpoints(out_dir)
                raise DistillError(
                    f"loss is {parts['objective'] / max(n, 1)} at step {step + 1}; stopped. Last good "
                    f"checkpoint: {last[-1] if last else 'none'} (lower train.lr or check the data)"
                )
            accelerator.backward(to_backward)
        window.add(parts, n)
    return window, window_tokens


@dataclass
class _Clock:
    """When the current logging window started, and the tokens trained by then (for tokens/s)."""

    started: float
    tokens: int


def _train_row(accelerator, job: TrainJob, window: _Window, state: dict, lr: float, grad_norm, clock: _Clock):
    """The training metrics of a logged step, summed over all processes."""
    keys = sorted(window.sums)
    totals = _all_reduce_sum(accelerator, [window.sums[k] for k in keys] + [float(window.tokens)])
    sums, tokens = dict(zip(keys, totals[:-1], strict=True)), max(totals[-1], 1.0)
    elapsed = time.perf_counter() - clock.started
    row: dict[str, Any] = dict(
        loss=sums["objective"] / tokens,
        **{f"loss_{key}": sums[key] / tokens for key in ("kd", "ce", "hidden") if key in sums},
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        tokens=state["tokens"],
        tokens_per_s=(state["tokens"] - clock.tokens) / max(elapsed, 1e-9),
    )
    if "targets" in sums:  # across tokenizers: what could not be aligned, counted and left out
        row.update(
            targets=int(sums["targets"]),
            unaligned=int(sums["unaligned"]),
            unaligned_share=sums["unaligned"] / max(sums["targets"], 1.0),
            spans=int(sums["spans"]),
            one_to_one_share=sums["one_to_one"] / max(sums["spans"], 1.0),
        )
    if job.cfg.mode == "on_policy":
        row.update(sampled_batches=state["sampled_batches"], store_batches=state["store_batches"])
        if job.on_policy.sampler is not None:  # the step whose weights the engine samples with
            row["sampler_step"] = job.on_policy.sampler.refreshed_at
        if sums.get("sampled_tokens"):
            row["acceptance"] = sums["acceptance"] / sums["sampled_tokens"]
    clock.started, clock.tokens = time.perf_counter(), state["tokens"]
    return row


def _validate(job: TrainJob, data: _Data, accelerator, model, step: int, state: dict) -> dict[str, Any]:
    """Held-out figures at an eval step (also kept in `state` for the result and the checkpoint)."""
    cfg, device, batch = job.cfg, accelerator.device, data.eval_batch
    state["val_loss"] = evaluate_loss(model, data.val_blocks, batch, cfg.eval_batches, device)
    row = {"val_loss": state["val_loss"], "val_ppl": math.exp(min(state["val_loss"], 50))}
    if data.val_items is not None:
        state["val_kl"] = row["val_kl"] = evaluate_kl(model, data.val_items, batch, cfg.eval_batches, device)
    if data.heldout is not None:
        state["heldout"] = data.heldout.evaluate(model, batch)
        row.update(state["heldout"])
    if job.val_prompts and accelerator.is_main_process:
        if job.on_policy.sampler is not None:  # the engine samples with the current weights
            job.on_policy.sampler.refresh(accelerator.unwrap_model(model), step)
        state["val_acceptance"] = evaluate_acceptance(accelerator.unwrap_model(model), job, batch)
        row["val_acceptance"] = state["val_acceptance"]
    return row


def _export_final(job: TrainJob, accelerator, model, out_dir: Path) -> Path:
    """`out_dir/final` in HF format, written by the main process once every process is done."""
    from distill.training.hidden import student_of, student_state_dict
    from distill.training.launch import is_zero3

    accelerator.wait_for_everyone()
    if is_zero3(accelerator):
        # ZeRO-3 partitions the weights: gather them on the main process into a fresh, plain copy.
        state_dict = student_state_dict(accelerator.get_state_dict(model))  # train.hidden's maps dropped
        if accelerator.is_main_process:
            with accelerator.state.deepspeed_plugin.zero3_init_context_manager(enable=False):
                export = job.build_model()
            export.load_state_dict(state_dict)
    else:
        export = student_of(accelerator.unwrap_model(model))  # train.hidden's maps dropped
    if accelerator.is_main_process:
        _export(export, out_dir, job.tokenizer_dir)
    accelerator.wait_for_everyone()
    return out_dir / "final"


def _export(model, out_dir: Path, tokenizer_dir: Path) -> None:
    """`final/`: the model in HF format with its tokenizer; for PEFT also `adapter/`, then merged."""
    if hasattr(model, "merge_and_unload"):  # PEFT: the adapter alone, then a merged model for serving
        with atomic_directory(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        model = model.merge_and_unload()
    with atomic_directory(out_dir / "final") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(tokenizer_dir, tmp)


def _pad_id(tokenizer_dir: Path) -> int:
    from distill.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    from distill.tokenizer import load_tokenizer

    load_tokenizer(tokenizer_dir).save_pretrained(dest)
