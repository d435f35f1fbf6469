"""The student's output layer run outside its forward, for the fused output layer + loss (train.fused_loss).

The model runs as usual (through DDP or DeepSpeed, so their hooks see the forward), except that a forward
pre-hook on its output layer keeps the layer's input, the last hidden states, and hands the layer an empty
slice of them instead: the model returns (B, 0, V) logits and computes no others. The loss then calls the
layer on a chunk of rows at a time (distill.losses.fused_kd_loss), so the (B, T, V) logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError


@dataclass
class OutputLayer:
    """The student's output layer, and the hidden states its last call was handed (see the module)."""

    module: Any
    _armed: bool = False
    _hidden: Any = None
    _handle: Any = field(default=None, repr=False)

    def __post_init__(self):
        self._handle = self.module.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, _module, args):
        if not self._armed:  # the loss's own calls, chunk by chunk
            return None
        self._armed = False
        self._hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    def run(self, model, **inputs):
        """(model output with empty logits, the hidden states (B, T, H) the output layer would have read)."""
        self._armed, self._hidden = True, None
        try:
            out = model(**inputs)
        finally:
            self._armed = False
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise DistillError(
                "the student's forward never called its output layer (get_output_embeddings())"
            )
        return out, hidden

    def sharded_and_frozen(self) -> bool:
        """Whether DeepSpeed ZeRO-3 shards the layer's weight and it is frozen (LoRA): ZeRO-3 then does
        not gather it again when backward recomputes a chunk, so the fused loss cannot run."""
        weight = getattr(self.module, "weight", None)
        return hasattr(weight, "ds_id") and not weight.requires_grad

    def remove(self) -> None:
        self._handle.remove()


def fused_output_layer(student, mode: str, log=print) -> OutputLayer | None:
    """The student's OutputLayer when train.fused_loss allows it and it is exactly the unfused loss here.

    Checked once on the student itself, before training: its logits from its own forward must equal its
    output layer applied to the hidden states that layer receives. A model that changes the logits after
    the layer (final-logit soft-capping, logit scaling) fails the check: `auto` then trains on the plain
    logits, and `on` is refused."""
    import torch

    if mode == "off":
        return None
    module = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    why = "the student has no output layer (get_output_embeddings())" if module is None else None
    layer = None
    if module is not None:
        layer = OutputLayer(module)
        vocab = int(getattr(student.config, "vocab_size", 2))
        ids = torch.arange(1, 9, device=module.weight.device).remainder(vocab)[None]
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                want = student(input_ids=ids).logits
                out, hidden = layer.run(student, input_ids=ids)
                got = module(hidden)
            if out.logits.size(-2) != 0:
                why = "its forward computes logits from something other than the output layer's input"
            elif got.shape != want.shape or not torch.allclose(
                got.float(), want.float(), rtol=1e-4, atol=1e-4
            ):
                why = "its logits are not the output layer's output (soft-capping or scaling after it)"
        except DistillError as exc:
            why = str(exc)
        finally:
            student.train(was_training)
    if why is None:
        return layer
    if layer is not None:
        layer.remove()
    if mode == "on":
        raise DistillError(
            f"train.fused_loss: on, but the fused output layer + loss is not exact here: {why}"
        )
    log(f"fused output layer + loss off: {why}; training on the full logits")
    return None
