"""The math of distillation, pinned by invariances (STYLE.md): every check here fails if the loss breaks."""

import pytest
import torch

from distill.losses import DIVERGENCES, DenseTeacher, SparseTeacher, cross_entropy, divergence, kd_loss

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
