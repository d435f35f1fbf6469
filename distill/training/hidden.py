"""Hidden-state distillation (train.hidden): the outputs of chosen student layers pulled towards the
outputs of chosen teacher layers, beside the logit loss.

- The teacher runs in every training process (frozen, loaded outside DeepSpeed's ZeRO-3 partitioning,
  fp32 on CPUs and the recipe's dtype on GPUs) on the same micro-batch as the student: stores hold top-k
  logprobs, not hidden states. Storing them instead would cost hidden_size x 2 bytes per token per
  layer (8 KiB per layer for Llama 3 8B in bf16, 1.1 KiB for SmolLM2-135M), against about 70 bytes per
  token for the whole top-k store (bench/results/real_teacher.json): 16 times the store for SmolLM2 with
  a single layer, over 100 times for Llama 3 8B, so distill computes them and stores none.
- Where the widths differ, a learned linear map (student width to teacher width, no bias) carries the
  student's states into the teacher's space. It is trained with the student (the same optimizer, the same
  DDP / ZeRO sharding: `Projected` wraps both in one module) and dropped from the exported student. A
  width-pruned student's map starts as the selection of the residual channels it kept
  (distill-cut.json), so the loss starts from the teacher's own channels; otherwise, at random.
- Losses per position, on the positions the logit loss trains: cosine (1 - cosine similarity: the
  residual stream's scale grows with depth, so it is the default) or mse (mean squared difference per
  channel); averaged over the pairs, weighted by train.hidden.weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import DistillError

STUDENT_KEY = "model."  # the student's parameters inside Projected's state dict


@dataclass
class HiddenSetup:
    """What the loop needs for train.hidden: the teacher to load, its width, and the kept channels a
    width-pruned student's projection starts from."""

    teacher: Path
    teacher_width: int
    init_channels: list[int] | None = None


def _config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def setup(cfg, teacher: Path | None, student_model: str | None) -> HiddenSetup | None:
    """The HiddenSetup of a run (None without train.hidden); refuses a run whose teacher is only a store."""
    if cfg.hidden is None:
        return None
    if teacher is None:
        raise DistillError(
            "train.hidden: the hidden-state loss needs the teacher's hidden states, from the teacher model "
            "loaded beside the student; this run's teacher is only its store (top-k logprobs, no hidden "
            "states): set teacher.model, or pretrain the embedded teacher first (distill pretrain)"
        )
    init = None
    if student_model and (Path(student_model) / "distill-cut.json").is_file():
        made = json.loads((Path(student_model) / "distill-cut.json").read_text())
        init = ((made.get("chosen") or {}).get("kept") or {}).get("hidden")
    return HiddenSetup(Path(teacher), _config(teacher)["hidden_size"], init)


def projected(model, cfg, hidden: HiddenSetup) -> Projected:
    """The student with one projection per pair (an identity where the widths agree), as one module."""
    width = (
        model.config.hidden_size if hasattr(model, "config") else model.get_base_model().config.hidden_size
    )
    maps = []
    for _ in cfg.pairs:
        if width == hidden.teacher_width:
            maps.append(torch.nn.Identity())
            continue
        linear = torch.nn.Linear(width, hidden.teacher_width, bias=False)
        if hidden.init_channels is not None and len(hidden.init_channels) == width:
            with torch.no_grad():  # student channel c is the teacher's channel init_channels[c]
                linear.weight.zero_()
                linear.weight[hidden.init_channels, range(width)] = 1.0
        maps.append(linear)
    return Projected(model, torch.nn.ModuleList(maps), [s for s, _ in cfg.pairs])


class Projected(torch.nn.Module):
    """The student and the projections of train.hidden, trained (and checkpointed, and sharded) as one
    module. Called as the student is, it is the student; with `hidden=True` it also returns the projected
    outputs of the paired student layers."""

    def __init__(self, model, projections, layers: list[int]):
        super().__init__()
        self.model, self.projections, self.layers = model, projections, layers

    def forward(self, input_ids, attention_mask=None, hidden: bool = False, **kwargs):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden, **kwargs
        )
        if not hidden:
            return out
        states = out.hidden_states  # entry i + 1 is layer i's output
        return out, [proj(states[s + 1]) for proj, s in zip(self.projections, self.layers, strict=True)]


def student_of(model):
    """The student inside a Projected module, or the model itself."""
    return model.model if isinstance(model, Projected) else model


def student_state_dict(state_dict: dict | None) -> dict | None:
    """A Projected module's state dict without its projections (a plain one as it is)."""
    if not state_dict or not any(
        k.startswith("projections.") for k in state_dict
    ):  # None off the main process
        return state_dict
    return {k[len(STUDENT_KEY) :]: v for k, v in state_dict.items() if k.startswith(STUDENT_KEY)}


class HiddenTeacher:
    """The frozen teacher, giving the outputs of the paired teacher layers."""

    def __init__(self, model, pairs: list[list[int]]):
        self.model, self.layers = model.eval().requires_grad_(False), [t for _, t in pairs]

    @classmethod
    def load(cls, hidden: HiddenSetup, pairs: list[list[int]], accelerator, dtype) -> HiddenTeacher:
        """The run's teacher on the training device."""
        from transformers import AutoModelForCausalLM

        from distill.training.launch import outside_zero3

        with outside_zero3():  # loaded inside a ZeRO-3 run, a model is partitioned and cannot run on its own
            model = AutoModelForCausalLM.from_pretrained(str(hidden.teacher), dtype=dtype)
        return cls(model.to(accelerator.device), pairs)

    def states(self, input_ids, attention_mask=None) -> list:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return [out.hidden_states[t + 1] for t in self.layers]


def hidden_loss(student: list, teacher: list, positions, kind: str):
    """Summed over `positions` (B, T) bool, averaged over the pairs: the loss to add (fp32)."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = s[positions].float(), t[positions].float()
        if kind == "cosine":
            per_position = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
        else:
            per_position = (s - t).pow(2).mean(-1)
        total = total + per_position.sum()
    return total / len(student)
