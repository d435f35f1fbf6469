"""Held-out text and the measures on it (distill/heldout.py): the outside source, byte counts, and the
per-document NLL, full-vocabulary KL and top-1 agreement against plain formulas."""

import math

import pytest
import torch

from distill.heldout import Documents, measure, outside_documents, spread, summarize
from distill.losses import cross_entropy
from distill.models import build_tiny_llama
from distill.tokenizer import load_tokenizer

from .test_train import MODEL


def test_outside_text_ships_with_python_and_is_not_in_the_corpus(prepared):
    docs = outside_documents()
    assert len(docs) > 300 and docs == outside_documents()  # deterministic
    assert {d["id"].split(":")[0] for d in docs} >= {"idlelib/help.html", "idlelib/NEWS.txt", "LICENSE.txt"}
    assert all(200 <= len(d["text"]) <= 1500 for d in docs)
    corpus = "\n".join(t for split in ("train", "validation", "test") for t in prepared.corpus.texts(split))
    inside = [d["id"] for d in docs if d["text"][:120] in corpus]
    assert len(inside) <= len(docs) // 100, inside  # at most a stray sentence the docs quote


def test_byte_counts_cover_exactly_the_predicted_tokens(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    texts = [
        "Lists are mutable sequences, typically used to store collections of items.",
        "  two spaces first",
    ]
    with_bos = Documents.encode(texts, tok, max_tokens=512)
    assert [ids[0] for ids in with_bos.ids] == [tok.bos_token_id] * 2
    assert with_bos.bytes == [len(t.encode()) for t in texts]  # every token is predicted, after BOS
    tok.bos_token = None
    assert tok.bos_token_id is None
    no_bos = Documents.encode(texts, tok, max_tokens=512)
    for text, ids, size in zip(texts, no_bos.ids, no_bos.bytes, strict=True):
        first = len(tok.decode(ids[:1]).encode())  # the context token is not predicted
        assert size == len(text.encode()) - first
    cut = Documents.encode(texts[:1], tok, max_tokens=4)
    assert len(cut.ids[0]) == 4 and cut.bytes[0] == len(tok.decode(cut.ids[0][1:]).encode())


def test_spread_takes_every_part_of_the_list():
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]


def test_measures_match_the_plain_formulas(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    docs = Documents.encode(prepared.corpus.texts("test")[:6], tok, max_tokens=40)
    student = build_tiny_llama(MODEL, tok, seed=1).eval()
    teacher = build_tiny_llama(MODEL, tok, seed=2).eval()
    got = measure(student, teacher, docs, batch_size=4)  # batches of ragged, padded documents
    for i, ids in enumerate(docs.ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            log_q = student(input_ids=x).logits[0, :-1].log_softmax(-1)
            log_p = teacher(input_ids=x).logits[0, :-1].log_softmax(-1)
        nll, n = cross_entropy(student(input_ids=x).logits.detach(), x)
        assert got["nll"][i] == pytest.approx(nll.item(), rel=1e-4) and got["tokens"][i] == n
        assert got["kl"][i] == pytest.approx((log_p.exp() * (log_p - log_q)).sum(-1).mean().item(), rel=1e-4)
        assert got["top1"][i] == pytest.approx((log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item())
    row = summarize(got)
    assert row["bits_per_byte"] == pytest.approx(sum(got["nll"]) / math.log(2) / sum(docs.bytes))
    itself = summarize(measure(teacher, teacher, docs))
    assert itself["kl"] == pytest.approx(0.0, abs=1e-6) and itself["top1_agreement"] == 1.0
