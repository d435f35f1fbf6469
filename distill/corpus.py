"""The embedded corpus: English prose that ships with Python, built offline and deterministically.

Sources are `pydoc_data.topics` (the language reference topics behind `help()`) and the docstrings of
the standard library, read from source with `ast` (nothing is imported). Documents are deduplicated,
split into train / validation / test by a hash of their text (so no document is in two splits, and
adding one document never moves another), and a prompt set is cut from train documents. The same
Python gives byte-identical files; `manifest.json` carries their hashes and the content hash.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import (
    atomic_directory,
    atomic_write_json,
    hash_json,
    read_json,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)
from distill.config import DataConfig
from distill.errors import DistillError

CORPUS_FORMAT = 1
SPLITS = ("train", "validation", "test")
MIN_DOC_CHARS = 200
# Test suites and demo scripts are code-heavy and repetitive; site-packages is not the standard library.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo", "lib2to3"}


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str
    split: str | None = None  # given by a custom corpus; the embedded one splits by hash


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus directory: `{train,validation,test,prompts}.jsonl` and `manifest.json`."""

    root: Path

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "manifest.json")

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def text_hash(self) -> str:
        """The hash of the split texts alone: what a tokenizer, token arrays or a teacher trained on the
        corpus depend on (the prompts for sampling are not among them, so changing them retrains nothing)."""
        return hash_json({name: h for name, h in self.manifest["files"].items() if name != "prompts.jsonl"})

    def split_path(self, split: str) -> Path:
        return self.root / f"{split}.jsonl"

    def texts(self, split: str) -> list[str]:
        return [json.loads(line)["text"] for line in self.split_path(split).read_text().splitlines()]


def corpus_root(cfg: DataConfig, cache_dir: Path) -> Path:
    """Where the corpus described by `cfg` is (or will be) prepared; writes nothing."""
    key = hash_json({"format": CORPUS_FORMAT, "source": _source_identity(cfg), **_split_settings(cfg)})[:16]
    return Path(cache_dir) / "corpus" / key


def prepare_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """Build (or reuse) the corpus described by `cfg` under `cache_dir/corpus/<key>/`."""
    root = corpus_root(cfg, cache_dir)
    remove_stale_temps(root.parent)
    if (root / "manifest.json").exists():
        return Corpus(root)
    documents = embedded_documents() if cfg.source == "embedded" else directory_documents(Path(cfg.source))
    documents = deduplicate(documents)
    with atomic_directory(root) as tmp:
        write_corpus(documents, cfg, tmp)
    return Corpus(root)


def _source_identity(cfg: DataConfig) -> dict:
    if cfg.source == "embedded":
        return {"embedded": True, "python": platform.python_version(), "impl": sys.implementation.name}
    source = Path(cfg.source)
    if not source.is_dir():
        raise DistillError(f"data.source: no such directory: {source}")
    files = sorted(source.glob("*.jsonl"))
    return {"directory": str(source.resolve()), "files": {f.name: sha256_file(f) for f in files}}


def _split_settings(cfg: DataConfig) -> dict:
    return {
        "validation_percent": cfg.validation_percent,
        "test_percent": cfg.test_percent,
        "num_prompts": cfg.num_prompts,
        "prompt_chars": cfg.prompt_chars,
    }


def embedded_documents() -> list[Document]:
    """pydoc topics, then standard-library docstrings, in a fixed order."""
    return list(_embedded_documents())


@functools.cache
def _embedded_documents() -> tuple[Document, ...]:
    """Parsed once per process: the interpreter's own library does not change under it (parsing its
    ~600 files takes several seconds, and a process may prepare several corpora from them)."""
    import pydoc_data.topics

    docs = [
        Document(f"pydoc:{name}", "pydoc_data.topics", text)
        for name, text in sorted(pydoc_data.topics.topics.items())
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(rel.parts):
            continue
        docs.extend(_docstrings(path, rel.as_posix()))
    return tuple(docs)


def _docstrings(path: Path, rel: str) -> list[Document]:
    try:
        tree = ast.parse(path.read_bytes(), filename=rel)
    except (SyntaxError, ValueError):
        return []
    found = []
    nodes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)),
    ]
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            name = getattr(node, "name", "<module>")
            found.append(
                Document(f"stdlib:{rel}:{name}:{getattr(node, 'lineno', 0)}", "stdlib docstrings", doc)
            )
    return found


def directory_documents(source: Path) -> list[Document]:
    """A custom corpus keeps its own splits. Held-out splits come first, so a text that is also in train
    is dropped from train by deduplication, never from validation or test."""
    docs = []
    for split in ("validation", "test", "train"):
        path = source / f"{split}.jsonl"
        if not path.exists():
            raise DistillError(f"data.source: {path} is missing (expected train/validation/test .jsonl)")
        docs += [Document(f"{split}:{n}", str(path), text, split) for n, text in _jsonl_texts(path)]
    return docs


def _jsonl_texts(path: Path) -> list[tuple[int, str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DistillError(f"{path}:{n}: expected a JSON object with a 'text' field") from exc
        if not isinstance(text, str):
            raise DistillError(f"{path}:{n}: 'text' must be a string")
        rows.append((n, text))
    return rows


def normalize(text: str) -> str:
    """Clean indentation, strip trailing spaces, collapse runs of blank lines."""
    lines = [line.rstrip() for line in inspect.cleandoc(text).splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def deduplicate(documents: list[Document]) -> list[Document]:
    """Normalise, drop short documents, keep the first of each identical text (case and spacing folded)."""
    seen: set[str] = set()
    kept = []
    for doc in documents:
        text = normalize(doc.text)
        if len(text) < MIN_DOC_CHARS:
            continue
        fingerprint = sha256_bytes(" ".join(text.lower().split()).encode())
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        kept.append(Document(doc.id, doc.source, text, doc.split))
    return kept


def split_of(text: str, validation_percent: int, test_percent: int) -> str:
    bucket = int(sha256_bytes(text.encode())[:8], 16) % 100
    if bucket < validation_percent:
        return "validation"
    if bucket < validation_percent + test_percent:
        return "test"
    return "train"


def make_prompts(train_docs: list[Document], num_prompts: int, prompt_chars: int) -> list[dict]:
    """The opening of train documents, cut at a word boundary near `prompt_chars`."""
    candidates = sorted(
        (d for d in train_docs if len(d.text) >= 2 * prompt_chars), key=lambda d: sha256_bytes(d.id.encode())
    )
    prompts = []
    for doc in candidates[:num_prompts]:
        head = doc.text[:prompt_chars]
        cut = head.rfind(" ")
        prompts.append(
            {"id": f"p{len(prompts):05d}", "doc_id": doc.id, "text": head[:cut] if cut > 0 else head}
        )
    return prompts


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def write_corpus(documents: list[Document], cfg: DataConfig, out: Path) -> None:
    by_split: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in documents:
        by_split[doc.split or split_of(doc.text, cfg.validation_percent, cfg.test_percent)].append(doc)
    files = {
        split: _jsonl([{"id": d.id, "source": d.source, "text": d.text} for d in docs])
        for split, docs in by_split.items()
    }
    given = Path(cfg.source) / "prompts.jsonl" if cfg.source != "embedded" else None
    if given is not None and given.exists():
        prompts = [
            {"id": f"p{i:05d}", "doc_id": f"prompts:{n}", "text": t}
            for i, (n, t) in enumerate(_jsonl_texts(given))
        ]
        prompts = prompts[: cfg.num_prompts]
    else:
        prompts = make_prompts(by_split["train"], cfg.num_prompts, cfg.prompt_chars)
        if len(prompts) < cfg.num_prompts:
            raise DistillError(
                f"data.num_prompts: asked for {cfg.num_prompts}, the corpus yields {len(prompts)}"
            )
    files["prompts"] = _jsonl(prompts)
    for name, data in files.items():
        (out / f"{name}.jsonl").write_bytes(data)
    hashes = {f"{name}.jsonl": sha256_bytes(data) for name, data in files.items()}
    atomic_write_json(
        out / "manifest.json",
        {
            "format": CORPUS_FORMAT,
            "source": cfg.source,
            "python": platform.python_version(),
            "settings": _split_settings(cfg),
            "documents": {s: len(d) for s, d in by_split.items()},
            "characters": {s: sum(len(d.text) for d in docs) for s, docs in by_split.items()},
            "prompts": len(prompts),
            "files": hashes,
            "content_hash": hash_json(hashes),
        },
    )
