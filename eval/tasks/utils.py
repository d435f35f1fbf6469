"""Documents of distill's local lm-eval tasks, built from the held-out (test) split of the embedded corpus.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`: the YAML's `dataset_kwargs` say which task
(`kind`), and `distill eval` passes the corpus directory in the TaskManager's metadata
(`distill_corpus_dir`), so the YAMLs stay static and nothing is downloaded. Every choice is seeded: the
same corpus always gives the same documents.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORD = re.compile(r"\S+")
CONTEXT_CHARS = (80, 400)  # where a cloze or next-word cut may fall: enough context, short prompts


def _documents(corpus_dir: str | None, split: str) -> list[dict]:
    if not corpus_dir:
        raise ValueError(
            "distill's local tasks read the embedded corpus: run them through `distill eval`, or pass "
            "TaskManager(metadata={'distill_corpus_dir': DIR})"
        )
    path = Path(corpus_dir) / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _phrases(text: str, words: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """(start, end) of each run of `words` words that follows a single space inside [lo, hi] and stays
    on one line: places where the next words are prose, not layout."""
    spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
    out = []
    for i in range(1, len(spans) - words + 1):
        start, end = spans[i][0], spans[i + words - 1][1]
        prose = text[start - 1] == " " and not text[start - 2].isspace() and "\n" not in text[start:end]
        if lo <= start <= hi and prose:
            out.append((start, end))
    return out


def _cloze(docs: list[dict], words: int, choices: int, seed: int) -> list[dict]:
    """Per document: the text up to a cut, the true next `words` words, and distractor phrases of the
    same length taken from other documents."""
    rng = random.Random(seed)
    pool = [(d["id"], d["text"][s:e]) for d in docs for s, e in _phrases(d["text"], words, 0, len(d["text"]))]
    items = []
    for doc in docs:
        cuts = _phrases(doc["text"], words, *CONTEXT_CHARS)
        if not cuts:
            continue
        start, end = rng.choice(cuts)
        gold = doc["text"][start:end]
        options = {gold}
        for _ in range(1000):
            if len(options) == choices:
                break
            other, phrase = rng.choice(pool)
            if other != doc["id"]:
                options.add(phrase)
        options = sorted(options)
        rng.shuffle(options)
        # the context ends before the space; the task's target_delimiter puts it back
        items.append(
            {
                "id": doc["id"],
                "context": doc["text"][: start - 1],
                "choices": options,
                "label": options.index(gold),
            }
        )
    return items


def load_docs(
    distill_corpus_dir=None,
    distill_split="test",
    kind="text",
    distill_seed=1234,
    distill_outside_dir=None,
    **_metadata,
):
    """{"test": Dataset} of one task's documents; lm-eval also passes its own metadata (version, ...).
    `distill_split: outside` reads the out-of-corpus source (distill.heldout) from `distill_outside_dir`."""
    import datasets

    if distill_split == "outside":
        docs = _documents(distill_outside_dir, "outside")
    else:
        docs = _documents(distill_corpus_dir, distill_split)
    if kind == "text":  # perplexity over whole held-out documents
        rows = [{"id": d["id"], "text": d["text"]} for d in docs]
    elif kind == "cloze":  # the true next 3 words among 4 phrases
        rows = _cloze(docs, words=3, choices=4, seed=distill_seed)
    elif kind == "nextword":  # generate the next word
        rows = [
            {"id": r["id"], "context": r["context"], "target": r["choices"][r["label"]]}
            for r in _cloze(docs, words=1, choices=1, seed=distill_seed)
        ]
    else:
        raise ValueError(f"unknown distill task kind {kind!r}")
    return {"test": datasets.Dataset.from_list(rows)}
