"""Training objectives as pure functions of tensors.

Each returns summed losses and a token count: the loop divides by the number of target tokens of the
whole accumulation window (across processes), so micro-batch size and accumulation never change the math.

Distillation compares, at every masked position, the teacher's distribution p with the student's q:
- forward_kl       KL(p || q)                                  (mode covering; the classic KD loss)
- reverse_kl       KL(q || p)                                  (mode seeking; MiniLLM)
- jsd              beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q
                   (generalized JSD of GKD; beta = 0 is forward KL and beta = 1 reverse KL, exactly,
                   as in TRL; in between, jsd / beta -> forward KL as beta -> 0 and
                   jsd / (1 - beta) -> reverse KL as beta -> 1)
- tvd              1/2 sum |p - q|
- skew_forward_kl  KL(p || alpha p + (1 - alpha) q)           (DistiLLM)
- skew_reverse_kl  KL(q || alpha q + (1 - alpha) p)

The teacher is either sparse (its stored top-k ids and raw logprobs, (B, T, K)) or dense (logits of a
teacher loaded in-process, (B, T, V)): one interface, `kd_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


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


# --------------------------------------------------------------------------- divergences on bins


def _kl(log_a, log_b):
    """KL(a || b) per row over the last dim; 0 log 0 = 0."""
    import torch

    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _log_mix(log_a, log_b, weight: float):
    """log(weight a + (1 - weight) b), stably."""
    import math

    import torch

    if weight <= 0:
        return log_b
    if weight >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log(1 - weight))


def divergence(log_p, log_q, name: str, beta: float = 0.5, alpha: float = 0.1):
    """Per-row divergence between teacher log-probs `log_p` and student log-probs `log_q`, (N, bins) -> (N,)."""
    match name:
        case "forward_kl":
            return _kl(log_p, log_q)
        case "reverse_kl":
            return _kl(log_q, log_p)
        case "jsd":
            if beta == 0:
                return _kl(log_p, log_q)
            if beta == 1:
                return _kl(log_q, log_p)
            log_m = _log_mix(log_p, log_q, beta)
            return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
        case "tvd":
            return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
        case "skew_forward_kl":
            return _kl(log_p, _log_mix(log_p, log_q, alpha))
        case "skew_reverse_kl":
            return _kl(log_q, _log_mix(log_q, log_p, alpha))
    raise ValueError(f"unknown divergence {name!r}; expected one of {DIVERGENCES}")


# --------------------------------------------------------------------------- teacher targets


@dataclass
class SparseTeacher:
    """Stored top-k: ids (B, T, K) and raw logprobs (B, T, K) (before temperature)."""

    topk_ids: object
    topk_logprobs: object


@dataclass
class DenseTeacher:
    """A teacher's full logits (B, T, V), e.g. from a teacher loaded in-process."""

    logits: object


def _log1mexp(log_s):
    """log(1 - exp(log_s)) for log_s <= 0, stably (Maechler's two branches)."""
    import math

    import torch

    log_s = log_s.clamp(max=-1e-7)
    return torch.where(log_s > -math.log(2), torch.log(-torch.expm1(log_s)), torch.log1p(-torch.exp(log_s)))


def _sparse_bins(student_logprobs, ids, teacher_logprobs, temperature: float, tail: str):
    """(n, V) student log-probs at temperature, (n, K) teacher top-k -> matching (n, bins) log-probs.

    NOTE: temperature on a sparse teacher: each stored raw logprob is divided by T and renormalised with
    the tail; the tail bucket is treated as one outcome of mass 1 - sum(top-k), so its tempered share is
    approximate for T != 1 (exact at T = 1, where the bucket gives the exact KL of the coarse-grained
    distributions).
    """
    import torch

    log_q = student_logprobs.gather(-1, ids)  # (n, K)
    log_p = teacher_logprobs / temperature
    if tail == "renormalize":
        return log_p.log_softmax(-1), log_q.log_softmax(-1)
    raw_tail_p = _log1mexp(torch.logsumexp(teacher_logprobs, -1).clamp(max=0))  # mass outside the top-k
    log_p = torch.cat([log_p, (raw_tail_p / temperature)[:, None]], -1).log_softmax(-1)  # (n, K + 1)
    log_q = torch.cat([log_q, _log1mexp(torch.logsumexp(log_q, -1))[:, None]], -1)
    return log_p, log_q


@dataclass
class LossParts:
    """One micro-batch: `total` = kd_weight x kd + ce_weight x ce (differentiable), the parts (detached, for
    logging) and the number of target tokens they sum over."""

    total: object
    kd: object
    ce: object
    tokens: int


def _chunk_losses(logits, labels, targets, cfg: dict):
    """Summed (kd, ce) of one chunk of rows: logits (n, V), labels (n,), teacher targets for the rows."""
    import torch

    temperature = cfg["temperature"]
    # NOTE: fp32 (or better) for every softmax and divergence, whatever dtype the model runs in.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    log_q = (logits / temperature).log_softmax(-1)
    if len(targets) == 2:
        log_p, log_q = _sparse_bins(log_q, targets[0], targets[1].to(log_q.dtype), temperature, cfg["tail"])
    else:
        log_p = (targets[0].to(log_q.dtype) / temperature).log_softmax(-1)
    div = divergence(log_p, log_q, cfg["name"], cfg["beta"], cfg["alpha"])
    return div.sum() * temperature**2, ce


class _ChunkedLoss:
    """Loss and its gradient computed together, chunk by chunk (an autograd Function built lazily so that
    importing this module does not import torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, logits, rows, labels, weights, cfg, *targets):
                    flat = logits.reshape(-1, logits.size(-1))  # a view: (B*T, V)
                    grad = torch.zeros_like(flat) if logits.requires_grad else None
                    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
                    kd_sum = torch.zeros((), dtype=acc, device=logits.device)
                    ce_sum = torch.zeros((), dtype=acc, device=logits.device)
                    for lo in range(0, rows.numel(), cfg["chunk_tokens"]):
                        idx = rows[lo : lo + cfg["chunk_tokens"]]
                        chunk = flat.index_select(0, idx).detach().requires_grad_(grad is not None)
                        with torch.enable_grad():
                            kd, ce = _chunk_losses(chunk, labels[idx], [t[idx] for t in targets], cfg)
                            if grad is not None:
                                (g,) = torch.autograd.grad(weights[0] * kd + weights[1] * ce, chunk)
                                grad.index_copy_(0, idx, g.to(grad.dtype))
                        kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
                    ctx.save_for_backward(grad if grad is not None else torch.empty(0))
                    ctx.shape = logits.shape
                    total = weights[0] * kd_sum + weights[1] * ce_sum
                    return total, kd_sum, ce_sum

                @staticmethod
                def backward(ctx, grad_total, _grad_kd, _grad_ce):
                    (grad,) = ctx.saved_tensors
                    grad = grad.view(ctx.shape)
                    # NOTE: fold any scale into kd_weight / ce_weight and call total.backward(): with an
                    # incoming gradient of 1 the buffer is passed on as is, with no second (B, T, V) tensor.
                    if grad_total.item() != 1.0:
                        grad = grad * grad_total.to(grad.dtype)
                    return (grad, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)

            cls.fn = Fn
        return cls.fn


def kd_loss(
    student_logits,
    teacher: SparseTeacher | DenseTeacher,
    loss_mask,
    input_ids,
    divergence_name: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    tail: str = "bucket",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 64,
) -> LossParts:
    """Distillation loss plus weighted hard-label CE over the masked positions, summed.

    Args:
        student_logits: (B, T, V); position t is compared with the teacher's distribution at t.
        teacher: SparseTeacher ((B, T, K) ids and raw logprobs) or DenseTeacher ((B, T, V) logits).
        loss_mask: (B, T) bool, True where position t has a teacher distribution over token t + 1.
        input_ids: (B, T); the hard label at position t is input_ids[:, t + 1].
        temperature: applied to both sides; the divergence is multiplied by T^2 so the gradient scale
            does not shrink with T (Hinton et al.).
        tail: "bucket" (one extra outcome for the mass outside the teacher's top-k) or "renormalize".
        chunk_tokens: positions per chunk. The loss and its gradient are computed together chunk by
            chunk, so besides the logits and their gradient only one (chunk_tokens, V) fp32 block is
            alive at a time: B x T x V is never materialised twice in fp32.
    Returns:
        LossParts with `total` (backward through it), `kd` and `ce` (sums, for logging), `tokens`.
    """
    import torch

    if divergence_name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence_name!r}; expected one of {DIVERGENCES}")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    mask = loss_mask.clone()
    mask[:, -1] = False  # the last position has no next token
    rows = mask.reshape(-1).nonzero().squeeze(1)
    if isinstance(teacher, SparseTeacher):
        k = teacher.topk_ids.size(-1)
        targets = (teacher.topk_ids.reshape(-1, k), teacher.topk_logprobs.reshape(-1, k))
    else:
        targets = (teacher.logits.reshape(-1, teacher.logits.size(-1)),)
    cfg = {
        "name": divergence_name,
        "temperature": temperature,
        "beta": beta,
        "alpha": alpha,
        "tail": tail,
        "chunk_tokens": chunk_tokens,
    }
    total, kd, ce = _ChunkedLoss.get().apply(
        student_logits, rows, labels.reshape(-1), (kd_weight, ce_weight), cfg, *targets
    )
    return LossParts(total, kd, ce, int(rows.numel()))
