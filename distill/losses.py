"""Training objectives as pure functions of tensors.

Each returns `(summed_loss, num_tokens)`: the loop divides by the number of target tokens of the whole
accumulation window (across processes), so micro-batch size and accumulation never change the math.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def cross_entropy(student_logits, labels, chunk_tokens: int = 8192):
    """Next-token cross-entropy, summed.

    Args:
        student_logits: (B, T, V) logits; position t predicts labels[:, t + 1].
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken.
        chunk_tokens: tokens per chunk, so the fp32 upcast never holds all of (B*T, V) at once.
    Returns:
        (loss_sum, num_tokens): a scalar tensor and an int.
    """
    import torch
    import torch.nn.functional as F

    logits = student_logits[:, :-1].reshape(-1, student_logits.size(-1))  # (N, V)
    targets = labels[:, 1:].reshape(-1)  # (N,)
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    total = torch.zeros((), device=student_logits.device, dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        # NOTE: log-softmax in fp32 even when the model runs in bf16; bf16 sums over 128k classes lose bits.
        chunk = logits[start : start + chunk_tokens].float()
        total = total + F.cross_entropy(chunk, targets[start : start + chunk_tokens], reduction="sum")
    return total, int(targets.numel())
