"""Typed, strict recipes: YAML -> nested config classes, with dotted-key overrides.

Every field is documented once, in its `Field(description=...)`; `distill config fields` prints them.
Unknown keys, wrong types and out-of-range values fail with the file and the dotted path of the field.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import DistillError

# Training fields that never change the weights (a resume, the cache key and the inputs hash ignore them);
# fused_loss changes only the order of floating-point sums (tested equal to the unfused loss)
BOOKKEEPING = frozenset(
    {"eval_every", "eval_batches", "save_every", "keep_last", "log_every", "output", "fused_loss"}
)


class Section(BaseModel):
    # strict: no silent coercion ("0.001" is not a number, true is not an integer); ints still pass as floats.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class TinyModelConfig(Section):
    """A Llama-architecture model built from a config (the CPU stand-in for Llama 3 sizes)."""

    hidden_size: int = Field(256, gt=0, description="Model width.")
    num_layers: int = Field(4, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (hidden_size / num_heads is the head dim).")
    num_kv_heads: int = Field(4, gt=0, description="Key/value heads (grouped-query attention when fewer).")
    intermediate_size: int = Field(768, gt=0, description="MLP width.")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(False, description="Share input and output embeddings.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        return self


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )


class TeacherConfig(Section):
    model: str | None = Field(
        None,
        description="The teacher: a Hugging Face model directory (e.g. /models/Meta-Llama-3-8B-Instruct), "
        "or a .gguf file (or pkg:<package>/<file>.gguf) that distill converts once into a cached one.",
    )
    tiny: TinyModelConfig | None = Field(
        None, description="Build and pretrain a tiny teacher on the corpus instead (distill pretrain)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on GPUs, float32 on CPUs."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="Engine that captures the teacher store: vllm, hf (transformers), or auto: vLLM on GPUs "
        "and for sampling; for scoring on CPUs, whichever is expected to finish first for the teacher's size "
        "and the job's (vLLM's start-up is paid back only on large jobs of large teachers).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.model is None) == (self.tiny is None):
            raise ValueError(
                "set exactly one of teacher.model (a model directory) or teacher.tiny (pretrain one)"
            )
        return self


class CutConfig(Section):
    """The student as a part of the teacher: a subset of its decoder layers (depth pruning) and/or of
    the channels and heads inside them (width pruning), with the teacher's embeddings, final norm and head
    cut to match."""

    num_layers: int | None = Field(None, gt=0, description="Keep this many layers, chosen as `select` says.")
    layers: list[int] | None = Field(
        None, description="Keep exactly these layers (0-based, increasing) instead of num_layers."
    )
    select: Literal["even", "importance", "kl"] = Field(
        "even",
        description="How num_layers are chosen: `even`, evenly spaced from the first layer to the last; "
        "`importance`, the teacher's first and last layers kept and the contiguous block between them whose "
        "input and output hidden states are closest in angle dropped; `kl`, the block whose removal moves the "
        "teacher's next-token distribution least (full-vocabulary KL, each candidate measured: slower) "
        "dropped. Both measured on calibration text (distill.pruning; the scores are kept in the student's distill-cut.json).",
    )
    calibration: int = Field(
        32,
        gt=0,
        description="Corpus train documents (up to data.seq_len tokens each) the teacher's layer and "
        "channel importance is measured on (select: importance or kl, and width targets).",
    )
    hidden_size: int | None = Field(
        None,
        gt=0,
        description="Width: keep this many residual (embedding) channels, those of largest mean |activation| "
        "at the teacher's norms; a multiple of the head dimension. Tied embeddings stay tied.",
    )
    intermediate_size: int | None = Field(
        None,
        gt=0,
        description="Width: keep this many MLP channels per layer, those of largest mean |activation|.",
    )
    num_heads: int | None = Field(
        None,
        gt=0,
        description="Width: keep this many attention (query) heads per layer, the same number in every kept "
        "KV group (those of largest mean output norm); a multiple of num_kv_heads.",
    )
    num_kv_heads: int | None = Field(
        None,
        gt=0,
        description="Width: keep this many KV groups per layer, whole, with their query heads (the groups "
        "whose heads' outputs are largest). Default: the teacher's.",
    )

    @field_validator("layers")
    @classmethod
    def _increasing(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (
            not layers or min(layers) < 0 or any(b <= a for a, b in zip(layers, layers[1:], strict=False))
        ):
            raise ValueError(f"{layers} is not a list of increasing layer indices >= 0")
        return layers

    @model_validator(mode="after")
    def _one_choice(self) -> CutConfig:
        if self.num_layers is not None and self.layers is not None:
            raise ValueError("set one of num_layers (chosen by `select`) or layers (a list), not both")
        if self.num_layers is None and self.layers is None and not self.width:
            raise ValueError(
                "set num_layers or layers (depth) and/or hidden_size, intermediate_size, num_heads, "
                "num_kv_heads (width)"
            )
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}: every "
                "KV group keeps the same number of query heads"
            )
        if self.layers is not None and self.select != "even":
            raise ValueError(
                f"select: {self.select} chooses num_layers layers; a layers list is chosen already"
            )
        if self.num_layers is None and self.select != "even":
            raise ValueError(f"select: {self.select} chooses num_layers layers; set num_layers")
        return self

    @property
    def width(self) -> dict[str, int]:
        """The width targets that are set (config.json key: value)."""
        keys = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}  # fmt: skip
        return {key: getattr(self, name) for name, key in keys.items() if getattr(self, name) is not None}


class StudentConfig(Section):
    model: str | None = Field(
        None,
        description="Model to start the student from: a Hugging Face model directory, or a .gguf file "
        "(or pkg:<package>/<file>.gguf) that distill converts once.",
    )
    tiny: TinyModelConfig | None = Field(None, description="Build the student from this config instead.")
    cut: CutConfig | None = Field(
        None, description="Start from a subset of teacher.model's layers instead (needs teacher.model)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype; auto = bfloat16 on GPUs, float32 on CPUs."
    )
    tokenizer: str | None = Field(
        None,
        description="The student's own tokenizer when it is not the teacher's: a tokenizer (or model) "
        "directory, or `corpus` for a byte-level BPE trained on the corpus at student.vocab_size. Needs "
        "train.cross_tokenizer. Default: student.model's tokenizer, else the run's.",
    )
    vocab_size: int | None = Field(
        None, ge=256, description="Vocabulary of student.tokenizer=corpus (default: data.vocab_size)."
    )
    lora: LoraConfig | None = Field(None, description="Train PEFT LoRA adapters instead of all weights.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        given = [name for name in ("model", "tiny", "cut") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of student.model (a model directory or .gguf file), student.tiny or "
                f"student.cut (got {' and '.join(given) or 'none'})"
            )
        return self

    @model_validator(mode="after")
    def _own_tokenizer(self) -> StudentConfig:
        if self.tokenizer is not None and self.cut is not None:
            raise ValueError("tokenizer: a student cut from its teacher keeps the teacher's tokenizer")
        if self.vocab_size is not None and self.tokenizer != "corpus":
            raise ValueError("vocab_size: only for tokenizer: corpus (a tokenizer trained on the corpus)")
        return self


class DataConfig(Section):
    source: str = Field(
        "embedded",
        description="'embedded' (the corpus built from Python's own docs) or a directory of "
        "train/validation/test/prompts .jsonl files with a 'text' field.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory; default: the teacher's, or one trained on the corpus."
    )
    vocab_size: int = Field(4096, ge=256, description="Vocabulary of the tokenizer trained on the corpus.")
    validation_percent: int = Field(5, ge=1, le=40, description="Share of documents held out for validation.")
    test_percent: int = Field(5, ge=1, le=40, description="Share of documents held out for testing.")
    num_prompts: int = Field(512, gt=0, description="Prompts drawn from the train split for generation.")
    prompt_chars: int = Field(160, gt=0, description="Approximate length of a prompt in characters.")
    seq_len: int = Field(256, gt=1, description="Training sequence length in tokens.")
    prompts: str | None = Field(
        None,
        description="Instruction prompts for generation: a .jsonl or .parquet file, a dataset directory or "
        "a Hugging Face dataset name (loaded with `datasets`), with a 'messages' column (OpenAI chat "
        "format) or a 'prompt' column and an optional 'response'; or 'instructions', a deterministic set "
        "built from the corpus. Default: raw-text prompts cut from the corpus, continued as text.",
    )
    prompts_split: str = Field("train", description="Split of a data.prompts dataset to read.")
    chat: bool = Field(
        True,
        description="Format data.prompts with the tokenizer's chat template (false: a 'prompt' is plain "
        "text the teacher continues).",
    )
    heldout_prompts: int = Field(
        32,
        ge=0,
        description="data.prompts rows held out of generation: the teacher's responses to them measure the "
        "students' KL and top-1 agreement on instructions.",
    )


class GenerateConfig(Section):
    mode: Literal["sample", "score"] = Field(
        "sample",
        description="sample: the teacher completes the prompt set; score: top-k at every position of the "
        "corpus train blocks (data.seq_len tokens each).",
    )
    top_k: int = Field(32, gt=0, le=1024, description="Teacher logprobs kept per position (k).")
    samples_per_prompt: int = Field(1, gt=0, description="Completions per prompt (sample mode).")
    max_new_tokens: int = Field(128, gt=0, description="Completion length cap (sample mode).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Base seed; each prompt gets its own seed derived from it.")
    num_sequences: int | None = Field(
        None, gt=0, description="Cap on prompts (sample) or corpus blocks (score) to capture; default all."
    )
    items_per_shard: int = Field(
        256,
        gt=0,
        description="Prompts (sample) or sequences (score) per shard; a shard is one fixed engine batch, "
        "the unit of resume and of --shard I/N.",
    )
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass of the hf backend.")
    validation_sequences: int = Field(
        64,
        gt=0,
        description="Held-out corpus blocks the teacher scores for the student's validation KL "
        "(`distill generate --split validation`).",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments passed through (tensor_parallel_size, max_model_len, ...).",
    )

    @field_validator("engine")
    @classmethod
    def _logprobs_room_for_top_k(cls, engine, info):
        # here, before any teacher is pretrained or loaded (teacher_engine_args checks it again)
        problem = logprobs_problem(info.data.get("top_k"), engine)
        if problem:
            raise ValueError(problem.removeprefix("generate.engine: "))
        return engine


def logprobs_problem(top_k: int | None, engine: dict[str, Any]) -> str | None:
    """Why generate.engine's max_logprobs leaves no room for generate.top_k logprobs, or None."""
    limit = engine.get("max_logprobs")
    if isinstance(limit, int) and isinstance(top_k, int) and limit < top_k:
        return (
            f"generate.engine: max_logprobs={limit} is below generate.top_k={top_k}; "
            f"raise max_logprobs to at least {top_k} or leave it unset"
        )
    return None


class DistributedConfig(Section):
    backend: Literal["none", "ddp", "deepspeed"] = Field("none", description="How training is distributed.")
    num_processes: int = Field(1, gt=0, description="Processes per node (one per GPU).")
    num_machines: int = Field(1, gt=0, description="Nodes.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (backend deepspeed).")
    config_file: str | None = Field(
        None,
        description="Accelerate config for the launch (default: recipes/accelerate/{ddp,zero2,zero3}.yaml).",
    )

    @model_validator(mode="after")
    def _processes_need_a_backend(self):
        if self.backend == "none" and self.num_processes * self.num_machines > 1:
            raise ValueError(
                "num_processes/num_machines: more than one process needs backend ddp or deepspeed"
            )
        return self


class OnPolicyConfig(Section):
    lmbda: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of micro-batches the student samples (GKD's lambda); the rest come from the teacher store.",
    )
    objective: Literal["divergence", "sampled_reverse_kl"] = Field(
        "divergence",
        description="divergence: train.loss over the teacher's top-k on the student's samples; "
        "sampled_reverse_kl: per-token advantage (teacher minus student logprob of the sampled token).",
    )
    sampler: Literal["hf", "vllm"] = Field(
        "hf", description="Who samples the student's completions: transformers generate, or a vLLM engine."
    )
    refresh_every: int = Field(
        1, gt=0, description="vLLM sampler: reload the student's weights every N steps."
    )
    sampler_gpu_memory: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="vLLM sampler on GPUs: the share of GPU memory its engine may take beside the trainer.",
    )
    prompt_tokens: int = Field(
        32, gt=0, description="Prompt length (the last tokens of each prompt are kept)."
    )
    max_new_tokens: int = Field(32, gt=0, description="Completion length the student samples.")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Student sampling nucleus threshold.")
    eval_prompts: int = Field(
        32, gt=0, description="Held-out prompts (validation blocks) for val_acceptance at each evaluation."
    )
    teacher_url: str | None = Field(
        None,
        description="A running teacher server (vllm serve) to score with; default: start one for the run.",
    )
    retries: int = Field(3, gt=0, description="Tries per teacher request before training stops.")


class HiddenConfig(Section):
    """Hidden-state distillation: the student's layer outputs pulled towards the teacher's, beside the
    logit loss. Needs the teacher model in the training processes (loaded there, frozen)."""

    pairs: list[list[int]] = Field(
        description="[student layer, teacher layer] pairs (0-based): the output of the student's layer is "
        "matched to the output of the teacher's.",
        min_length=1,
    )
    loss: Literal["cosine", "mse"] = Field(
        "cosine",
        description="cosine: 1 - cosine similarity per position; mse: mean squared difference per channel.",
    )
    weight: float = Field(1.0, gt=0, description="Weight of the hidden-state loss beside the logit loss.")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs: list[list[int]]) -> list[list[int]]:
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"{pairs}: each pair is [student layer, teacher layer]")
        if any(i < 0 for p in pairs for i in p):
            raise ValueError(f"{pairs}: layer indices are 0-based, so >= 0")
        return pairs


class CrossTokenizerConfig(Section):
    """Distillation between a teacher and a student with different tokenizers (docs/cross-tokenizer.md):
    the student re-tokenizes the teacher's text, and the two are compared on byte-aligned spans."""

    method: Literal["byte", "uld"] = Field(
        "byte",
        description="byte: on spans where each side has one token, train.loss's divergence over the tokens "
        "both vocabularies share (one bin for the rest) plus ULD on what lies outside them; on merged spans, "
        "the probability of the span's bytes by the chain rule plus ULD. uld: Universal Logit Distillation "
        "(sorted distributions, no shared vocabulary needed) at the first position of every span.",
    )
    uld_weight: float = Field(1.0, ge=0, description="Weight of the ULD terms of method byte.")


class TrainConfig(Section):
    loss: Literal["ce", "forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"] = (
        Field("forward_kl", description="Training objective; ce is the SFT baseline on the same sequences.")
    )
    mode: Literal["offline", "on_policy"] = Field(
        "offline", description="offline: learn from the teacher store; on_policy: from the student's samples."
    )
    beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD interpolation (jsd).")
    alpha: float = Field(0.1, ge=0, le=1, description="Skew KL mixing weight (skew_*).")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature applied to both sides.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label CE mixed into the KD loss.")
    tail: Literal["auto", "sample", "bucket", "renormalize"] = Field(
        "auto",
        description="What stands for the teacher's tail outside its stored top-k: sample (the top-k exactly "
        "plus the teacher's own sampled next token for the rest: an unbiased estimate of the "
        "full-vocabulary forward KL; needs loss forward_kl, temperature 1 and a sample-mode store made at "
        "generate.temperature 1, top_p 1), bucket (one outcome holding the tail's mass), renormalize (the "
        "top-k alone), or auto: sample where those hold and ce_weight is 0, else bucket (with CE mixed in, "
        "bucket + CE measured better).",
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    max_steps: int = Field(200, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms and biases).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    output: str = Field(
        "student",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Subdirectory of the run the student is trained into (the SFT baseline of `distill run` "
        "goes to 'baseline'); eval, quantize, serve and promote use 'student'.",
    )
    eval_every: int = Field(50, gt=0, description="Validation loss every N steps (and at the end).")
    eval_batches: int = Field(8, gt=0, description="Validation micro-batches per evaluation.")
    save_every: int = Field(50, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    log_every: int = Field(10, gt=0, description="Metrics log interval in steps.")
    hidden: HiddenConfig | None = Field(
        None,
        description="Also distil hidden states (layer pairs, with a learned linear projection where the "
        "widths differ, dropped from the exported student); offline training only.",
    )
    cross_tokenizer: CrossTokenizerConfig | None = Field(
        None,
        description="Train across tokenizers when the student's differs from the store's teacher's "
        "(offline, temperature 1); with identical tokenizers the same-tokenizer loss runs unchanged.",
    )
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The fused output layer + loss: the logits computed from the last hidden states a chunk "
        "of positions at a time and recomputed in backward, so the (B, T, V) logits never exist. auto: "
        "wherever it is exact (checked on the student before training; not across tokenizers, nor on "
        "on-policy samples, whose losses read the full logits); on: required; off: the full logits.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Distribution.")
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="On-policy distillation (train.mode=on_policy)."
    )

    @model_validator(mode="after")
    def _sampled_tail_is_forward_kl_at_temperature_1(self):
        if self.tail != "sample" or self.loss == "ce":
            return self
        if self.loss != "forward_kl" or self.temperature != 1.0:
            raise ValueError(
                f"tail: sample estimates forward_kl at temperature 1 (got loss {self.loss}, temperature "
                f"{self.temperature}); use tail: bucket for other objectives"
            )
        if self.mode == "on_policy":
            raise ValueError(
                "tail: sample needs the teacher's own samples; on-policy sequences are the student's "
                "(use tail: bucket)"
            )
        return self

    @model_validator(mode="after")
    def _hidden_states_offline(self):
        if self.hidden is not None and self.mode == "on_policy":
            raise ValueError(
                "hidden: the hidden-state loss trains on the teacher store's sequences (mode: offline); "
                "on-policy sequences are scored by a teacher server, which returns no hidden states"
            )
        return self

    @model_validator(mode="after")
    def _cross_tokenizer_offline(self):
        if self.cross_tokenizer is None:
            return self
        if self.mode == "on_policy" or self.hidden is not None or self.temperature != 1.0:
            raise ValueError(
                "cross_tokenizer: trains offline on the teacher store's text at temperature 1, without "
                f"train.hidden (got mode {self.mode}, temperature {self.temperature}, hidden "
                f"{'set' if self.hidden is not None else 'null'})"
            )
        return self

    @model_validator(mode="after")
    def _fused_on_needs_store_logits(self):
        if self.fused_loss == "on" and (self.mode == "on_policy" or self.cross_tokenizer is not None):
            raise ValueError(
                "fused_loss: on needs offline training on one tokenizer (on-policy samples and "
                "cross-tokenizer spans read the full logits); use auto, which fuses wherever it can"
            )
        return self

    @model_validator(mode="after")
    def _sampling_needs_whole_weights(self):
        d = self.distributed
        if self.mode == "on_policy" and d.backend == "deepspeed" and d.zero_stage == 3:
            raise ValueError(
                "mode: on_policy samples with the student's whole weights in every process; ZeRO-3 "
                "partitions them: use distributed.backend=ddp or zero_stage=2"
            )
        return self


class PretrainConfig(TrainConfig):
    """Pretraining of the embedded tiny teacher: the same loop and fields, cross-entropy only."""

    loss: Literal["ce"] = Field("ce", description="Pretraining is next-token cross-entropy on the corpus.")
    mode: Literal["offline"] = Field("offline", description="Pretraining reads the corpus (offline).")
    # NOTE: these settings key the cached teacher (pretrain.teacher_key): a KD-only field added to
    # TrainConfig gets a fixed value here, so that it never re-pretrains a teacher it cannot affect.
    tail: Literal["bucket"] = Field(
        "bucket", description="Unused by pretraining (cross-entropy has no tail)."
    )
    hidden: None = Field(None, exclude=True, description="Unused by pretraining.")
    cross_tokenizer: None = Field(None, exclude=True, description="Unused by pretraining.")


class GateCriterion(Section):
    task: str = Field(description="lm-eval task name.")
    metric: str = Field(
        description="Metric name as lm-eval reports it (acc, acc_norm, exact_match, bits_per_byte, ...)."
    )
    min_retention: float | None = Field(
        None, gt=0, description="student >= min_retention x teacher (perplexities: student <= teacher / r)."
    )
    max_drop: float | None = Field(
        None, ge=0, description="student >= teacher - max_drop (in the metric's units)."
    )
    min_value: float | None = Field(
        None, description="Absolute bound: student >= min_value (a ceiling for lower-is-better metrics)."
    )
    lower_is_better: bool | None = Field(
        None, description="Override the metric's direction; default: lm-eval's higher_is_better."
    )

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [r for r in ("min_retention", "max_drop", "min_value") if getattr(self, r) is not None]
        if len(rules) != 1:
            raise ValueError(
                f"set exactly one of min_retention, max_drop, min_value (got {', '.join(rules) or 'none'})"
            )
        return self


class GateConfig(Section):
    criteria: list[GateCriterion] = Field(default_factory=list, description="Student vs teacher criteria.")
    quant_min_retention: float = Field(
        0.99, gt=0, le=1, description="Quantized student's minimum retention of the unquantized student."
    )
    min_acceptance_rate: float | None = Field(
        None, ge=0, le=1, description="Minimum speculative-decoding acceptance rate as the teacher's draft."
    )
    noise: Literal["paired", "stderr", "none"] = Field(
        "paired",
        description="Standard error of each check: paired per-document differences, lm-eval's stderr "
        "of each score as independent, or none (point estimates).",
    )
    z: float = Field(
        1.0, ge=0, description="A shortfall within z standard errors passes (cannot be told from noise)."
    )


class EvalConfig(Section):
    backend: Literal["vllm", "hf", "local-completions"] = Field("vllm", description="lm-eval model backend.")
    tasks: list[str] = Field(
        default_factory=lambda: ["distill_ppl", "distill_outside_ppl", "distill_cloze", "distill_nextword"],
        description="lm-eval task names (the distill_* ones are local, in eval/tasks).",
    )
    batch_size: int = Field(8, gt=0, description="Evaluation batch size (identical for every model).")
    teacher_match: list[Literal["test", "outside", "instructions"]] = Field(
        default_factory=lambda: ["test", "outside"],
        description="Held-out text on which each model's full-vocabulary KL to the teacher and top-1 "
        "agreement are measured (transformers, both models in memory), as tasks distill_match_<source> "
        "(metrics kl, top1_agreement) the gate can name: test (the corpus's test split), outside "
        "(text that ships with Python but is not in the corpus), instructions (the teacher's answers to "
        "the held-out data.prompts, measured on the answer tokens); [] for none.",
    )
    teacher_match_documents: int = Field(
        256, gt=0, description="Documents per teacher_match source (the first N, in a fixed order)."
    )
    teacher_match_tokens: int = Field(256, gt=1, description="Tokens per document in teacher_match.")
    byte_agreement: bool | None = Field(
        None,
        description="Also measure, per teacher_match source, the share of the teacher's text bytes each model "
        "predicts (teacher-forced, in its own tokens; test and outside: the teacher's greedy continuation "
        "of each document's first teacher_match_tokens/2 tokens, instructions: its answers), as tasks "
        "distill_bytes_<source> (metric byte_agreement): top-1 agreement in tokenizer-independent units. "
        "Default: on when a model's tokenizer is not the teacher's or a gate criterion names it.",
    )
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples.")
    initial: bool = Field(
        False,
        description="Also evaluate the student before training (the cut, student.model, or student.tiny "
        "at train.seed) as model 'initial': shown for comparison, not gated.",
    )
    limit: int | None = Field(None, gt=0, description="Cap on examples per task.")
    seed: int = Field(1234, description="lm-eval seed.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype for every model (auto: bf16 on GPUs, fp32 on CPUs)."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Context length (vllm, local-completions); default: the model's."
    )
    bootstrap_iters: int = Field(1000, ge=0, description="lm-eval bootstrap resamples for stderr.")
    trust_remote_code: bool = Field(False, description="Passed to the model loaders.")
    servers: dict[str, str] = Field(
        default_factory=dict,
        description="local-completions: base URL of a running OpenAI-compatible server per model name "
        "(teacher, student, ...); models without one get a `vllm serve` started for them.",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="The quality gate.")


class QuantizeConfig(Section):
    schemes: list[Literal["w8a8", "w4a16", "fp8"]] = Field(
        default_factory=lambda: ["w8a8"], description="llm-compressor schemes to produce."
    )
    calibration_samples: int = Field(64, gt=0, description="Calibration sequences.")
    calibration_seq_len: int = Field(256, gt=0, description="Calibration sequence length.")
    lm_head: list[Literal["w8a8"]] = Field(
        default_factory=list,
        description="Schemes that quantize the output layer (lm_head) too (w8a8: tested with transformers "
        "and vLLM); elsewhere it stays in full precision. A tied input embedding is untied and keeps full "
        "precision.",
    )

    @model_validator(mode="after")
    def _lm_head_names_a_scheme_made(self):
        missing = [s for s in self.lm_head if s not in self.schemes]
        if missing:
            raise ValueError(f"lm_head names {', '.join(missing)}, which quantize.schemes does not make")
        return self


class ServeBenchConfig(Section):
    concurrency: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [1, 4, 16], min_length=1, description="Concurrent requests, one level each."
    )
    requests: int = Field(64, gt=0, description="Requests per concurrency level.")
    prompt_tokens: int = Field(32, gt=0, description="Prompt length: openings of held-out (test) blocks.")
    max_tokens: int = Field(64, gt=0, description="Tokens generated per request (EOS ignored).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the requests (0: greedy).")
    baseline: str | None = Field(
        None,
        description="The undistilled draft: a model directory or a run directory (its student, e.g. the "
        "SFT baseline's run); default: the initial student (student.model, or student.tiny at train.seed).",
    )
    setups: list[str] | None = Field(
        None,
        description="Which setups to bench: teacher, teacher+student, teacher+baseline, student, "
        "student-<scheme>; default: every one this run has.",
    )
    servers: dict[str, str] = Field(
        default_factory=dict,
        description="Setups benched on a server that is already running (setup name: its URL) instead of "
        "one started here, e.g. `teacher+student: http://host:8000`; it must serve the setup's model, and a "
        "draft setup's server must draft.",
    )


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address the vLLM server binds.")
    port: int = Field(8000, gt=0, lt=65536, description="Port the vLLM server binds.")
    num_speculative_tokens: int = Field(4, gt=0, description="Draft tokens per step (speculative decoding).")
    api_key_env: str = Field("DISTILL_API_KEY", description="Environment variable holding the API key.")
    max_model_len: int | None = Field(None, gt=0, description="Context length the server allows.")
    engine: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM server arguments.")
    bench: ServeBenchConfig = Field(
        default_factory=ServeBenchConfig, description="`distill bench serve` workload."
    )


class PipelineConfig(Section):
    sft_baseline: bool = Field(
        False,
        description="Also train the SFT baseline (train.loss=ce on the same sequences) into <run>/baseline; "
        "it is evaluated next to the KD student and is the undistilled draft of the serving benchmark.",
    )
    quantize: bool = Field(True, description="Run the quantize stage (quantize.schemes).")
    bench: bool = Field(True, description="Run the serving benchmark (serve.bench).")
    promote: bool = Field(True, description="Promote the student when the gate passes.")


class TrackingConfig(Section):
    wandb: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode; offline writes a local run you can `wandb sync` later."
    )
    project: str = Field("distill", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity (team or user).")


class RecipeConfig(Section):
    name: str = Field(description="Run name; the run directory is <runs_dir>/<name>.")
    runs_dir: str = Field("runs", description="Parent directory of run directories.")
    registry_dir: str | None = Field(
        None,
        description="Registry of promoted students (`distill promote`); default $DISTILL_REGISTRY or "
        "./registry.",
    )
    cache_dir: str | None = Field(
        None,
        description="Shared cache of corpora, tokenizers and pretrained tiny teachers, keyed by content "
        "hash; default $DISTILL_CACHE_DIR or ~/.cache/distill.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available.")
    teacher: TeacherConfig = Field(description="The teacher model.")
    student: StudentConfig = Field(description="The student model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus, tokenizer and prompts.")
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="Pretraining of a tiny teacher (CE)."
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Teacher generation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and the gate.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Quantization.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking.")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, description="Which optional stages `distill run` chains."
    )

    @field_validator("name")
    @classmethod
    def _one_directory(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name in (".", ".."):
            raise ValueError(
                f"{name!r} is not a run name: the run directory is <runs_dir>/<name>, so it is one "
                "directory name of letters, digits, '_', '-' and '.' (no '/', not empty, not '..')"
            )
        return name

    @model_validator(mode="after")
    def _sequences_fit(self) -> RecipeConfig:
        for role, tiny in (("teacher", self.teacher.tiny), ("student", self.student.tiny)):
            if tiny is not None and self.data.seq_len > tiny.max_position_embeddings:
                raise ValueError(
                    f"data.seq_len {self.data.seq_len} exceeds {role}.tiny.max_position_embeddings "
                    f"{tiny.max_position_embeddings}"
                )
        return self

    @model_validator(mode="after")
    def _instructions_need_heldout_prompts(self) -> RecipeConfig:
        if "instructions" in self.eval.teacher_match and (
            self.data.prompts is None or not self.data.heldout_prompts
        ):
            raise ValueError(
                "eval.teacher_match: instructions measures the teacher's answers to held-out prompts; set "
                "data.prompts and data.heldout_prompts > 0"
            )
        return self

    @model_validator(mode="after")
    def _cut_needs_a_teacher_model(self) -> RecipeConfig:
        if self.student.cut is not None and self.teacher.model is None:
            raise ValueError(
                "student.cut takes its layers from teacher.model; set teacher.model (a model directory or "
                ".gguf file)"
            )
        return self

    @model_validator(mode="after")
    def _vllm_sampler_reloads_whole_models(self) -> RecipeConfig:
        on_policy = self.train.mode == "on_policy" and self.train.on_policy.sampler == "vllm"
        if on_policy and self.student.lora is not None:
            raise ValueError(
                "train.on_policy.sampler=vllm reloads whole model weights into its engine, not LoRA "
                "adapters; with student.lora use train.on_policy.sampler=hf"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("DISTILL_CACHE_DIR", "~/.cache/distill")).expanduser()

    @property
    def registry_path(self) -> Path:
        return registry_path(self.registry_dir)


def registry_path(explicit: str | None = None) -> Path:
    """The registry of promoted students: `explicit`, else $DISTILL_REGISTRY, else ./registry."""
    return Path(explicit or os.environ.get("DISTILL_REGISTRY") or "registry").expanduser()


# --------------------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """YAML as users write recipes: `1e-4` is a number (YAML 1.1 wants `1.0e-4`), duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} at line {context_mark.line + 1})"
        raise DistillError(f"{place}: malformed YAML: {problem}") from exc


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Load a YAML recipe, apply `a.b.c=value` overrides, and validate it strictly."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe not found: {path}")
    raw = parse_yaml(path.read_text(), str(path))
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    return validate_recipe(raw, source=str(path), overrides=overrides)


def validate_recipe(
    raw: dict[str, Any], source: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()
) -> RecipeConfig:
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_with_origin(describe_error(err), err, overrides) for err in exc.errors())
        raise DistillError(f"{source}: {problems}") from exc


def _with_origin(text: str, err: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> str:
    """Name the command-line override an error came from, so nobody hunts for it in the file."""
    dotted = ".".join(str(p) for p in err["loc"])
    for item in reversed(overrides):  # the last override of a key is the one that took effect
        key = item.partition("=")[0]
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"{text} (from override {item})"
    return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted `key=value` overrides applied (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DistillError(f"override {item!r}: expected dotted.key=value")
        value = parse_yaml(text, f"override {item!r}") if text else None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or null (student.lora=null student.lora.r=8)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise DistillError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def recipe_to_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- error text


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def describe_error(err: dict[str, Any]) -> str:
    """One pydantic error as `dotted.path: what was expected, got what`."""
    loc = [str(part) for part in err["loc"] if not str(part).startswith("function-after")]
    dotted = ".".join(loc) or "(top level)"
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        hint = _closest_key(loc)
        return f"{dotted}: unknown key" + (f" (did you mean '{hint}'?)" if hint else "")
    if kind == "missing":
        return f"{dotted}: required field is missing"
    prefix = kind.split("_")[0]
    if (kind.endswith(("_type", "_parsing")) or kind == "int_from_float") and prefix in _TYPE_WORDS:
        return f"{dotted}: expected {_TYPE_WORDS[prefix]}, got {got!r}"
    if kind == "literal_error":
        return f"{dotted}: expected {err['ctx']['expected']}, got {got!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{dotted}: {err['msg'].replace('Input should be', 'must be')}, got {got!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {msg}"


def _closest_key(loc: list[str]) -> str | None:
    model: Any = RecipeConfig
    for part in loc[:-1]:
        if part.isdigit():  # an index into a list of sections
            continue
        field = _section_fields(model).get(part)
        if field is None:
            return None
        model = _section_type(field.annotation)
        if model is None:
            return None
    matches = difflib.get_close_matches(loc[-1], list(_section_fields(model)), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _section_fields(model: Any) -> dict[str, Any]:
    return model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config class inside `X`, `X | None` or `list[X]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def field_docs(model: type[BaseModel] = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted path, default, description) for every field, for `distill config fields`."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _section_type(field.annotation)
        if nested is not None and typing.get_origin(field.annotation) is not list:
            rows.append((path, "", field.description or ""))
            rows.extend(field_docs(nested, f"{path}."))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((path, default, field.description or ""))
    return rows
