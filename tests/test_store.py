import numpy as np
import pytest

from distill.errors import DistillError
from distill.store import (
    LOGPROB_FLOOR,
    LOGPROB_MAX_ERROR,
    Capture,
    TeacherStore,
    collate,
    dequantize_logprobs,
    id_bits,
    identity_key,
    merge_stores,
    open_or_create,
    pack_ids,
    quantize_logprobs,
    record_shard,
    shard_name,
    unpack_ids,
    write_shard,
)

V, K = 128_256, 32  # Llama 3's vocabulary


def random_capture(rng, name, length=40, start=10, vocab=V, k=K):
    positions = length - 1 - start
    logits = rng.normal(size=(positions, 2000)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logprobs, axis=-1)[:, :k]
    return Capture(
        id=name,
        input_ids=rng.integers(0, vocab, size=length).tolist(),
        start=start,
        topk_ids=rng.integers(0, vocab, size=(positions, k)),
        topk_logprobs=np.take_along_axis(logprobs, order, -1),
        token_logprobs=rng.normal(-3, 1, size=positions),
    )


def test_ids_pack_to_17_bits_for_llama3_and_round_trip():
    rng = np.random.default_rng(0)
    assert id_bits(V) == 17 and id_bits(4096) == 12
    ids = rng.integers(0, V, size=(100, K))
    ids[0, 0], ids[0, 1] = 0, V - 1
    data = pack_ids(ids, 17)
    assert len(data) == 100 * K * 17 // 8
    assert np.array_equal(unpack_ids(data, ids.size, 17).reshape(ids.shape), ids)


def test_logprob_error_is_within_the_stated_bound():
    rng = np.random.default_rng(1)
    lps = -np.sort(rng.exponential(3.0, size=(500, K)), axis=-1)  # sorted by rank, some below the floor
    lps[0, 0] = 0.0
    lps[1, -3:] = -np.inf  # ranks the engine did not return
    decoded = dequantize_logprobs(quantize_logprobs(lps), lps.shape)
    inside = lps >= LOGPROB_FLOOR
    assert np.abs(decoded[inside] - lps[inside]).max() <= LOGPROB_MAX_ERROR + 1e-6
    assert np.all(decoded[~inside] == LOGPROB_FLOOR)
    assert LOGPROB_MAX_ERROR == 1 / 32
    # probability mass below the floor is negligible
    assert np.exp(LOGPROB_FLOOR) < 1.2e-7


def test_delta_coding_is_exact_even_out_of_order():
    lps = np.array([[-1.0, -0.5, -3.0, -2.0]])  # not sorted: the uint8 differences wrap and unwrap
    decoded = dequantize_logprobs(quantize_logprobs(lps), lps.shape)
    assert np.allclose(decoded, lps, atol=LOGPROB_MAX_ERROR)


IDENTITY = {
    "mode": "sample",
    "k": K,
    "vocab_size": V,
    "encoding": {"id_bits": 17},
    "teacher": {"weights_hash": "t"},
    "capture": {"backend": "vllm", "temperature": 1.0},
}


def make_store(root, captures, num_shards=None, per_shard=2, identity=None, slice_=None, made_from=None):
    identity = identity or IDENTITY
    shards = [captures[i : i + per_shard] for i in range(0, len(captures), per_shard)]
    manifest = open_or_create(root, identity, num_shards or len(shards), slice_, False, made_from)
    for i, chunk in enumerate(shards):
        if slice_ is None or i % slice_[1] == slice_[0]:
            entry = write_shard(
                root / shard_name(i), chunk, identity["encoding"]["id_bits"], identity_key(identity)
            )
            record_shard(root, manifest, shard_name(i), {"index": i, **entry})
    return TeacherStore(root)


def test_store_round_trip_and_datasets_reads_it(tmp_path):
    rng = np.random.default_rng(2)
    captures = [random_capture(rng, f"r{i}", length=30 + i) for i in range(5)]
    store = make_store(tmp_path / "s", captures)
    store.verify()
    back = list(store.rows())
    assert [c.id for c in back] == [c.id for c in captures]
    for a, b in zip(captures, back, strict=True):
        assert a.input_ids == b.input_ids and a.start == b.start
        assert np.array_equal(a.topk_ids, b.topk_ids)
        assert np.abs(a.topk_logprobs - b.topk_logprobs).max() <= LOGPROB_MAX_ERROR + 1e-6
        assert np.allclose(a.token_logprobs, b.token_logprobs, atol=2e-3)  # float16
    summary = store.summary()
    assert (
        summary["rows"] == 5
        and summary["complete"]
        and summary["positions"] == sum(c.num_positions for c in captures)
    )
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in store.shard_paths()], split="train")
    assert ds.num_rows == 5 and ds[0]["input_ids"] == captures[0].input_ids


def test_collate_pads_and_aligns_positions():
    rng = np.random.default_rng(3)
    a, b = random_capture(rng, "a", length=12, start=4, k=4), random_capture(rng, "b", length=8, start=2, k=4)
    batch = collate([a, b], k=4, pad_id=7)
    assert batch["input_ids"].shape == (2, 12) and batch["topk_ids"].shape == (2, 12, 4)
    assert batch["input_ids"][1, 8:].tolist() == [7] * 4 and batch["attention_mask"][1].sum() == 8
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(range(4, 11))
    assert batch["loss_mask"][1].nonzero().flatten().tolist() == list(range(2, 7))
    assert batch["topk_ids"][0, 4].tolist() == a.topk_ids[0].tolist()  # position 4 predicts token 5


def test_corrupted_shard_is_found_and_named(tmp_path):
    rng = np.random.default_rng(4)
    store = make_store(tmp_path / "s", [random_capture(rng, f"r{i}") for i in range(4)])
    shard = store.shard_paths()[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=f"{shard}: checksum mismatch"):
        store.verify()
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated: reading it checks it first
    with pytest.raises(DistillError, match=f"{shard}: checksum mismatch"):
        list(store.rows())


def test_merge_joins_slices_and_refuses_strangers(tmp_path):
    rng = np.random.default_rng(5)
    captures = [random_capture(rng, f"r{i}") for i in range(6)]
    whole = make_store(tmp_path / "whole", captures)
    s0 = make_store(tmp_path / "s0", captures, slice_=[0, 2])
    make_store(tmp_path / "s1", captures, slice_=[1, 2])
    assert not s0.complete and s0.summary()["shards"] == "2 of 3"
    with pytest.raises(DistillError, match="missing 1 of 3 shards"):
        s0.require_complete()
    merged = merge_stores(tmp_path / "merged", [tmp_path / "s0", tmp_path / "s1"])
    assert merged.complete
    assert {n: e["sha256"] for n, e in merged.shards.items()} == {
        n: e["sha256"] for n, e in whole.shards.items()
    }
    make_store(
        tmp_path / "other",
        captures,
        identity={
            **IDENTITY,
            "mode": "score",
            "teacher": {"weights_hash": "t2"},
            "capture": {"backend": "vllm"},
        },
    )
    with pytest.raises(
        DistillError, match="cannot merge .*: capture.temperature, mode, teacher.weights_hash differ"
    ):
        merge_stores(tmp_path / "bad", [tmp_path / "s0", tmp_path / "other"])


def test_changed_settings_are_refused_unless_overwrite(tmp_path):
    identity = {"mode": "sample", "k": 32, "teacher": {"weights_hash": "a"}}
    manifest = open_or_create(tmp_path, identity, 4, None, overwrite=False)
    record_shard(tmp_path, manifest, shard_name(0), {"rows": 1})  # a store with work in it
    assert open_or_create(tmp_path, identity, 4, None, overwrite=False)["num_shards"] == 4
    changed = {**identity, "teacher": {"weights_hash": "b"}}
    with pytest.raises(
        DistillError, match=r"different settings \(teacher.weights_hash changed\).*--overwrite"
    ):
        open_or_create(tmp_path, changed, 4, None, overwrite=False)
    assert open_or_create(tmp_path, changed, 4, None, overwrite=True)["identity"] == changed


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
    rng = np.random.default_rng(6)
    store = make_store(tmp_path / "s", [random_capture(rng, "r")])
    with pytest.raises(DistillError, match="has vocabulary 128256, but student.model has 4096"):
        store.check_vocab(4096, "student.model")


def replace_shard(store, name, source):
    """Put another store's shard in, with a manifest entry that agrees with its bytes (what copying a
    shard together with its manifest line would do), so only the shard's own content can give it away."""
    import json

    from distill.artifacts import sha256_file

    (store.root / name).write_bytes((source.root / name).read_bytes())
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["shards"][name].update(
        bytes=(store.root / name).stat().st_size, sha256=sha256_file(store.root / name)
    )
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    return TeacherStore(store.root)


def test_every_read_checks_the_shard_against_the_manifest_and_names_it(tmp_path):
    rng = np.random.default_rng(7)
    captures = [random_capture(rng, f"r{i}") for i in range(4)]
    store = make_store(tmp_path / "s", captures)
    shard = store.root / shard_name(1)
    good = shard.read_bytes()
    shard.write_bytes(good[:50] + bytes([good[50] ^ 1]) + good[51:])  # one bit flipped
    for read in (lambda: list(store.rows()), lambda: next(store.batches(8))):
        with pytest.raises(DistillError, match=f"{shard}: checksum mismatch with the store's manifest"):
            read()
    assert store.problem().startswith(f"{shard}: checksum mismatch")
    shard.write_bytes(good)
    assert store.problem() is None and len(list(store.rows())) == 4

    # a same-k shard of a store made at another temperature, its manifest line copied too
    other = make_store(
        tmp_path / "t07", captures, identity={**IDENTITY, "capture": {"backend": "vllm", "temperature": 0.7}}
    )
    with pytest.raises(DistillError, match=f"{shard}: written for another store or shard"):
        list(replace_shard(store, shard_name(1), other).rows())
    # another shard of the same store under this name
    (store.root / shard_name(1)).write_bytes(good)
    with pytest.raises(DistillError, match=f"{shard}: written for another store or shard .*shard-00000"):
        list(
            replace_shard(
                store, shard_name(1), _renamed(store, shard_name(0), shard_name(1), tmp_path)
            ).rows()
        )
    # a shard of another k written before shards carried their store (no metadata): the rows give it away
    narrow = [random_capture(rng, f"r{i}", k=16) for i in range(4)]
    legacy = tmp_path / "legacy"
    make_store(legacy, narrow, identity={**IDENTITY, "k": 16})
    write_shard(legacy / shard_name(1), narrow[2:], 17)  # no store key
    with pytest.raises(DistillError, match=rf"{shard}: row r2 does not hold 29 positions of top-32"):
        list(replace_shard(store, shard_name(1), TeacherStore(legacy)).rows())
    # rows the manifest does not record
    replace_shard(store, shard_name(1), _renamed(store, shard_name(1), shard_name(1), tmp_path))
    manifest = json_load(store.root / "manifest.json")
    manifest["shards"][shard_name(1)]["rows"] = 3
    (store.root / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(DistillError, match=f"{shard}: 2 rows, the manifest records 3"):
        list(TeacherStore(store.root).rows())


def json_load(path):
    import json

    return json.loads(path.read_text())


def _renamed(store, name, as_name, tmp_path):
    """A store whose shard `as_name` holds the bytes of `store`'s shard `name` (copied from `good` data)."""
    import shutil

    root = tmp_path / f"copy-{name}-{as_name}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(store.root, root)
    (root / as_name).write_bytes((store.root / name).read_bytes())
    return TeacherStore(root)


def test_the_identity_is_content_so_a_moved_cache_keeps_its_store(tmp_path):
    rng = np.random.default_rng(8)
    captures = [random_capture(rng, f"r{i}") for i in range(4)]
    located = {**IDENTITY, "teacher": {"weights_hash": "t", "path": "/cache-a/teachers/x/final"},
               "source": {"sha256": "s", "file": "/cache-a/tokens/train.npy"}}  # fmt: skip
    moved = {**located, "teacher": {"weights_hash": "t", "path": "/cache-b/teachers/x/final"},
             "source": {"sha256": "s", "file": "/cache-b/tokens/train.npy"}}  # fmt: skip
    store = make_store(tmp_path / "s", captures, identity=located, made_from={"teacher": "/cache-a/t"})
    assert "path" not in store.manifest["identity"]["teacher"] and store.summary()["teacher"] == "/cache-a/t"
    again = open_or_create(tmp_path / "s", moved, 2, None, False, {"teacher": "/cache-b/t"})
    assert len(again["shards"]) == 2 and again["made_from"] == {"teacher": "/cache-b/t"}
    # the --shard I/N jobs of one generation, made under different cache directories, merge
    make_store(tmp_path / "a", captures, identity=located, slice_=[0, 2])
    make_store(tmp_path / "b", captures, identity=moved, slice_=[1, 2])
    merged = merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert merged.complete and len(list(merged.rows())) == 4
    # content still counts
    with pytest.raises(DistillError, match=r"teacher.weights_hash changed"):
        open_or_create(tmp_path / "s", {**moved, "teacher": {"weights_hash": "u"}}, 2, None, False)


def test_a_store_with_no_shard_yet_is_replaced_without_overwrite(tmp_path):
    open_or_create(tmp_path, {**IDENTITY, "k": 999_999}, 4, None, False)  # what a refused top_k left
    (tmp_path / f".{shard_name(0)}.tmp-4194304").write_bytes(b"half")  # a shard a full disk cut short
    fixed = open_or_create(tmp_path, IDENTITY, 4, None, False)
    assert fixed["identity"]["k"] == K and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
