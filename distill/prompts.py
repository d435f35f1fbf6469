"""Instruction prompt sets: read the way users have them, checked, and formatted for the teacher.

A prompt set (`data.prompts`) is a local .jsonl or .parquet file, a dataset directory, or a Hugging Face
dataset name loaded with `datasets`, or `instructions`: a deterministic set built from the corpus
(explain, summarise or answer about a passage), so that everything runs offline. Each row has a
`messages` column (OpenAI chat format: role and content) or a `prompt` column with an optional
`response`; a final assistant message is the row's response.

Stage prepare normalises the rows once into `<cache>/prompts/<key>/{prompts,heldout}.jsonl`; generation
formats each with the tokenizer's chat template (`add_generation_prompt`), and a response, when there is
one, becomes the tokens after that prompt (so the loss masks the prompt and counts the response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.artifacts import (
    atomic_directory,
    atomic_write_json,
    hash_json,
    read_json,
    sha256_bytes,
    sha256_file,
)
from distill.errors import DistillError

FORMAT = 1
ROLES = ("system", "developer", "user", "assistant", "tool")
BUILT = "instructions"
FIELD = "data.prompts"


@dataclass(frozen=True)
class PromptSet:
    """A prepared prompt set: `prompts.jsonl` (generation) and `heldout.jsonl` (evaluation), each row
    {"id", "messages": [...]} or, with data.chat false, {"id", "text"}, and an optional "response"."""

    root: Path

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "manifest.json")

    def rows(self, split: str = "train") -> list[dict]:
        path = self.root / ("prompts.jsonl" if split == "train" else "heldout.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def path(self) -> Path:
        return self.root / "prompts.jsonl"


# --------------------------------------------------------------------------- reading


def read_rows(spec: str, split: str) -> tuple[list[dict], dict]:
    """The rows of a prompt file, directory or dataset name, and what identifies their content."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DistillError(f"{FIELD}: {path} line {n} is not JSON ({exc.msg})") from None
            return rows, {"file": path.name, "sha256": sha256_file(path)}
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), {"file": path.name, "sha256": sha256_file(path)}
        raise DistillError(f"{FIELD}: {path}: expected a .jsonl or .parquet file, or a dataset directory")
    if path.is_dir():
        return _dataset(path, split, local=True)
    if path.suffix in (".jsonl", ".parquet", ".json") or spec.startswith((".", "/", "~")):
        raise DistillError(f"{FIELD}: no such file or directory: {path}")
    return _dataset(spec, split, local=False)  # a dataset name (owner/name) on the Hugging Face hub


def _dataset(source: Path | str, split: str, local: bool) -> tuple[list[dict], dict]:
    """A `datasets` dataset: a save_to_disk directory, a directory of data files, or a hub name."""
    import datasets

    try:
        if local and ((source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(source))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DistillError(
                        f"data.prompts_split: {source} has no split {split!r} (it has {', '.join(loaded)})"
                    )
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(source), split=split)
    except DistillError:
        raise
    except Exception as exc:
        where = (
            "the dataset directory" if local else "no local file or directory, and the Hugging Face dataset"
        )
        raise DistillError(
            f"{FIELD}: {source}: {where} could not be loaded ({type(exc).__name__}: {exc})"
        ) from None
    rows = loaded.to_list()
    return rows, {"dataset": str(source) if not local else Path(source).name, "split": split,
                  "fingerprint": getattr(loaded, "_fingerprint", None), "rows_hash": hash_json(rows)}  # fmt: skip


# --------------------------------------------------------------------------- checking


def normalise(rows: list[dict], chat: bool, where: str) -> list[dict]:
    """Rows as {"id", "messages"} (chat) or {"id", "text"}, each with "response" when given; one clear
    line for a row distill cannot read."""
    if not rows:
        raise DistillError(f"{FIELD}: {where} has no rows")
    columns = set(rows[0])
    if "messages" not in columns and "prompt" not in columns:
        raise DistillError(
            f"{FIELD}: {where} has neither a 'messages' nor a 'prompt' column (columns: "
            f"{', '.join(sorted(columns)) or 'none'})"
        )
    out = []
    for n, row in enumerate(rows):
        item: dict[str, Any] = {"id": str(row.get("id", f"q{n:06d}"))}
        if row.get("messages") is not None:
            if not chat:
                raise DistillError(
                    f"{FIELD}: {where} row {n}: 'messages' need the chat template, and data.chat is false"
                )
            messages = _messages(row["messages"], f"{where} row {n}")
            if messages[-1]["role"] == "assistant":
                item["response"] = messages.pop()["content"]
            if not messages:
                raise DistillError(f"{FIELD}: {where} row {n}: no message before the assistant's")
            item["messages"] = messages
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise DistillError(f"{FIELD}: {where} row {n}: 'prompt' is {prompt!r}, not a text")
            if chat:
                item["messages"] = [{"role": "user", "content": prompt}]
            else:
                item["text"] = prompt
        response = row.get("response")
        if response is not None:
            if not isinstance(response, str):
                raise DistillError(f"{FIELD}: {where} row {n}: 'response' is {response!r}, not a text")
            item["response"] = response
        out.append(item)
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise DistillError(f"{FIELD}: {where}: its 'id' column repeats ids")
    return out


def _messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DistillError(f"{FIELD}: {where}: 'messages' is not a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DistillError(f"{FIELD}: {where}: message {i} is not a {{'role', 'content'}} object")
        if m["role"] not in ROLES:
            raise DistillError(
                f"{FIELD}: {where}: message {i} has role {m['role']!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(m["content"], str):
            raise DistillError(f"{FIELD}: {where}: message {i}'s content is not a text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# --------------------------------------------------------------------------- the built set

TASKS = (
    "Explain the following passage from Python's documentation in plain words.",
    "Summarise this passage in two or three sentences.",
    "What is the main point of this passage? Answer briefly.",
    "List the key facts this passage states.",
)


def instructions(train_texts: list[str], count: int, passage_chars: int = 480) -> list[dict]:
    """`count` instruction prompts about passages of the corpus's train documents, the same every time:
    documents in the order of their text's hash, a passage cut at a paragraph or word boundary, the task
    cycling through TASKS."""
    ranked = sorted(
        (t for t in train_texts if len(t) >= passage_chars // 2), key=lambda t: sha256_bytes(t.encode())
    )
    rows = []
    for n, text in enumerate(ranked[:count]):
        passage = text[:passage_chars]
        if len(text) > passage_chars:
            cut = max(passage.rfind("\n\n"), passage.rfind(". ") + 1, passage.rfind(" "))
            passage = passage[:cut] if cut > passage_chars // 2 else passage
        rows.append({"id": f"i{n:05d}", "prompt": f"{TASKS[n % len(TASKS)]}\n\n{passage.strip()}"})
    if len(rows) < count:
        raise DistillError(f"{FIELD}: instructions: asked for {count} prompts, the corpus yields {len(rows)}")
    return rows


# --------------------------------------------------------------------------- preparing


def prepare_prompts(cfg, train_texts: list[str], cache_dir: Path) -> PromptSet:
    """Read, check and split `cfg.prompts` (a DataConfig) into a cached PromptSet: `heldout_prompts` rows
    (the ones whose id hashes lowest) for evaluation, then up to `num_prompts` for generation."""
    if cfg.prompts == BUILT:
        rows, source = (
            instructions(train_texts, cfg.num_prompts + cfg.heldout_prompts),
            {"built": BUILT, "corpus": hash_json(train_texts)},
        )
        where = "the instructions built from the corpus"
    else:
        rows, source = read_rows(cfg.prompts, cfg.prompts_split)
        where = str(cfg.prompts)
    settings = {"chat": cfg.chat, "num_prompts": cfg.num_prompts, "heldout_prompts": cfg.heldout_prompts}
    key = hash_json({"format": FORMAT, "source": source, **settings})[:16]
    root = Path(cache_dir) / "prompts" / key
    if (root / "manifest.json").exists():
        return PromptSet(root)
    items = normalise(rows, cfg.chat, where)
    order = sorted(range(len(items)), key=lambda i: sha256_bytes(items[i]["id"].encode()))
    held = set(order[: cfg.heldout_prompts])
    if len(items) <= cfg.heldout_prompts:
        raise DistillError(
            f"data.heldout_prompts: {where} has {len(items)} rows, none left for generation after holding "
            f"out {cfg.heldout_prompts}"
        )
    heldout = [items[i] for i in sorted(held)]
    train = [item for i, item in enumerate(items) if i not in held][: cfg.num_prompts]
    with atomic_directory(root) as tmp:
        for name, part in (("prompts.jsonl", train), ("heldout.jsonl", heldout)):
            (tmp / name).write_text(
                "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in part)
            )
        atomic_write_json(
            tmp / "manifest.json",
            {"format": FORMAT, "source": source, "settings": settings, "prompts": len(train),
             "heldout": len(heldout), "with_response": sum("response" in r for r in train),
             "sha256": sha256_file(tmp / "prompts.jsonl")},
        )  # fmt: skip
    return PromptSet(root)


# --------------------------------------------------------------------------- formatting


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(
            f"data.chat: the prompts are chat messages, and the tokenizer at {where} has no chat template "
            "(set data.chat: false to give the teacher plain-text prompts, or use a tokenizer with one)"
        )


def encode(row: dict, tokenizer) -> tuple[list[int], list[int] | None]:
    """The prompt's token ids (the chat template with the generation prompt, or the plain text) and the
    response's, when the row has one: the tokens the template puts after the prompt, up to and including
    the first end-of-sequence token (as the teacher's own samples end)."""
    if "messages" in row:
        prompt = _ids(
            tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
        )
        if "response" not in row:
            return prompt, None
        full = _ids(
            tokenizer.apply_chat_template(
                [*row["messages"], {"role": "assistant", "content": row["response"]}], tokenize=True
            )
        )
        if full[: len(prompt)] == prompt:
            response = full[len(prompt) :]
        else:  # a template that renders earlier turns differently once an answer follows
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    else:
        prompt = tokenizer(row["text"])["input_ids"]
        if "response" not in row:
            return prompt, None
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    eos = set(_eos(tokenizer))
    for i, t in enumerate(response):
        if t in eos:
            return prompt, response[: i + 1]
    return prompt, response


def _ids(out) -> list[int]:
    """apply_chat_template's ids, whether it returns a list or a BatchEncoding."""
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
