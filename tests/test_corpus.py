import json

from distill.config import DataConfig
from distill.corpus import deduplicate, embedded_documents, prepare_corpus, split_of


def test_same_inputs_give_byte_identical_files(tmp_path, prepared):
    again = prepare_corpus(DataConfig(), tmp_path)  # a fresh cache: built from scratch
    assert again.root != prepared.corpus.root
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "prompts.jsonl", "manifest.json"):
        assert (again.root / name).read_bytes() == (prepared.corpus.root / name).read_bytes(), name


def test_manifest_hashes_match_the_files(prepared):
    from distill.artifacts import hash_json, sha256_file

    manifest = prepared.corpus.manifest
    for name, digest in manifest["files"].items():
        assert sha256_file(prepared.corpus.root / name) == digest
    assert manifest["content_hash"] == hash_json(manifest["files"])
    assert manifest["characters"]["train"] > 1_000_000  # real prose, not a toy sample


def _rows(corpus, split):
    return [json.loads(line) for line in corpus.split_path(split).read_text().splitlines()]


def test_splits_are_disjoint_and_cover_the_documents(prepared):
    corpus = prepared.corpus
    texts = {split: {r["text"] for r in _rows(corpus, split)} for split in ("train", "validation", "test")}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert all(len(t) > 50 for t in texts["validation"])
    total = sum(len(v) for v in texts.values())
    assert total == sum(corpus.manifest["documents"].values())
    assert 0.02 < len(texts["validation"]) / total < 0.10  # 5% asked for


def test_no_duplicates_after_normalisation(prepared):
    all_texts = [r["text"] for s in ("train", "validation", "test") for r in _rows(prepared.corpus, s)]
    folded = [" ".join(t.lower().split()) for t in all_texts]
    assert len(folded) == len(set(folded))


def test_deduplicate_folds_case_and_spacing():
    from distill.corpus import Document

    text = "A docstring that is long enough to keep. " * 10
    docs = [Document("a", "s", text), Document("b", "s", "  " + text.upper()), Document("c", "s", "short")]
    kept = deduplicate(docs)
    assert [d.id for d in kept] == ["a"]


def test_prompts_come_from_train_documents(prepared):
    corpus = prepared.corpus
    train_ids = {r["id"]: r["text"] for r in _rows(corpus, "train")}
    prompts = _rows(corpus, "prompts")
    assert len(prompts) == 512
    for p in prompts:
        assert train_ids[p["doc_id"]].startswith(p["text"])
        assert 0 < len(p["text"]) <= 160


def test_split_assignment_depends_only_on_the_text():
    assert split_of("some text", 5, 5) == split_of("some text", 5, 5)
    assert {split_of(f"document {i}", 5, 5) for i in range(500)} == {"train", "validation", "test"}


def test_sources_include_pydoc_topics_and_stdlib_docstrings():
    docs = embedded_documents()
    sources = {d.source for d in docs}
    assert sources == {"pydoc_data.topics", "stdlib docstrings"}
    assert not any("/test/" in d.id or "site-packages" in d.id for d in docs)


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_a_custom_corpus_keeps_its_splits_and_prompts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    long = "This sentence is long enough to count as a document in the corpus. "
    _write_jsonl(src / "train.jsonl", [f"{long * 4} train {i}" for i in range(20)] + [f"{long * 4} shared"])
    _write_jsonl(src / "validation.jsonl", [f"{long * 4} val {i}" for i in range(3)] + [f"{long * 4} shared"])
    _write_jsonl(src / "test.jsonl", [f"{long * 4} test {i}" for i in range(2)])
    _write_jsonl(src / "prompts.jsonl", ["Once upon a time", "The function"])
    corpus = prepare_corpus(DataConfig(source=str(src), num_prompts=2), tmp_path / "cache")
    assert corpus.manifest["documents"] == {"train": 20, "validation": 4, "test": 2}  # shared text left train
    assert all(" val " in t or "shared" in t for t in corpus.texts("validation"))
    prompts = [json.loads(line)["text"] for line in corpus.split_path("prompts").read_text().splitlines()]
    assert prompts == ["Once upon a time", "The function"]


def test_a_bad_row_names_file_and_line(tmp_path):
    import pytest

    from distill.errors import DistillError

    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "validation", "test"):
        _write_jsonl(src / f"{split}.jsonl", ["x" * 300])
    (src / "test.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DistillError, match=r"test.jsonl:2: expected a JSON object with a 'text' field"):
        prepare_corpus(DataConfig(source=str(src)), tmp_path / "cache")
