"""The math of distillation, pinned by invariances (STYLE.md): every check here fails if the loss breaks."""

import pytest
import torch

from distill.losses import (
    DIVERGENCES,
    DenseTeacher,
    SparseTeacher,
    cross_entropy,
    divergence,
    fused_kd_loss,
    kd_loss,
)

B, T, V = 2, 7, 50


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :3] = False  # a prompt: no teacher data there
    return student, teacher, ids, mask


def dense_reference(student, teacher, mask, name, temperature=1.0, beta=0.5, alpha=0.1):
    """A plain, unchunked implementation written out with torch ops, for comparison."""
    m = mask.clone()
    m[:, -1] = False
    log_q = (student[m] / temperature).log_softmax(-1)
    log_p = (teacher[m] / temperature).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif name == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    elif name == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    elif name == "jsd":
        mix = beta * p + (1 - beta) * q
        d = beta * (p * (log_p - mix.log())).sum(-1) + (1 - beta) * (q * (log_q - mix.log())).sum(-1)
    elif name == "skew_forward_kl":
        d = (p * (log_p - (alpha * p + (1 - alpha) * q).log())).sum(-1)
    else:
        d = (q * (log_q - (alpha * q + (1 - alpha) * p).log())).sum(-1)
    return d.sum() * temperature**2


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_of_a_distribution_with_itself_is_zero(batch, name):
    student, _, ids, mask = batch
    parts = kd_loss(student, DenseTeacher(student.clone()), mask, ids, name)
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_teacher_matches_the_plain_formula(batch, name, temperature):
    student, teacher, ids, mask = batch
    parts = kd_loss(student, DenseTeacher(teacher), mask, ids, name, temperature=temperature)
    assert parts.kd.item() == pytest.approx(
        dense_reference(student, teacher, mask, name, temperature).item(), rel=1e-9
    )
    assert parts.tokens == int(mask[:, :-1].sum())


def test_jsd_limits_are_forward_and_reverse_kl(batch):
    student, teacher, ids, mask = batch
    fwd = kd_loss(student, DenseTeacher(teacher), mask, ids, "forward_kl").kd.item()
    rev = kd_loss(student, DenseTeacher(teacher), mask, ids, "reverse_kl").kd.item()
    assert kd_loss(student, DenseTeacher(teacher), mask, ids, "jsd", beta=0.0).kd.item() == fwd
    assert kd_loss(student, DenseTeacher(teacher), mask, ids, "jsd", beta=1.0).kd.item() == rev
    eps = 1e-6
    near0 = kd_loss(student, DenseTeacher(teacher), mask, ids, "jsd", beta=eps).kd.item() / eps
    near1 = kd_loss(student, DenseTeacher(teacher), mask, ids, "jsd", beta=1 - eps).kd.item() / eps
    assert near0 == pytest.approx(fwd, rel=1e-4) and near1 == pytest.approx(rev, rel=1e-4)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_tail_bucket_equals_the_exact_kl_when_k_covers_the_vocabulary(batch, name):
    student, teacher, ids, mask = batch
    logprobs, topk_ids = teacher.log_softmax(-1).sort(-1, descending=True)
    sparse = kd_loss(student, SparseTeacher(topk_ids, logprobs), mask, ids, name)
    dense = kd_loss(student, DenseTeacher(teacher), mask, ids, name)
    assert sparse.kd.item() == pytest.approx(dense.kd.item(), rel=1e-6, abs=1e-9)


def test_tail_bucket_is_the_kl_of_the_coarse_grained_distributions(batch):
    student, teacher, ids, mask = batch
    k = 5
    logprobs, topk_ids = teacher.log_softmax(-1).topk(k, -1)
    got = kd_loss(student, SparseTeacher(topk_ids, logprobs), mask, ids, "forward_kl").kd
    m = mask.clone()
    m[:, -1] = False
    p, q = teacher[m].softmax(-1), student[m].softmax(-1)
    idx = topk_ids[m]
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    assert got.item() == pytest.approx((p_b * (p_b.log() - q_b.log())).sum().item(), rel=1e-9)
    renorm = kd_loss(
        student, SparseTeacher(topk_ids, logprobs), mask, ids, "forward_kl", tail="renormalize"
    ).kd
    pr, qr = p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)
    assert renorm.item() == pytest.approx((pr * (pr.log() - qr.log())).sum().item(), rel=1e-9)


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_chunked_equals_one_chunk_in_value_and_gradient(batch, teacher_kind):
    student, teacher, ids, mask = batch
    if teacher_kind == "dense":
        target = DenseTeacher(teacher)
    else:
        lps, top = teacher.log_softmax(-1).topk(8, -1)
        target = SparseTeacher(top, lps)
    grads = []
    totals = []
    for chunk in (3, 10_000):
        s = student.clone().requires_grad_()
        parts = kd_loss(s, target, mask, ids, "jsd", temperature=1.5, ce_weight=0.3, chunk_tokens=chunk)
        parts.total.backward()
        totals.append(parts.total.item())
        grads.append(s.grad)
    assert totals[0] == pytest.approx(totals[1], rel=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)
    assert torch.all(grads[0][1, :3] == 0) and torch.all(
        grads[0][:, -1] == 0
    )  # masked positions get no gradient


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradients_match_finite_differences(name):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 4, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (1, 4), generator=g)
    mask = torch.ones(1, 4, dtype=torch.bool)
    lps, top = teacher.log_softmax(-1).topk(4, -1)

    def f(s):
        return kd_loss(
            s, SparseTeacher(top, lps), mask, ids, name, temperature=1.3, ce_weight=0.5, chunk_tokens=2
        ).total

    assert torch.autograd.gradcheck(f, (student,), eps=1e-6, atol=1e-6)


def test_ce_part_is_the_hard_label_cross_entropy(batch):
    student, teacher, ids, mask = batch
    parts = kd_loss(student, DenseTeacher(teacher), mask, ids, "forward_kl", kd_weight=0.0, ce_weight=1.0)
    # position t carries the label of token t + 1 where the mask is set at t
    shifted = torch.full_like(ids, -100)
    shifted[:, 1:] = torch.where(mask[:, :-1], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    expected, n = cross_entropy(student, shifted)
    assert parts.ce.item() == pytest.approx(expected.item(), rel=1e-6) and parts.tokens == n  # fp32 reference
    assert parts.total.item() == pytest.approx(parts.ce.item())


def test_bf16_logits_are_computed_in_fp32(batch):
    student, teacher, ids, mask = batch
    exact = kd_loss(student.float(), DenseTeacher(teacher.float()), mask, ids).kd.item()
    half = kd_loss(student.bfloat16(), DenseTeacher(teacher.float()), mask, ids).kd
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(exact, rel=0.05)


def test_unknown_divergence_is_refused():
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "kl")


# --------------------------------------------------------------------------- the tail at temperature


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_tail_bucket_of_the_teacher_itself_is_zero_at_any_temperature(batch, name, temperature):
    _, teacher, ids, mask = batch
    logprobs, topk_ids = teacher.log_softmax(-1).topk(5, -1)
    parts = kd_loss(teacher, SparseTeacher(topk_ids, logprobs), mask, ids, name, temperature=temperature)
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_tail_bucket_with_k_equal_to_v_is_the_dense_loss_at_any_temperature(batch, name, temperature):
    student, teacher, ids, mask = batch
    logprobs, topk_ids = teacher.log_softmax(-1).sort(-1, descending=True)
    sparse = kd_loss(student, SparseTeacher(topk_ids, logprobs), mask, ids, name, temperature=temperature)
    dense = kd_loss(student, DenseTeacher(teacher), mask, ids, name, temperature=temperature)
    assert sparse.kd.item() == pytest.approx(dense.kd.item(), rel=1e-9, abs=1e-12)


def test_tempered_bucket_is_the_kl_of_the_tempered_coarse_grained_distributions(batch):
    student, teacher, ids, mask = batch
    k, t = 5, 2.0
    logprobs, topk_ids = teacher.log_softmax(-1).topk(k, -1)
    got = kd_loss(student, SparseTeacher(topk_ids, logprobs), mask, ids, temperature=t).kd
    m = mask.clone()
    m[:, -1] = False
    p, q = teacher[m].softmax(-1), student[m].softmax(-1)
    idx = topk_ids[m]
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1) ** (1 / t)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1) ** (1 / t)
    p_b, q_b = p_b / p_b.sum(-1, keepdim=True), q_b / q_b.sum(-1, keepdim=True)
    assert got.item() == pytest.approx(t**2 * (p_b * (p_b.log() - q_b.log())).sum().item(), rel=1e-9)


# --------------------------------------------------------------------------- -inf logits, detached parts


def _masked_vocab(batch):
    student, teacher, ids, mask = batch
    student, teacher = student.clone(), teacher.clone()
    student[..., -10:] = -torch.inf  # a padded vocabulary, masked on both sides
    teacher[..., -10:] = -torch.inf
    return student, teacher, ids % 40, mask


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("teacher_kind", ["dense", "bucket", "renormalize"])
def test_minus_inf_logits_give_finite_gradients(batch, name, teacher_kind):
    student, teacher, ids, mask = _masked_vocab(batch)
    if teacher_kind == "dense":
        target, tail = DenseTeacher(teacher), "bucket"
    else:
        lps, top = teacher.log_softmax(-1).topk(5, -1)
        target, tail = SparseTeacher(top, lps), teacher_kind
    s = student.requires_grad_()
    parts = kd_loss(s, target, mask, ids, name, temperature=2.0, ce_weight=0.5, tail=tail)
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(s.grad).all()
    assert torch.all(s.grad[..., -10:] == 0)  # tokens nobody can produce get no gradient


def test_sampled_tail_with_minus_inf_logits_gives_finite_gradients(batch):
    student, teacher, ids, mask = _masked_vocab(batch)
    log_p = teacher.log_softmax(-1)
    lps, top = log_p.topk(5, -1)
    s = student.requires_grad_()
    parts = kd_loss(
        s,
        SparseTeacher.from_continuation(top, lps, ids, log_p.gather(-1, ids[..., None])[..., 0]),
        mask,
        ids,
        tail="sample",
    )
    parts.total.backward()
    assert torch.isfinite(s.grad).all()


def test_loss_parts_are_detached(batch):
    student, teacher, ids, mask = batch
    s = student.clone().requires_grad_()
    parts = kd_loss(s, DenseTeacher(teacher), mask, ids, ce_weight=1.0)
    assert parts.total.requires_grad
    assert not parts.kd.requires_grad and not parts.ce.requires_grad
    with pytest.raises(RuntimeError):
        parts.kd.backward()  # fails loudly; it used to return a silent zero gradient


# --------------------------------------------------------------------------- the sampled tail


def _one_position(seed=3, v=50, k=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(v, generator=g, dtype=torch.float64) * 2
    log_p = teacher.log_softmax(-1)
    lps, top = log_p.topk(k)
    return student, log_p, lps, top


def _dense_kl_and_grad(student, log_p):
    s = student.clone().requires_grad_()
    kl = (log_p.exp() * (log_p - s.log_softmax(-1))).sum()
    kl.backward()
    return kl.item(), s.grad


def test_sampled_tail_is_exactly_unbiased_in_value_and_gradient():
    """E_x[estimate(x)] over every possible draw x, weighted by p(x), is the dense KL and its gradient."""
    from distill.losses import sampled_tail_kl

    student, log_p, lps, top = _one_position()
    v = student.numel()
    s = student.expand(v, v).clone().requires_grad_()  # row x: the estimate when the draw is token x
    draws = torch.arange(v)[:, None]
    est = sampled_tail_kl(s, top.expand(v, -1), lps.expand(v, -1), draws, log_p[draws])
    (p_weighted := (log_p.exp() * est).sum()).backward()
    kl, grad = _dense_kl_and_grad(student, log_p)
    assert p_weighted.item() == pytest.approx(kl, rel=1e-12)
    assert torch.allclose(s.grad.sum(0), grad, atol=1e-12)
    in_head = torch.isin(torch.arange(v), top)
    assert torch.all(est[in_head] == est[in_head][0])  # a draw inside the head adds nothing


def test_sampled_tail_mean_over_draws_is_within_its_standard_error_of_the_dense_kl():
    """kd_loss on N positions with the same distributions and a real draw each, as training sees them.

    Bound: the N per-position estimates are i.i.d. with the variance computed exactly over the vocabulary,
    sigma^2 = sum_x p(x) f(x)^2 - KL^2; their mean is within 5 sigma / sqrt(N) of the KL (the CLT puts a
    miss at about 6e-7), and the same holds per coordinate of the gradient."""
    from distill.losses import sampled_tail_kl

    student, log_p, lps, top = _one_position()
    v, n = student.numel(), 20_000
    rows = torch.arange(v)[:, None]
    exact = sampled_tail_kl(student.expand(v, v), top.expand(v, -1), lps.expand(v, -1), rows, log_p[rows])
    p = log_p.exp()
    kl, grad = _dense_kl_and_grad(student, log_p)
    sigma = ((p * exact**2).sum() - kl**2).sqrt().item()
    grad_rows = (student.expand(v, v).softmax(-1) - torch.eye(v, dtype=torch.float64)) * (
        ~torch.isin(torch.arange(v), top)
    )[:, None].double()
    grad_sigma = ((p[:, None] * grad_rows**2).sum(0) - (p[:, None] * grad_rows).sum(0) ** 2).sqrt()

    g = torch.Generator().manual_seed(7)
    draws = torch.multinomial(p, n, replacement=True, generator=g)
    ids = torch.zeros(1, n + 1, dtype=torch.long)
    ids[0, 1:] = draws  # position t's next token is draw t
    logits = student.expand(1, n + 1, v).clone().requires_grad_()
    teacher = SparseTeacher.from_continuation(
        top.expand(1, n + 1, -1), lps.expand(1, n + 1, -1), ids, torch.cat([log_p[draws], log_p[:1]])[None]
    )
    mask = torch.ones(1, n + 1, dtype=torch.bool)
    parts = kd_loss(logits, teacher, mask, ids, tail="sample", chunk_tokens=4096)
    parts.total.backward()
    assert parts.tokens == n
    assert abs(parts.kd.item() / n - kl) < 5 * sigma / n**0.5
    assert torch.all((logits.grad[0, :n].sum(0) / n - grad).abs() < 5 * grad_sigma / n**0.5 + 1e-12)
    # the bucket, by contrast, is biased: its gap to the dense KL is many standard errors wide
    bucket = kd_loss(
        student.expand(1, 2, v),
        SparseTeacher(top.expand(1, 2, -1), lps.expand(1, 2, -1)),
        mask[:, :2],
        ids[:, :2],
    ).kd.item()
    assert abs(bucket - kl) > 20 * sigma / n**0.5


@pytest.mark.parametrize(
    "kwargs",
    [{"divergence_name": "reverse_kl"}, {"temperature": 2.0}, {"drop_draws": True}],
)
def test_sampled_tail_refuses_what_it_cannot_estimate(batch, kwargs):
    student, teacher, ids, mask = batch
    lps, top = teacher.log_softmax(-1).topk(5, -1)
    target = SparseTeacher.from_continuation(top, lps, ids, torch.zeros_like(ids, dtype=torch.float64))
    if kwargs.pop("drop_draws", False):
        target = SparseTeacher(top, lps)
    with pytest.raises(ValueError, match="tail='sample'"):
        kd_loss(student, target, mask, ids, tail="sample", **kwargs)


def test_continuation_draws_line_up_with_the_next_token(batch):
    _, teacher, ids, _ = batch
    lps, top = teacher.log_softmax(-1).topk(5, -1)
    token_lps = torch.randn(ids.shape, dtype=torch.float64)
    t = SparseTeacher.from_continuation(top, lps, ids, token_lps)
    assert t.sample_ids.shape == (*ids.shape, 1)
    assert torch.equal(t.sample_ids[:, :-1, 0], ids[:, 1:]) and torch.equal(
        t.sample_logprobs[..., 0], token_lps
    )


FUSED_CASES = [
    *[("dense", name, 1.5) for name in DIVERGENCES],
    *[("bucket", name, 1.5) for name in DIVERGENCES],
    ("renormalize", "jsd", 0.7),
    ("sample", "forward_kl", 1.0),
    ("none", "forward_kl", 1.0),
]


@pytest.mark.parametrize("scale", [1.0, 0.25], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("recompute", [False, True], ids=["in-forward", "recomputed"])
@pytest.mark.parametrize("kind, name, temperature", FUSED_CASES)
def test_fused_output_layer_and_loss_equal_the_unfused_loss_in_value_and_gradient(
    batch, kind, name, temperature, recompute, scale
):
    """fused_kd_loss(hidden, lm_head) is kd_loss(lm_head(hidden)): same total, parts and gradients for the
    hidden states and the layer's weight and bias, with every teacher form, CE mixed in and temperature,
    both ways (gradients in forward; the layer called on each chunk and recomputed in backward)."""
    _, teacher, ids, mask = batch
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    layer = torch.nn.Linear(6, V, dtype=torch.float64)
    lps, top = teacher.log_softmax(-1).topk(8, -1)
    target = {
        "dense": DenseTeacher(teacher),
        "bucket": SparseTeacher(top, lps),
        "renormalize": SparseTeacher(top, lps),
        "sample": SparseTeacher.from_continuation(top, lps, ids, teacher.log_softmax(-1)[..., 0]),
        "none": None,
    }[kind]
    tail = kind if kind in ("renormalize", "sample") else "bucket"
    kd_weight = 0.0 if kind == "none" else 0.8
    results, rows = [], []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        layer.zero_grad()
        args = (target, mask, ids, name, temperature)
        kwargs = dict(tail=tail, kd_weight=kd_weight, ce_weight=0.3)
        if fused:
            hook = layer.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
            parts = fused_kd_loss(h, layer, *args, **kwargs, chunk_elements=8 * V, recompute=recompute,
                                  chunk_tokens=3)  # fmt: skip
            (parts.total * scale).backward()  # the loop scales the loss (by its token count)
            hook.remove()
            # in forward: chunks of 8 rows (the gradients summed over chunks), each one's loss taken 3 rows
            # at a time (ragged at the end)
            if recompute:  # the layer is called a chunk (a quarter: 2 rows) at a time, forward and backward
                assert rows and max(rows) == 2
            else:  # its weight is used directly, a chunk at a time: the layer is never called
                assert rows == []
        else:
            target_for_unfused = target if target is not None else DenseTeacher(teacher)
            parts = kd_loss(layer(h), target_for_unfused, mask, ids, name, temperature, **kwargs)
            (parts.total * scale).backward()
        results.append((parts, h.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    (a, *grads_a), (b, *grads_b) = results
    assert b.tokens == a.tokens
    assert b.total.item() == pytest.approx(a.total.item(), rel=1e-10)
    assert b.ce.item() == pytest.approx(a.ce.item(), rel=1e-10)
    if kind != "none":
        assert b.kd.item() == pytest.approx(a.kd.item(), rel=1e-10)
    for x, y in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    assert torch.all(grads_b[0][1, :3] == 0) and torch.all(grads_b[0][:, -1] == 0)  # no target: no gradient


def test_fused_loss_without_gradients_computes_each_chunk_once(batch):
    _, teacher, ids, mask = batch
    hidden = torch.randn(B, T, 6, dtype=torch.float64)
    layer = torch.nn.Linear(6, V, dtype=torch.float64)
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        parts = fused_kd_loss(hidden, layer, DenseTeacher(teacher), mask, ids, chunk_elements=4 * V)
        want = kd_loss(layer(hidden), DenseTeacher(teacher), mask, ids)
    assert sum(calls[:-1]) == parts.tokens and max(calls[:-1]) == 4
    assert parts.kd.item() == pytest.approx(want.kd.item(), rel=1e-10)
