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
teacher loaded in-process, (B, T, V)): one interface, `kd_loss`. A sparse teacher lacks the V - K tail;
`tail` says what stands for it: one bucket holding its mass ("bucket", the KL of coarse-grained
distributions: biased low, and it says nothing of how the student spreads its tail), the head alone
("renormalize"), or draws from the teacher's full distribution ("sample": an unbiased estimate of the
full-vocabulary forward KL; see `sampled_tail_kl`, and docs/losses.md for the derivation).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
LOSS_CHUNK_TOKENS = 64  # positions whose loss and gradient are computed together (a cache-sized block)
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
    """KL(a || b) per row over the last dim; 0 log 0 = 0.

    NOTE: where a = 0 both logs are replaced by 0 before the product, so an -inf there (a masked
    vocabulary entry) gives 0 and a zero gradient instead of 0 * inf = NaN in the backward pass.
    """
    import torch

    a = log_a.exp()
    live = a > 0
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    return (a * (torch.where(live, log_a, zero) - torch.where(live, log_b, zero))).sum(-1)


def _log_mix(log_a, log_b, weight: float):
    """log(weight a + (1 - weight) b), stably; -inf (with zero gradient) where a = b = 0."""
    import math

    import torch

    if weight <= 0:
        return log_b
    if weight >= 1:
        return log_a
    top = torch.maximum(log_a, log_b)
    finite = torch.isfinite(top)
    zero = torch.zeros((), dtype=top.dtype, device=top.device)
    top = torch.where(finite, top, zero)
    mixed = weight * (log_a - top).exp() + (1 - weight) * (log_b - top).exp()
    # NOTE: log(1) where both are 0, then -inf put back: log'(0) = inf would turn the zero gradient to NaN.
    safe = torch.where(finite, mixed, torch.ones((), dtype=mixed.dtype, device=mixed.device))
    return torch.where(finite, top + safe.log(), torch.full_like(top, -math.inf))


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
    """What a teacher store holds per position: the top-k ids (B, T, K) and raw logprobs (B, T, K) (before
    temperature), and optionally S tokens drawn from the teacher's full distribution with their raw
    logprobs, (B, T, S) each, which `tail="sample"` needs (`from_continuation` builds them when the
    sequence itself was sampled from the teacher)."""

    topk_ids: object
    topk_logprobs: object
    sample_ids: object = None
    sample_logprobs: object = None

    @classmethod
    def from_continuation(cls, topk_ids, topk_logprobs, input_ids, token_logprobs) -> SparseTeacher:
        """The draws are the sequence's own next tokens: position t's draw is input_ids[:, t + 1], with the
        teacher's logprob token_logprobs[:, t] (B, T). Right only where the teacher sampled the sequence at
        temperature 1 with no truncation (a sample-mode store made with temperature 1, top_p 1)."""
        import torch

        draws = torch.zeros_like(input_ids)
        draws[:, :-1] = input_ids[:, 1:]
        return cls(topk_ids, topk_logprobs, draws[..., None], token_logprobs[..., None])


@dataclass
class DenseTeacher:
    """A teacher's full logits (B, T, V), e.g. from a teacher loaded in-process."""

    logits: object


TAILS = ("bucket", "renormalize", "sample")


def _log1mexp(log_s):
    """log(1 - exp(log_s)) for log_s <= 0, stably (Maechler's two branches)."""
    import math

    import torch

    log_s = log_s.clamp(max=-1e-7)
    return torch.where(log_s > -math.log(2), torch.log(-torch.expm1(log_s)), torch.log1p(-torch.exp(log_s)))


def _tail_logmass(log_q, ids):
    """log of the mass of `log_q` (n, V) outside the ids (n, K), summed exactly over the other V - K
    entries (1 - sum(head) loses every bit once the head holds almost all the mass)."""

    import torch

    # NOTE: the head is masked with the dtype's lowest finite value, not -inf: exp() of it is 0 beside any
    # finite log-prob, so the mass is exact, and a row whose tail is all -inf (no tail) still gets a finite
    # value (~ -3e38, i.e. no mass) and a zero gradient instead of NaN, with no host sync to test for it.
    rest = log_q.scatter(-1, ids, torch.finfo(log_q.dtype).min)
    return rest.logsumexp(-1)


def _sparse_bins(log_q, ids, teacher_logprobs, temperature: float, tail: str):
    """Student log-probs (n, V) and the teacher's top-k (n, K) -> both sides' (n, bins) log-probs at temperature.

    NOTE: temperature on a sparse teacher. Each side is first coarse-grained at temperature 1 into the K
    head tokens plus one bucket for the rest (the teacher's bucket holds 1 - sum(top-k), the student's its
    exact mass outside the head), and then both are tempered as the same K + 1 outcomes. So a student
    equal to the teacher gives 0 at every T, and a head that covers the vocabulary gives the dense
    tempered KL exactly. Tempering token by token on the student's side but as one outcome on the
    teacher's side (the obvious alternative) is biased at any T != 1: mass is compared with mass^(1/T).
    `renormalize` drops the bucket and tempers the renormalised head.
    """
    import torch

    head_q = log_q.gather(-1, ids)  # (n, K)
    if tail == "renormalize" or ids.size(-1) >= log_q.size(-1):
        return (teacher_logprobs / temperature).log_softmax(-1), (head_q / temperature).log_softmax(-1)
    tail_p = _log1mexp(torch.logsumexp(teacher_logprobs, -1).clamp(max=0))
    bins_p = torch.cat([teacher_logprobs, tail_p[:, None]], -1)  # (n, K + 1)
    bins_q = torch.cat([head_q, _tail_logmass(log_q, ids)[:, None]], -1)
    return (bins_p / temperature).log_softmax(-1), (bins_q / temperature).log_softmax(-1)


def sampled_tail_kl(logits, ids, teacher_logprobs, sample_ids, sample_logprobs):
    """Forward KL(p || q) per row, estimated without bias from the exact head and draws for the tail.

    Split the vocabulary into the head H (the teacher's top-k) and the rest. The head's part,
    sum_{v in H} p_v (log p_v - log q_v), is computed exactly from the stored top-k. For the tail's part,
    each draw x ~ p of the teacher's full distribution gives 1[x not in H] (log p_x - log q_x), whose
    expectation over x is exactly sum_{v not in H} p_v (log p_v - log q_v); S draws are averaged. The sum
    is an unbiased estimate of the full-vocabulary KL, in value and in gradient (the tail's gradient is
    the hard-label CE gradient of the draws that fall outside the head), at temperature 1 only: a draw
    from p is not a draw from p^(1/T) / Z, whose Z the top-k cannot give.

    Args: logits (n, V); ids, teacher_logprobs (n, K) raw; sample_ids, sample_logprobs (n, S) raw.
    Returns: (n,) per-row estimates.
    """
    return _sampled_tail(logits.log_softmax(-1), ids, teacher_logprobs, sample_ids, sample_logprobs)


def _sampled_tail(log_q, ids, teacher_logprobs, sample_ids, sample_logprobs):
    """`sampled_tail_kl` from the student's log-probs (n, V)."""
    import torch

    head = _kl(
        teacher_logprobs, log_q.gather(-1, ids)
    )  # unnormalised: sum over the head of p (log p - log q)
    outside = ~(sample_ids[..., None] == ids[:, None, :]).any(-1)  # (n, S)
    per_draw = sample_logprobs - log_q.gather(-1, sample_ids)
    return head + torch.where(outside, per_draw, torch.zeros_like(per_draw)).mean(-1)


@dataclass
class LossParts:
    """One micro-batch: `total` = kd_weight x kd + ce_weight x ce (backward through it), the parts as
    detached sums (for logging; no gradient reaches the logits through them) and the number of target
    tokens they sum over."""

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
    # one log-softmax for the CE and the divergence (each pass over (n, V) is what the loss costs)
    log_q = logits.log_softmax(-1)
    ce = -log_q.gather(-1, labels[:, None]).sum()  # every row is a target position
    if cfg["tail"] == "none":  # no teacher: CE alone
        return torch.zeros((), dtype=ce.dtype, device=ce.device), ce
    if cfg["tail"] == "sample":
        ids, lps, draw_ids, draw_lps = targets
        div = _sampled_tail(log_q, ids, lps.to(logits.dtype), draw_ids, draw_lps.to(logits.dtype))
        return div.sum(), ce
    if len(targets) == 1:
        log_p = (targets[0].to(logits.dtype) / temperature).log_softmax(-1)
        if temperature != 1.0:
            log_q = (logits / temperature).log_softmax(-1)
    else:
        log_p, log_q = _sparse_bins(log_q, targets[0], targets[1].to(logits.dtype), temperature, cfg["tail"])
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


def _prepare(teacher, loss_mask, input_ids, divergence_name, temperature, beta, alpha, tail, chunk_tokens):
    """What both forms of the loss start from: the flat rows with a target, their hard labels (flat), the
    teacher's targets as flat rows, and the chunks' settings. A teacher None is CE alone."""
    import torch

    if divergence_name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence_name!r}; expected one of {DIVERGENCES}")
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {TAILS}")
    sampled = tail == "sample" and isinstance(teacher, SparseTeacher)
    if sampled and (divergence_name != "forward_kl" or temperature != 1.0 or teacher.sample_ids is None):
        raise ValueError(
            "tail='sample' estimates forward_kl at temperature 1 from the teacher's draws "
            f"(got {divergence_name} at T={temperature}, draws {'absent' if teacher.sample_ids is None else 'given'})"
        )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    mask = loss_mask.clone()
    mask[:, -1] = False  # the last position has no next token
    rows = mask.reshape(-1).nonzero().squeeze(1)
    if isinstance(teacher, SparseTeacher):
        k = teacher.topk_ids.size(-1)
        targets = (teacher.topk_ids.reshape(-1, k), teacher.topk_logprobs.reshape(-1, k))
        if sampled:
            draws = teacher.sample_ids.size(-1)
            targets += (teacher.sample_ids.reshape(-1, draws), teacher.sample_logprobs.reshape(-1, draws))
    elif teacher is not None:
        targets = (teacher.logits.reshape(-1, teacher.logits.size(-1)),)
    else:
        targets = ()
    cfg = {
        "name": divergence_name,
        "temperature": temperature,
        "beta": beta,
        "alpha": alpha,
        "tail": tail if isinstance(teacher, SparseTeacher) else "dense" if teacher is not None else "none",
        "chunk_tokens": chunk_tokens,
    }
    return rows, labels.reshape(-1), targets, cfg


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
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> LossParts:
    """Distillation loss plus weighted hard-label CE over the masked positions, summed.

    Args:
        student_logits: (B, T, V); position t is compared with the teacher's distribution at t.
        teacher: SparseTeacher ((B, T, K) ids and raw logprobs) or DenseTeacher ((B, T, V) logits).
        loss_mask: (B, T) bool, True where position t has a teacher distribution over token t + 1.
        input_ids: (B, T); the hard label at position t is input_ids[:, t + 1].
        temperature: applied to both sides; the divergence is multiplied by T^2 so the gradient scale
            does not shrink with T (Hinton et al.).
        tail: what a sparse teacher's missing tail becomes: "bucket" (one extra outcome for the mass
            outside the top-k), "renormalize" (the head alone), or "sample" (the unbiased head + sampled
            tail estimate of `sampled_tail_kl`; forward_kl at temperature 1, and the teacher needs draws).
        chunk_tokens: positions per chunk. The loss and its gradient are computed together chunk by
            chunk, so besides the logits and their gradient only one (chunk_tokens, V) fp32 block is
            alive at a time: B x T x V is never materialised twice in fp32.
    Returns:
        LossParts with `total` (backward through it), `kd` and `ce` (sums, for logging), `tokens`.
    """
    rows, labels, targets, cfg = _prepare(
        teacher, loss_mask, input_ids, divergence_name, temperature, beta, alpha, tail, chunk_tokens
    )
    total, kd, ce = _ChunkedLoss.get().apply(
        student_logits, rows, labels, (kd_weight, ce_weight), cfg, *targets
    )
    # NOTE: the parts are outputs of the same Function as `total`, whose backward ignores them: detached
    # here, so parts.kd.backward() fails loudly instead of silently giving a zero gradient.
    return LossParts(total, kd.detach(), ce.detach(), int(rows.numel()))


FUSED_CHUNK_ELEMENTS = 1 << 25  # logits per chunk of the fused loss: 128 MiB in fp32, whatever V is
FUSED_CHUNK_TOKENS = 32  # rows of a fused chunk whose loss and gradient are computed together


class _FusedLinearLoss:
    """The fused loss for a plain linear output layer whose weight is whole (one process, DDP, ZeRO-1/2):
    forward computes each chunk's logits, its loss and the gradients of the hidden states and the weight
    (into one buffer each), so backward only passes them on. Three matmuls, as the unfused loss does."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, flat, weight, bias, rows, labels, weights, cfg, *targets):
                    grads = ctx.needs_input_grad
                    grad_h = torch.zeros_like(flat) if grads[0] else None
                    # NOTE: the weight's gradient sums over chunks: in fp32 for a bf16 / fp16 weight
                    acc = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
                    grad_w = torch.zeros_like(weight, dtype=acc) if grads[1] else None
                    grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and grads[2] else None
                    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
                    kd_sum = ce_sum = torch.zeros((), dtype=wide, device=flat.device)
                    for lo in range(0, rows.numel(), cfg["rows"]):
                        idx = rows[lo : lo + cfg["rows"]]
                        h = flat.index_select(0, idx)
                        # the chunk's logits, then, a few rows at a time (cache-sized, as kd_loss does),
                        # their gradient in their place: one (rows, V) buffer
                        g = torch.nn.functional.linear(h, weight, bias)
                        for sub in range(0, idx.numel(), cfg["chunk_tokens"]):
                            part = slice(sub, sub + cfg["chunk_tokens"])
                            logits = g[part].detach().requires_grad_()
                            at = idx[part]
                            with torch.enable_grad():
                                kd, ce = _chunk_losses(logits, labels[at], [t[at] for t in targets], cfg)
                                (grad,) = torch.autograd.grad(weights[0] * kd + weights[1] * ce, logits)
                            g[part] = grad
                            kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
                        if grad_h is not None:
                            grad_h.index_copy_(0, idx, (g @ weight).to(grad_h.dtype))
                        if grad_w is not None:
                            grad_w.addmm_(g.t().to(acc), h.to(acc))
                        if grad_b is not None:
                            grad_b += g.sum(0).to(acc)
                    ctx.grads = (
                        grad_h,
                        None if grad_w is None else grad_w.to(weight.dtype),
                        None if grad_b is None else grad_b.to(bias.dtype),
                    )
                    return weights[0] * kd_sum + weights[1] * ce_sum, kd_sum, ce_sum

                @staticmethod
                def backward(ctx, grad_total, _grad_kd, _grad_ce):
                    out, ctx.grads = ctx.grads, None
                    if grad_total.item() != 1.0:  # scaled in place: the buffers are this call's own
                        out = tuple(g if g is None else g.mul_(grad_total.to(g.dtype)) for g in out)
                    return (*out, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 7)

            cls.fn = Fn
        return cls.fn


def fused_kd_loss(
    hidden,
    output_layer,
    teacher: SparseTeacher | DenseTeacher | None,
    loss_mask,
    input_ids,
    divergence_name: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    tail: str = "bucket",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_elements: int = FUSED_CHUNK_ELEMENTS,
    recompute: bool | None = None,
    chunk_tokens: int = FUSED_CHUNK_TOKENS,
) -> LossParts:
    """`kd_loss` from the student's last hidden states and its output layer, without its (B, T, V) logits.

    The positions with a target are taken in chunks of about `chunk_elements` logits; only one chunk's
    logits and their gradient exist at any time, and no (B, T, V) tensor ever does. Two ways:
    - a plain linear layer whose weight is whole: each chunk's logits, loss and gradients are computed
      in forward (`_FusedLinearLoss`), the gradients of the hidden states and the weight accumulated in
      one buffer each;
    - otherwise (`recompute`: a weight sharded by DeepSpeed ZeRO-3, which gathers it for each call of the
      layer, or an adapted layer such as LoRA's): the layer is called on each chunk and the chunk's
      logits are recomputed in backward (activation checkpointing, one chunk at a time).

    Args:
        hidden: (B, T, H), the input the model's output layer receives.
        output_layer: the module that maps (n, H) to the (n, V) logits.
        teacher: as in `kd_loss`; None trains CE alone (set `ce_weight`).
        recompute: force the second way (True) or the first (False); None chooses.
        chunk_elements: logits per chunk of the first way, a quarter of that in the second (whose loss
            runs on the whole chunk at once); the first takes each chunk's loss `chunk_tokens` rows at a
            time, writing their gradient over their logits, so one (rows, V) buffer serves both.
        Others as in `kd_loss`.
    """
    import torch

    rows, labels, targets, cfg = _prepare(
        teacher, loss_mask, input_ids, divergence_name, temperature, beta, alpha, tail, chunk_tokens
    )
    flat = hidden.reshape(-1, hidden.size(-1))
    weight = getattr(output_layer, "weight", None)
    vocab = (getattr(weight, "ds_shape", None) or getattr(weight, "shape", (4096,)))[0]
    plain = type(output_layer) is torch.nn.Linear and not hasattr(weight, "ds_id")
    if recompute is False and not plain:
        raise ValueError("the fused loss without recomputation needs a plain nn.Linear with its whole weight")
    in_forward = plain if recompute is None else not recompute
    # NOTE: recomputed chunks are a quarter as large: their loss runs on the whole chunk at once
    cfg["rows"] = max(1, (chunk_elements if in_forward else chunk_elements // 4) // int(vocab))
    if in_forward and torch.is_grad_enabled():  # without gradients, the layer is simply called per chunk
        total, kd, ce = _FusedLinearLoss.get().apply(
            flat, weight, output_layer.bias, rows, labels, (kd_weight, ce_weight), cfg, *targets
        )
        return LossParts(total, kd.detach(), ce.detach(), int(rows.numel()))
    return _recomputed(flat, output_layer, rows, labels, targets, cfg, kd_weight, ce_weight)


def _recomputed(flat, output_layer, rows, labels, targets, cfg, kd_weight, ce_weight) -> LossParts:
    """The fused loss by calling the output layer on each chunk, with activation checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def piece(h, chunk_labels, *chunk_targets):
        kd, ce = _chunk_losses(output_layer(h), chunk_labels, list(chunk_targets), cfg)
        return kd_weight * kd + ce_weight * ce, kd.detach(), ce.detach()

    grad = torch.is_grad_enabled()
    wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
    total = flat[:0].sum().to(wide)  # zero, on the graph even when no position has a target
    kd_sum = ce_sum = torch.zeros((), dtype=wide, device=flat.device)
    for lo in range(0, rows.numel(), cfg["rows"]):
        idx = rows[lo : lo + cfg["rows"]]
        args = (flat.index_select(0, idx), labels[idx], *(t[idx] for t in targets))
        out = checkpoint(piece, *args, use_reentrant=False) if grad else piece(*args)
        total, kd_sum, ce_sum = total + out[0], kd_sum + out[1], ce_sum + out[2]
    return LossParts(total, kd_sum, ce_sum, int(rows.numel()))
