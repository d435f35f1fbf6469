"""Held-out human text, and the measures a student is judged by on it, out of reach of its training loss.

Sources of text:
- the corpus's own held-out splits (`validation`, `test`);
- `outside`: text that ships with every Python but is not in the corpus (which reads only pydoc topics
  and docstrings): IDLE's user guide (`idlelib/help.html`), IDLE's change logs and notes (`NEWS.txt`,
  `NEWS2x.txt`, `HISTORY.txt`, `README.txt`, `TODO.txt`, `extend.txt`, `CREDITS.txt`) and Python's
  `LICENSE.txt`: English technical prose of other genres (a user guide, change logs, a license) than the
  corpus's API reference, written by people outside this project.

Measures, per document, with the teacher and the model both in memory (dense, the whole vocabulary):
- bits per byte: the model's next-token NLL summed over the document's tokens / (ln 2 x their UTF-8 bytes);
- full-vocabulary KL(teacher || model), nats per token;
- top-1 agreement: the share of positions where the two argmaxes agree.
Per-document values let any two models be compared paired, over the same documents.
"""

from __future__ import annotations

import html.parser
import json
import math
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import atomic_directory, hash_json, remove_stale_temps, sha256_bytes
from distill.errors import DistillError
from distill.losses import _kl

OUTSIDE_FILES = (
    "idlelib/help.html",
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/HISTORY.txt",
    "idlelib/README.txt",
    "idlelib/TODO.txt",
    "idlelib/extend.txt",
    "idlelib/CREDITS.txt",
    "LICENSE.txt",
)
DOC_CHARS = (200, 1500)  # paragraphs are joined into documents of about this many characters
OUTSIDE_FORMAT = 1


class _HtmlText(html.parser.HTMLParser):
    """The text of an HTML page, a blank line after each block element, scripts and navigation dropped."""

    BLOCKS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "pre", "tr", "section"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.replace("\u00b6", "").split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= 3]  # navigation crumbs and rules are not prose


def _documents(paragraphs: list[str], name: str) -> list[dict]:
    """Consecutive paragraphs joined until a document holds at least DOC_CHARS[0] characters."""
    docs, buffer = [], []
    for para in paragraphs:
        buffer.append(para[: DOC_CHARS[1]])
        if sum(len(p) for p in buffer) >= DOC_CHARS[0]:
            docs.append("\n\n".join(buffer)[: DOC_CHARS[1]])
            buffer = []
    return [{"id": f"{name}:{i}", "text": text} for i, text in enumerate(docs)]


def outside_documents() -> list[dict]:
    """The `outside` source, in a fixed order: same Python, same documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for rel in OUTSIDE_FILES:
        path = stdlib / rel
        if not path.is_file():  # a trimmed Python build; the source is then what is left of it
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if rel.endswith(".html"):
            parser = _HtmlText()
            parser.feed(text)
            text = "".join(parser.parts)
        docs.extend(_documents(_paragraphs(text), rel))
    return docs


def prepare_outside(cache_dir: Path) -> Path:
    """Write (or reuse) `<cache>/heldout/outside-<hash>/outside.jsonl`; returns its directory."""
    docs = outside_documents()
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    key = hash_json({"format": OUTSIDE_FORMAT, "content": sha256_bytes(data)})[:16]
    root = Path(cache_dir) / "heldout" / f"outside-{key}"
    remove_stale_temps(root.parent)
    if not (root / "outside.jsonl").exists():
        with atomic_directory(root) as tmp:
            (tmp / "outside.jsonl").write_bytes(data)
    return root


def require_outside(docs: list, what: str) -> None:
    if not docs:
        raise DistillError(
            f"{what}: this Python has none of the outside text ({', '.join(OUTSIDE_FILES[:2])}, ...; some "
            "Linux distributions package idlelib separately, e.g. apt install idle-python3.11): install it, or "
            "leave the outside source out"
        )


def read_texts(path: Path) -> list[str]:
    return [
        json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


# --------------------------------------------------------------------------- measuring


@dataclass
class Documents:
    """Tokenized documents: `ids[i]` starts with a context token (BOS where the tokenizer has one) and is
    cut at `max_tokens`; `bytes[i]` is the UTF-8 size of the text its predicted tokens cover."""

    ids: list[list[int]]
    bytes: list[int]
    starts: list[int] | None = None  # per document, the first position measured (0: all of them)

    @classmethod
    def responses(cls, captures, tokenizer) -> Documents:
        """The responses of teacher-store rows (`distill.store.Capture`): each whole sequence, measured
        from the position that predicts its first response token; bytes are the response's UTF-8."""
        ids = [list(c.input_ids) for c in captures]
        starts = [c.start for c in captures]
        sizes = [len(tokenizer.decode(c.input_ids[c.start + 1 :]).encode("utf-8")) for c in captures]
        return cls(ids, sizes, starts)

    @classmethod
    def encode(cls, texts: list[str], tokenizer, max_tokens: int, limit: int | None = None) -> Documents:
        """`limit` documents spread evenly over `texts` (every file of a source, not only the first)."""
        ids, sizes = [], []
        bos = tokenizer.bos_token_id
        for text in spread(texts, limit):
            fast = getattr(tokenizer, "is_fast", False)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
            tokens = enc["input_ids"]
            seq = ([bos] + tokens if bos is not None else tokens)[:max_tokens]
            if len(seq) < 2:
                continue
            ids.append(seq)
            # the predicted tokens are seq[1:]: tokens[0:] after a BOS, else tokens[1:]
            predicted = len(seq) - 1
            if not fast:  # no offsets: the decoded text of the predicted tokens
                sizes.append(len(tokenizer.decode(seq[1:]).encode("utf-8")))
                continue
            offsets = enc["offset_mapping"]
            first = 0 if bos is not None else offsets[0][1]  # from the end of the context token
            last = offsets[predicted - 1 if bos is not None else predicted][1]
            sizes.append(len(text[first:last].encode("utf-8")))
        return cls(ids, sizes)


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the list (all of them without a limit)."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def padded(seqs: list[list[int]], device="cpu"):
    """(ids, attention mask), both (B, T) long on `device`: the sequences right-padded with zeros."""
    import torch

    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def measure(
    model, teacher, docs: Documents, batch_size: int = 8, device: str = "cpu"
) -> dict[str, list[float]]:
    """Per document: `nll` (nats, summed), `kl` and `top1` (per-token means), `tokens`, `bytes`.
    `teacher` None measures the NLL alone."""
    import torch

    out: dict[str, list[float]] = {"nll": [], "kl": [], "top1": [], "tokens": [], "bytes": []}
    models = [m for m in (model, teacher) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    with torch.no_grad():
        for lo in range(0, len(docs.ids), batch_size):
            seqs = docs.ids[lo : lo + batch_size]
            ids, mask = padded(seqs, device)
            # NOTE: fp32 log-softmax over the whole vocabulary on both sides, whatever the model dtype.
            log_q = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            log_p = None
            if teacher is not None:
                log_p = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            for b, s in enumerate(seqs):
                n = len(s) - 1
                first = docs.starts[lo + b] if docs.starts else 0
                q = log_q[b, first:n]
                target = ids[b, first + 1 : n + 1]
                out["nll"].append(-q.gather(-1, target[:, None]).sum().item())
                out["tokens"].append(n - first)
                if log_p is not None:
                    # NOTE: a padded vocabulary may differ in size between the two: compare the shared ids
                    # (the padding has no probability), with 0 log 0 = 0 for masked (-inf) entries.
                    v = min(log_p.size(-1), log_q.size(-1))
                    p, qv = log_p[b, first:n, :v], q[:, :v]
                    out["kl"].append(_kl(p, qv).mean().item())
                    out["top1"].append((p.argmax(-1) == qv.argmax(-1)).double().mean().item())
            out["bytes"].extend(docs.bytes[lo : lo + batch_size])
    for m, mode in zip(models, was_training, strict=True):
        m.train(mode)
    return out


def byte_agreement(model, tokenizer, pairs: list[tuple[str, str]], max_tokens: int, device: str = "cpu"):
    """Agreement with a teacher's greedy text in bytes, whatever the two tokenizers: per (prompt,
    continuation) pair, the model reads the prompt and the teacher's continuation in its own tokens,
    and at each continuation token its argmax either is that token (its bytes count as reproduced) or
    not. Returns per pair `agreed` and `bytes` (the continuation's bytes within `max_tokens`); the
    share is sum(agreed) / sum(bytes). A teacher measured on its own greedy text gets 1.

    The prompt is cut from the left when the pair does not fit in `max_tokens`."""
    import torch

    from distill.crosstok import token_bytes

    sizes = [len(b) for b in token_bytes(tokenizer, "model")]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out: dict[str, list[float]] = {"agreed": [], "bytes": []}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt, continuation in pairs:
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = tokenizer(continuation, add_special_tokens=False)["input_ids"][: max_tokens - len(bos) - 1]
            head = head[max(0, len(head) - (max_tokens - len(bos) - len(tail))) :]
            ids = torch.tensor([bos + head + tail], device=device)
            first = len(bos) + len(head)  # the position of the continuation's first token
            if first < 1 or not tail:
                raise ValueError(
                    f"byte agreement needs a prompt and a continuation (got {prompt!r}, {continuation!r})"
                )
            guess = model(input_ids=ids).logits[0, first - 1 : -1].argmax(-1).tolist()
            out["agreed"].append(float(sum(sizes[t] for g, t in zip(guess, tail, strict=True) if g == t)))
            out["bytes"].append(float(sum(sizes[t] for t in tail)))
    model.train(was_training)
    return out


def summarize(per_doc: dict[str, list[float]]) -> dict[str, float]:
    """Aggregate figures: bits_per_byte over all bytes, kl and top1 as means over documents (the unit of
    the paired comparisons)."""
    if not per_doc["nll"]:
        raise DistillError("no held-out documents to measure")
    row = {"bits_per_byte": sum(per_doc["nll"]) / (math.log(2) * sum(per_doc["bytes"]))}
    if per_doc["kl"]:
        row["kl"] = sum(per_doc["kl"]) / len(per_doc["kl"])
        row["top1_agreement"] = sum(per_doc["top1"]) / len(per_doc["top1"])
    row["documents"] = len(per_doc["nll"])
    return row


def serving_prompts(bench, tokens_dir: Path) -> list[list[int]]:
    """The serving benchmark's prompts (recipe section serve.bench): the openings of the corpus's test
    blocks, as token ids. The eval stage's expected acceptance predicts on the same prompts."""
    from distill.training.onpolicy import Prompts

    prompts = Prompts.from_blocks(Path(tokens_dir) / "test.npy", bench.prompt_tokens, bench.requests)
    if not prompts.ids:
        raise DistillError(
            f"the test split has fewer than serve.bench.prompt_tokens={bench.prompt_tokens} tokens"
        )
    return prompts.ids
