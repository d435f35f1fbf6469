"""Cross-tokenizer distillation: a student that splits the teacher's text into other tokens.

The teacher store keeps the teacher's token ids. Each id's byte string comes from the teacher's own
vocabulary (`token_bytes`), so a stored sequence turns back into the exact bytes the teacher saw. The
student re-tokenizes those bytes, and the two tokenizations are aligned on the byte offsets where both
have a token boundary (`align`). Between two such common boundaries lies a *span*: a run of teacher
tokens and a run of student tokens that spell the same bytes, both predicted from the same text before
the span. A span is one-to-one (one token on each side, the usual case between similar vocabularies) or
merged (several tokens on at least one side).

Two losses compare the sides span by span (`span_losses`):
- `uld`: Universal Logit Distillation (Boizard et al., 2024). At each span's first position, the
  Wasserstein-1 distance between the two next-token distributions sorted by probability, which needs no
  shared vocabulary: sum_j |p_(j) - q_(j)| over the teacher's top-k ranks, plus the difference of the mass
  each leaves outside its top-k.
- `byte` (byte-aligned, in the manner of GOLD): on a one-to-one span, the recipe's divergence between the
  two distributions over the tokens whose byte strings both vocabularies share (`vocab_map`: the teacher's
  top-k ids mapped to the student's, plus one bin for all the rest), and ULD between what each side puts on
  tokens outside that shared head; on a merged span, the chain rule: the probability each side gives the
  span's bytes is the product of its tokens' probabilities, and the two are compared as a two-outcome
  distribution (the span, or anything else), plus ULD at the span's first position.
With identical tokenizers every span is one-to-one and every token shared, so `byte` is the
same-tokenizer loss with its tail in one bucket, and `uld` is ULD at every position.

Positions that cannot be aligned are counted and left out, never guessed: a span that starts in the
prompt and ends in the completion, student tokens past the student's context, bytes past the first
invalid UTF-8 sequence (a sampled token that ends mid-character), and a whole sequence whose
re-tokenization does not spell its bytes (a normalizing tokenizer).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.artifacts import atomic_write_bytes, hash_json, remove_stale_temps
from distill.errors import DistillError

METHODS = ("uld", "byte")
VOCAB_MAP_FORMAT = 1


# --------------------------------------------------------------------------- vocabularies as bytes


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of every byte in byte-level BPE vocabularies (GPT-2's scheme):
    bytes that are printable Latin-1 stand for themselves; the other 68, in order, for U+0100 onwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_in = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in stand_in]
    stand_in.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return {c: b for b, c in stand_in.items()}


def _decoder_kind(spec: dict[str, Any] | None) -> str | None:
    """`byte_level`, `sentencepiece` or None, from a tokenizer.json `decoder` entry."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":
        return "byte_level"
    if kind == "Metaspace":
        return "sentencepiece"
    if kind == "Sequence":
        parts = spec.get("decoders", [])
        if any(p.get("type") == "ByteLevel" for p in parts):
            return "byte_level"
        replaces_space = any(
            p.get("type") == "Replace" and p.get("content") == " " and "▁" in json.dumps(p.get("pattern"))
            for p in parts
        )
        if replaces_space or any(p.get("type") in ("Metaspace", "ByteFallback") for p in parts):
            return "sentencepiece"
    return None


def token_bytes(tokenizer, what: str = "student") -> list[bytes]:
    """The byte string of every token id of a Hugging Face fast tokenizer (added tokens: their content).

    Raises DistillError for a tokenizer whose tokens cannot be placed on bytes (a slow tokenizer, or a
    decoder other than byte-level BPE's or SentencePiece's).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    where = getattr(tokenizer, "name_or_path", "") or "(in memory)"
    if backend is None:
        raise DistillError(
            f"the {what} tokenizer at {where} is a slow tokenizer, without byte offsets: cross-tokenizer "
            "distillation needs a fast (tokenizer.json) one"
        )
    kind = _decoder_kind(json.loads(backend.to_str()).get("decoder"))
    if kind is None:
        raise DistillError(
            f"the {what} tokenizer at {where} has no byte offsets distill can read (its decoder is neither "
            "byte-level BPE nor SentencePiece): cross-tokenizer distillation cannot place its tokens on bytes"
        )
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes] = []
    if kind == "byte_level":
        alphabet = _byte_level_alphabet()
        for i, piece in enumerate(pieces):
            if i in added or piece is None:
                out.append(added.get(i, "").encode())
            elif all(c in alphabet for c in piece):
                out.append(bytes(alphabet[c] for c in piece))
            else:
                out.append(piece.encode())  # not a byte-level piece: its text
        return out
    for i, piece in enumerate(pieces):
        if i in added or piece is None:
            out.append(added.get(i, "").encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))  # SentencePiece's byte fallback
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def tokenizer_identity(tokenizer) -> str:
    """A content hash of a fast tokenizer (its tokenizer.json as loaded, and its added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return hash_json({"tokenizer": backend.to_str() if backend is not None else repr(tokenizer)})


def same_tokenizer(a, b) -> bool:
    return tokenizer_identity(a) == tokenizer_identity(b)


def build_vocab_map(teacher_bytes: list[bytes], student_bytes: list[bytes]) -> np.ndarray:
    """For every teacher id, the student id with the same byte string, or -1. The lowest such student id
    wins (deterministic), and empty strings map to nothing."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b and b not in index:
            index[b] = i
    return np.array([index.get(b, -1) if b else -1 for b in teacher_bytes], dtype=np.int64)


def vocab_map(teacher_tokenizer, student_tokenizer, cache_dir: Path | str | None = None) -> np.ndarray:
    """`build_vocab_map` of two tokenizers, built once and cached under `<cache>/vocab-maps/`."""
    key = hash_json(
        {
            "format": VOCAB_MAP_FORMAT,
            "teacher": tokenizer_identity(teacher_tokenizer),
            "student": tokenizer_identity(student_tokenizer),
        }
    )[:16]
    path = Path(cache_dir) / "vocab-maps" / f"{key}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        return np.load(path)
    built = build_vocab_map(token_bytes(teacher_tokenizer, "teacher"), token_bytes(student_tokenizer))
    if path is not None:
        remove_stale_temps(path.parent)
        buffer = io.BytesIO()
        np.save(buffer, built)
        atomic_write_bytes(path, buffer.getvalue())
    return built


# --------------------------------------------------------------------------- alignment


def align(teacher_lengths, student_lengths) -> list[tuple[int, int, int, int]]:
    """Spans (a, b, c, d) of two tokenizations of the same bytes, given each token's byte length:
    teacher tokens [a, b) and student tokens [c, d) spell the same bytes, and both runs start on a byte
    offset where each side has a token boundary. Zero-length tokens before the first byte (a BOS) belong
    to no span; one elsewhere joins the span it ends in. Bytes past the shorter side are left out."""
    t_ends = np.cumsum(np.asarray(teacher_lengths, dtype=np.int64))
    s_ends = np.cumsum(np.asarray(student_lengths, dtype=np.int64))
    limit = min(int(t_ends[-1]) if len(t_ends) else 0, int(s_ends[-1]) if len(s_ends) else 0)
    common = np.intersect1d(t_ends[t_ends <= limit], s_ends[s_ends <= limit])
    common = common[common > 0]
    spans, previous = [], 0
    for end in common:
        a, b = np.searchsorted(t_ends, previous, "right"), np.searchsorted(t_ends, end, "right")
        c, d = np.searchsorted(s_ends, previous, "right"), np.searchsorted(s_ends, end, "right")
        spans.append((int(a), int(b), int(c), int(d)))
        previous = end
    return spans


def _valid_utf8_prefix(data: bytes) -> int:
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as e:
        return e.start


@dataclass
class Retokenized:
    """One stored sequence as the student reads it."""

    student_ids: list[int]
    spans: list[tuple[int, int, int, int]]  # used for the loss (see `align`)
    completion_start: int  # first student token whose bytes lie in the teacher's completion
    unaligned: int  # teacher target tokens that no used span covers
    targets: int  # teacher target tokens (positions with a distribution)


class Retokenizer:
    """Turns teacher token ids into the student's tokens and the spans between them."""

    def __init__(self, teacher_tokenizer, student_tokenizer, max_length: int, cache_dir=None):
        self.teacher_bytes = token_bytes(teacher_tokenizer, "teacher")
        self.student_bytes = token_bytes(student_tokenizer)
        self.student = student_tokenizer
        self.map = vocab_map(teacher_tokenizer, student_tokenizer, cache_dir)
        self.max_length = max_length
        probe = student_tokenizer("")["input_ids"]
        bos = student_tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and probe and probe[0] == bos else []

    def __call__(self, teacher_ids: list[int], start: int) -> Retokenized:
        """`start`: the first teacher position with a distribution (over token start + 1).

        Bytes that are not whole UTF-8 characters get no student token: a sequence cut from a document
        may begin inside a character (its first bytes are skipped) or end inside one (its last are), and
        anything after an invalid byte in the middle is dropped. A sequence longer than the student's
        context loses prompt tokens from the left first (the student then reads a shorter prompt), then
        completion tokens from the right. Spans whose student context lost bytes are not used."""
        lengths = [len(self.teacher_bytes[t]) for t in teacher_ids]
        text = b"".join(self.teacher_bytes[t] for t in teacher_ids)
        targets = len(teacher_ids) - 1 - start
        lead = 0
        while lead < min(3, len(text)) and text[lead] & 0xC0 == 0x80:  # UTF-8 continuation bytes
            lead += 1
        end = lead + _valid_utf8_prefix(text[lead:])
        ids = self.student(text[lead:end].decode("utf-8"), add_special_tokens=False)["input_ids"]
        s_lengths = [len(self.student_bytes[i]) for i in ids]
        spelled = b"".join(self.student_bytes[i] for i in ids)
        if spelled != text[lead:end] and spelled == b" " + text[lead:end] and s_lengths and s_lengths[0] >= 1:
            s_lengths[0] -= 1  # SentencePiece's dummy prefix: a space that is not in the text
        elif spelled != text[lead:end]:  # a normalizing tokenizer: nothing can be aligned
            ids = (self.prefix + ids)[: self.max_length]
            return Retokenized(ids, [], len(self.prefix), targets, targets)
        # the student's tokens placed on the teacher's bytes: its BOS (no bytes; unless the text begins
        # with it), then the skipped leading bytes as a placeholder that is no token, then its tokens
        head = self.prefix if self.prefix and ids[:1] != self.prefix else []
        skipped = 1 if lead else 0
        placed = [0] * len(head) + [lead] * skipped + s_lengths
        spans = [sp for sp in align(lengths, placed) if sp[0] - 1 >= start]
        completion = int(np.searchsorted(np.cumsum(placed), sum(lengths[: start + 1]), "right"))
        body = len(head) + skipped  # placed index of the student's first token
        cut = 0  # prompt tokens dropped from the left, keeping the one that predicts the completion
        if len(head) + len(ids) > self.max_length:
            cut = min(len(head) + len(ids) - self.max_length, max(completion - 1 - body, 0))
        dropped = skipped + cut  # placed entries after the head that the student does not read
        ids = (head + ids[cut:])[: self.max_length]
        first = len(head) + dropped if dropped else 0  # the first placed position with its whole context
        spans = [
            (a, b, c - dropped, d - dropped)
            for a, b, c, d in spans
            if c - 1 >= first and d - dropped <= len(ids)
        ]
        covered = sum(b - a for a, b, _, _ in spans)
        return Retokenized(ids, spans, max(completion - dropped, len(head)), targets - covered, targets)


# --------------------------------------------------------------------------- batches


def collate_cross(captures, retokenizer: Retokenizer, pad_id: int) -> dict[str, Any]:
    """Store rows (`distill.store.Capture`) -> the student's padded batch, with the N aligned spans of its
    rows as tensors:

        input_ids, attention_mask (B, T); loss_mask (B, T): position t predicts a completion token (the
        CE targets); span_rows (N,): the flat index b * T + (c - 1) of the student position that predicts
        the span; span_topk_ids, span_topk_logprobs (N, K): the teacher's top-k at the span's first
        position, as student ids (-1: no student token spells it); span_one_to_one (N,); chain_rows,
        chain_ids, chain_mask (N, L): the student positions c - 1 .. d - 2 and the tokens c .. d - 1 they
        predict; teacher_chain (N,): the teacher's log-probability of the span's bytes (its tokens,
        chain rule); count_spans, count_one_to_one, count_targets, count_unaligned: 0-dim.
    """
    import torch

    seqs = [retokenizer(list(c.input_ids), c.start) for c in captures]
    B, T = len(seqs), max(len(s.student_ids) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    rows, topk_ids, topk_logprobs, one, chains, teacher_chain = [], [], [], [], [], []
    for b, (c, s) in enumerate(zip(captures, seqs, strict=True)):
        n = len(s.student_ids)
        input_ids[b, :n] = torch.tensor(s.student_ids)
        attention_mask[b, :n] = 1
        loss_mask[b, max(s.completion_start - 1, 0) : n - 1] = True
        for a, e, cs, d in s.spans:
            p = a - 1 - c.start  # the teacher's stored position that predicts its token a
            rows.append(b * T + cs - 1)
            topk_ids.append(retokenizer.map[np.asarray(c.topk_ids[p], dtype=np.int64)])
            topk_logprobs.append(np.asarray(c.topk_logprobs[p], dtype=np.float32))
            one.append(e - a == 1 and d - cs == 1)
            chains.append(([b * T + j - 1 for j in range(cs, d)], s.student_ids[cs:d]))
            teacher_chain.append(float(np.sum(c.token_logprobs[p : p + e - a], dtype=np.float64)))
    K = captures[0].topk_ids.shape[1]
    N, L = len(rows), max((len(ids) for _, ids in chains), default=1)
    chain_rows = torch.zeros((N, L), dtype=torch.long)
    chain_ids = torch.zeros((N, L), dtype=torch.long)
    for i, (positions, ids) in enumerate(chains):
        chain_rows[i, : len(ids)] = torch.tensor(positions)
        chain_ids[i, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for _, ids in chains], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "span_rows": torch.tensor(rows, dtype=torch.long),
        "span_topk_ids": torch.from_numpy(np.stack(topk_ids)) if N else torch.full((0, K), -1),
        "span_topk_logprobs": torch.from_numpy(np.stack(topk_logprobs)) if N else torch.zeros((0, K)),
        "span_one_to_one": torch.tensor(one, dtype=torch.bool),
        "chain_rows": chain_rows,
        "chain_ids": chain_ids,
        "chain_mask": torch.arange(L)[None, :] < lengths[:, None],
        "teacher_chain": torch.tensor(teacher_chain, dtype=torch.float32),
        "count_spans": torch.tensor(N),
        "count_one_to_one": torch.tensor(int(sum(one))),
        "count_targets": torch.tensor(sum(s.targets for s in seqs)),
        "count_unaligned": torch.tensor(sum(s.unaligned for s in seqs)),
    }


# --------------------------------------------------------------------------- losses


def _head_mask(ids, live, vocab: int):
    """(N, V) bool: the live ids of each row."""
    import torch

    safe = ids.clamp(min=0)
    hits = torch.zeros(ids.size(0), vocab, dtype=torch.float32, device=ids.device)
    return hits.scatter_add_(1, safe, live.float()) > 0


def _first_occurrence(ids):
    """(N, K) bool: an id not seen at a lower rank of its row (two teacher tokens with one byte string)."""
    import torch

    same = ids[:, :, None] == ids[:, None, :]
    earlier = torch.ones(ids.size(1), ids.size(1), dtype=torch.bool, device=ids.device).tril(-1)
    return ~(same & earlier).any(-1)


def uld(log_q, teacher_logprobs, rank_mask=None):
    """Wasserstein-1 between sorted distributions, per row: sum_j |p_(j) - q_(j)| over the teacher's K
    ranks (the student's top K by probability), plus |p_rest - q_rest| for the mass outside each top K.
    `rank_mask` (N, K) keeps only some of the teacher's entries (and as many of the student's top ones)
    and leaves the rest-of-mass term out."""
    import torch

    p = teacher_logprobs.exp()
    if rank_mask is not None:
        p = torch.where(rank_mask, p, torch.zeros_like(p))
    p_sorted = p.sort(-1, descending=True).values
    k = p.size(-1)
    q_top = log_q.topk(min(k, log_q.size(-1)), -1).values.exp()
    if q_top.size(-1) < k:
        q_top = torch.cat([q_top, q_top.new_zeros(q_top.size(0), k - q_top.size(-1))], -1)
    if rank_mask is not None:
        used = torch.arange(k, device=p.device)[None, :] < rank_mask.sum(-1, keepdim=True)
        return torch.where(used, (p_sorted - q_top).abs(), torch.zeros_like(p_sorted)).sum(-1)
    rest = ((1 - p.sum(-1)).clamp(min=0) - (1 - q_top.sum(-1)).clamp(min=0)).abs()
    return (p_sorted - q_top).abs().sum(-1) + rest


def _shared_bins(log_q, ids, teacher_logprobs):
    """Both sides over the shared head (the teacher's top-k ids that map to a student id, each once) plus
    one bin for everything else: (N, K + 1) log-probs, -inf at ranks that are not shared; also which
    ranks are shared (N, K), and the student's log-probs with the shared head masked out (N, V)."""
    import torch

    from distill.losses import _log1mexp

    live = (ids >= 0) & _first_occurrence(ids)
    minus_inf = torch.full_like(teacher_logprobs, -math.inf)
    head_p = torch.where(live, teacher_logprobs, minus_inf)
    rest_p = _log1mexp(torch.logsumexp(head_p, -1).clamp(max=0))
    head_q = torch.where(live, log_q.gather(-1, ids.clamp(min=0)), minus_inf.to(log_q.dtype))
    outside = log_q.masked_fill(_head_mask(ids, live, log_q.size(-1)), -math.inf)
    rest_q = outside.logsumexp(-1)
    bins_p = torch.cat([head_p, rest_p[:, None]], -1).log_softmax(-1)
    bins_q = torch.cat([head_q, rest_q[:, None]], -1)
    return bins_p, bins_q, live, outside


def _two_outcome_kl(log_p, log_q):
    """KL between (p, 1 - p) and (q, 1 - q), given log p and log q (<= 0)."""
    import torch

    from distill.losses import _log1mexp

    p = log_p.exp()
    other = torch.where(p < 1, (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q)), torch.zeros_like(p))
    return p * (log_p - log_q) + other


def span_losses(logits, batch: dict[str, Any], method: str, divergence_name: str = "forward_kl",
                uld_weight: float = 1.0, beta: float = 0.5, alpha: float = 0.1):  # fmt: skip
    """Per-span losses (N,) of the student's logits (B, T, V) against the teacher's spans (module doc)."""
    import torch

    from distill.losses import divergence

    if method not in METHODS:
        raise ValueError(f"unknown cross-tokenizer method {method!r}; expected one of {METHODS}")
    flat = logits.reshape(-1, logits.size(-1))
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    log_q = flat.index_select(0, batch["span_rows"]).log_softmax(-1)
    lps = batch["span_topk_logprobs"].to(log_q.dtype)
    if method == "uld":
        return uld(log_q, lps)
    bins_p, bins_q, live, outside = _shared_bins(log_q, batch["span_topk_ids"], lps)
    # ULD between the teacher's unshared top-k entries and the student's mass outside the shared head
    exact = divergence(bins_p, bins_q, divergence_name, beta, alpha) + uld_weight * uld(outside, lps, ~live)
    # chain rule: log q(span) = sum of the student's log-probs of the span's tokens (each from its logit
    # and its row's logsumexp: no (N, L, V) copy)
    rows, chain_ids = batch["chain_rows"], batch["chain_ids"]
    token_lp = flat[rows, chain_ids] - flat.logsumexp(-1)[rows]
    student_chain = torch.where(batch["chain_mask"], token_lp, torch.zeros_like(token_lp)).sum(-1)
    teacher_chain = batch["teacher_chain"].to(log_q.dtype).clamp(max=0)
    merged = _two_outcome_kl(teacher_chain, student_chain) + uld_weight * uld(log_q, lps)
    return torch.where(batch["span_one_to_one"], exact, merged)
