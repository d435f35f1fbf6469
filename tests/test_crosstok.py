"""Cross-tokenizer distillation's parts: byte strings, the vocab map, the byte alignment and the losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import crosstok
from distill.errors import DistillError
from distill.losses import SparseTeacher, kd_loss
from distill.store import Capture, collate

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
TEXTS = [
    "The café sells crème brûlée and naïve tea.",
    "Distillation moves a teacher's knowledge into a smaller student model.",
    "Ünïcödé text, with 日本語 and emoji 🙂 too!",
    "A student learns from the teacher's distribution over the next token.",
] * 8


def byte_level(vocab_size: int, texts=TEXTS):
    """A byte-level BPE tokenizer trained on `texts` (a BOS added in front, as Llama 3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def word_level(words):
    """Whole words only (byte-level pieces, ByteLevel decoder): shares no token with a byte tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = {b: c for c, b in crosstok._byte_level_alphabet().items()}
    vocab = {"".join(alphabet[b] for b in w.encode()): i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def single_bytes():
    """Every token one byte (no merges), plus a BOS."""
    return byte_level(260, texts=["x"])


def capture(teacher_ids, start, vocab, k=4, seed=0):
    """A stored row: a random teacher distribution at every position from `start` (its top-k sorted)."""
    g = torch.Generator().manual_seed(seed)
    positions = len(teacher_ids) - 1 - start
    logits = torch.randn(positions, vocab, generator=g) * 3
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k, -1)
    following = torch.tensor(teacher_ids[start + 1 :])
    return Capture(
        id=f"row{seed}",
        input_ids=list(teacher_ids),
        start=start,
        topk_ids=top.indices.numpy(),
        topk_logprobs=top.values.numpy(),
        token_logprobs=logprobs.gather(-1, following[:, None])[:, 0].numpy(),
    )


def test_byte_strings_spell_the_text_back_for_byte_level_vocabularies():
    tok = byte_level(400)
    table = crosstok.token_bytes(tok)
    assert len(table) == len(tok)
    for text in TEXTS[:3]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode()
    assert table[tok.convert_tokens_to_ids(BOS)] == BOS.encode()  # an added token: its content


def test_a_tokenizer_without_byte_offsets_is_refused_in_one_line():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    with pytest.raises(DistillError, match="student tokenizer .* no byte offsets"):
        crosstok.token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok))


def test_the_vocab_map_is_deterministic_cached_and_maps_equal_byte_strings(tmp_path):
    teacher, student = byte_level(400), byte_level(300)
    first = crosstok.vocab_map(teacher, student, tmp_path)
    assert list((tmp_path / "vocab-maps").glob("*.npy"))
    assert np.array_equal(first, crosstok.vocab_map(byte_level(400), byte_level(300), tmp_path))
    assert np.array_equal(first, crosstok.vocab_map(teacher, student))  # built anew, the same
    t_bytes, s_bytes = crosstok.token_bytes(teacher), crosstok.token_bytes(student)
    shared = first >= 0
    assert shared.sum() > 250  # the same corpus: most of the smaller vocabulary is shared
    for t in np.flatnonzero(shared):
        assert s_bytes[first[t]] == t_bytes[t]
    for t in np.flatnonzero(~shared):
        assert t_bytes[t] not in s_bytes


def test_the_byte_alignment_of_hand_made_tokenizations_is_exact():
    # "a café!" = a, space, c, a, f, é (2 bytes: c3 a9), ! -> 8 bytes
    # teacher: "a" " c" "af" "\xc3" "\xa9!"   (splits é across two tokens)
    # student: BOS(0) "a " "caf" "é" "!"      (merges "a " the teacher splits as "a" + " c")
    teacher = [1, 2, 2, 1, 2]
    student = [0, 2, 3, 2, 1]
    # byte ends: teacher 1, 3, 5, 6, 8; student 0, 2, 5, 7, 8 -> common boundaries 5 and 8
    assert crosstok.align(teacher, student) == [(0, 3, 1, 3), (3, 5, 3, 5)]
    # one-to-one wherever both sides split alike
    assert crosstok.align([2, 1, 3], [0, 2, 1, 3]) == [(0, 1, 1, 2), (1, 2, 2, 3), (2, 3, 3, 4)]
    # a longer side: bytes past the shorter one are left out
    assert crosstok.align([2, 2, 2], [0, 2, 3]) == [(0, 1, 1, 2)]


def test_retokenized_multibyte_characters_split_by_the_teacher_align_with_the_whole_character():
    teacher, student = single_bytes(), byte_level(400)
    r = crosstok.Retokenizer(teacher, student, max_length=512)
    text = "crème"  # è is two bytes: two teacher tokens, inside one student token
    ids = teacher(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) == 6
    out = r([0, *ids], start=0)  # the teacher's BOS, then its distributions from the first byte on
    s_bytes = crosstok.token_bytes(student)
    assert b"".join(s_bytes[i] for i in out.student_ids[1:]) == text.encode()
    assert out.student_ids[0] == student.bos_token_id  # the text begins with the BOS's content
    # BOS, then "c" alone on both sides, then "rème": five teacher tokens (è split in two), one student token
    assert [s_bytes[i] for i in out.student_ids] == [BOS.encode(), b"c", "rème".encode()]
    assert out.spans == [(1, 2, 1, 2), (2, 7, 2, 3)]
    assert out.unaligned == 0 and out.targets == 6


def test_bytes_that_are_not_whole_characters_get_no_student_token_and_are_counted():
    teacher, student = single_bytes(), byte_level(400)
    r = crosstok.Retokenizer(teacher, student, max_length=512)
    s_bytes = crosstok.token_bytes(student)
    ids = teacher("crème brûlée", add_special_tokens=False)["input_ids"]  # a token per byte
    # a sequence cut inside è: its last byte (a8) is skipped, so "me" has no intact context
    late = r(ids[3:], start=0)
    assert [s_bytes[i] for i in late.student_ids] == [BOS.encode(), b"me", " brûlée".encode()]
    assert late.spans == [(3, 12, 2, 3)]  # " brûlée", predicted by "me"
    assert (late.targets, late.unaligned) == (11, 2)  # "m" and "e"
    # a sequence that ends inside é: its first byte (c3) is dropped
    early = r(ids[:-2], start=0)
    assert b"".join(s_bytes[i] for i in early.student_ids[1:]) == "crème brûl".encode()
    assert (early.targets, early.unaligned) == (12, 1)
    assert early.spans[-1][1] == len(ids) - 3  # the last span ends before c3


def _same_tokenizer_batch(tok, k=4):
    captures = []
    for i, text in enumerate(TEXTS[:3]):
        ids = tok(text)["input_ids"]  # with its BOS
        captures.append(capture(ids, start=3 + i, vocab=len(tok), k=k, seed=i))
    return captures


def test_with_identical_tokenizers_the_byte_aligned_loss_is_the_same_tokenizer_loss():
    tok = byte_level(400)
    captures = _same_tokenizer_batch(tok)
    r = crosstok.Retokenizer(tok, tok, max_length=512)
    cross = crosstok.collate_cross(captures, r, pad_id=2)
    plain = collate(captures, k=4, pad_id=2)
    assert torch.equal(cross["input_ids"], plain["input_ids"])
    assert bool(cross["span_one_to_one"].all()) and int(cross["count_unaligned"]) == 0
    assert int(cross["count_spans"]) == int(plain["loss_mask"].sum()) == int(cross["count_targets"])
    logits = torch.randn(*plain["input_ids"].shape, len(tok), dtype=torch.float64, requires_grad=True)
    teacher = SparseTeacher(plain["topk_ids"], plain["topk_logprobs"].double())
    expected = kd_loss(logits, teacher, plain["loss_mask"], plain["input_ids"], tail="bucket").kd
    got = crosstok.span_losses(logits, cross, "byte").sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    (grad,) = torch.autograd.grad(got, logits)
    reference = kd_loss(logits, teacher, plain["loss_mask"], plain["input_ids"], tail="bucket")
    reference.total.backward()
    assert torch.allclose(grad, logits.grad, atol=1e-12)


def test_with_identical_tokenizers_uld_is_uld_at_every_position_and_zero_for_the_teacher_itself():
    tok = byte_level(400)
    captures = _same_tokenizer_batch(tok)
    cross = crosstok.collate_cross(captures, crosstok.Retokenizer(tok, tok, max_length=512), pad_id=2)
    plain = collate(captures, k=4, pad_id=2)
    logits = torch.randn(*plain["input_ids"].shape, len(tok), dtype=torch.float64)
    rows = plain["loss_mask"].reshape(-1).nonzero()[:, 0]
    direct = crosstok.uld(
        logits.reshape(-1, len(tok))[rows].log_softmax(-1),
        plain["topk_logprobs"].reshape(-1, 4)[rows].double(),
    )
    assert torch.allclose(crosstok.span_losses(logits, cross, "uld"), direct)
    # a student whose distribution is the teacher's own has ULD 0 (the same sorted masses)
    full = torch.log_softmax(torch.randn(5, 50, dtype=torch.float64), -1)
    top = full.topk(8, -1)
    assert torch.allclose(crosstok.uld(full, top.values), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert (crosstok.uld(full.flip(-1) * 2, top.values) > 0).all()


def test_tokenizers_with_no_shared_token_train_with_uld_and_count_what_cannot_be_aligned():
    teacher = single_bytes()
    student = word_level(["the", " cat", " sat", " on", " the", " mat"])
    assert (crosstok.vocab_map(teacher, student) < 0).all()  # no token spells the same bytes
    ids = teacher("the cat sat on the mat", add_special_tokens=False)["input_ids"]  # a token per byte
    # bytes: the 0-2, " cat" 3-6, " sat" 7-10, " on" 11-13, " the" 14-17, " mat" 18-21; the teacher's
    # distributions from position 5 on (targets: tokens 6..21); the student's context: 5 tokens
    r = crosstok.Retokenizer(teacher, student, max_length=5)
    out = r(ids, start=5)
    assert out.student_ids == [0, 1, 2, 3, 4]
    # "the": no student position predicts it; " cat" starts in the prompt; " mat" is past the context
    assert out.spans == [(7, 11, 2, 3), (11, 14, 3, 4), (14, 18, 4, 5)]
    assert out.targets == 16
    assert out.unaligned == 5  # token 6 (in " cat") and " mat"'s four
    # a late start: the prompt is cut from the left to fit, keeping " on", which predicts " the"
    late = crosstok.Retokenizer(teacher, student, max_length=3)(ids, start=13)
    assert late.student_ids == [3, 4, 5]  # " on the mat"
    assert late.spans == [(14, 18, 1, 2), (18, 22, 2, 3)]
    assert (late.targets, late.unaligned) == (8, 0)
    cross = crosstok.collate_cross([capture(ids, 5, len(teacher), k=4)], r, pad_id=0)
    counts = {k: int(v) for k, v in cross.items() if k.startswith("count_")}
    assert counts == {"count_spans": 3, "count_one_to_one": 0, "count_targets": 16, "count_unaligned": 5}
    logits = torch.zeros(1, len(out.student_ids), len(student), requires_grad=True)
    assert cross["input_ids"].tolist() == [out.student_ids]
    optimizer = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(30):
        loss = crosstok.span_losses(logits, cross, "uld").sum()
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the byte-aligned loss trains there too: every span is merged, so it is the chain rule plus ULD
    merged = crosstok.span_losses(logits, cross, "byte").sum()
    merged.backward()
    assert torch.isfinite(logits.grad).all()


def test_between_two_vocabularies_that_share_some_tokens_both_methods_train():
    teacher, student = byte_level(400), byte_level(300)
    r = crosstok.Retokenizer(teacher, student, max_length=512)
    captures = [
        capture(teacher(text)["input_ids"], 2, len(teacher), k=8, seed=i) for i, text in enumerate(TEXTS[:3])
    ]
    batch = crosstok.collate_cross(captures, r, pad_id=2)
    one = batch["span_one_to_one"]
    assert 0 < int(one.sum()) < len(one)  # both kinds of span
    shared = (batch["span_topk_ids"] >= 0) & one[:, None]
    assert 0 < int(shared.sum()) < int(one.sum()) * 8  # some of the teacher's top-k is shared, some is not
    for method in ("byte", "uld"):
        logits = torch.zeros(*batch["input_ids"].shape, len(student), requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=0.05)
        losses = []
        for _ in range(20):
            loss = crosstok.span_losses(logits, batch, method).sum()
            optimizer.zero_grad()
            loss.backward()
            assert torch.isfinite(logits.grad).all()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], (method, losses[0], losses[-1])


def test_a_merged_span_compares_the_probability_of_its_bytes_by_the_chain_rule():
    # log p(span) = log 0.5 on both sides: the two-outcome KL is 0 and grows as the student moves away
    lp = torch.log(torch.tensor([0.5, 0.5, 0.2, 0.9], dtype=torch.float64))
    zero = crosstok._two_outcome_kl(lp[:1], lp[:1])
    assert zero.item() == pytest.approx(0.0, abs=1e-12)
    p, q = 0.5, 0.2
    expected = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert crosstok._two_outcome_kl(lp[:1], lp[2:3]).item() == pytest.approx(expected, rel=1e-12)


def test_byte_agreement_counts_the_bytes_of_the_continuation_tokens_the_model_predicts():
    from types import SimpleNamespace

    from distill.heldout import byte_agreement

    tok = byte_level(400)
    prompt, continuation = "The café sells", " crème brûlée and naïve tea, and more."
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    tail = tok(continuation, add_special_tokens=False)["input_ids"]
    sizes = [len(b) for b in crosstok.token_bytes(tok)]
    right = {0, 2}  # the model predicts the continuation's tokens 0 and 2, and gets the others wrong

    class Fixed(torch.nn.Module):
        """Reads [BOS, prompt (its last `keep` tokens), continuation] and predicts as `right` says."""

        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, input_ids):
            ids = input_ids[0].tolist()
            assert ids == [tok.bos_token_id, *head[len(head) - self.keep :], *tail]
            logits = torch.zeros(1, len(ids), len(tok))
            first = 1 + self.keep
            for i, t in enumerate(tail):
                logits[0, first - 1 + i, t if i in right else (t + 1) % len(tok)] = 1.0
            return SimpleNamespace(logits=logits)

    out = byte_agreement(Fixed(len(head)), tok, [(prompt, continuation)], max_tokens=64)
    assert out["bytes"] == [float(len(continuation.encode()))]
    assert out["agreed"] == [float(sum(sizes[tail[i]] for i in right))]
    # too long for the context: the prompt is cut from the left, the continuation kept whole
    cut = byte_agreement(Fixed(2), tok, [(prompt, continuation)], max_tokens=1 + 2 + len(tail))
    assert cut == out
