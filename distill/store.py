"""The teacher store: Parquet shards (zstd) of per-position teacher top-k, plus `manifest.json`.

One row per sequence:
    id               string     prompt id + sample index, or corpus block id
    input_ids        list<int32> the whole sequence (prompt + completion, or the scored block)
    start            int32      first position with a teacher distribution (prompt_len - 1 when sampling)
    truncated        bool       the prompt was cut to fit the context
    topk_ids         binary     (P, K) token ids, bit-packed at ceil(log2 V) bits each
    topk_logprobs    binary     (P, K) uint8 quantized logprobs, delta-coded along K (see below)
    token_logprobs   binary     (P,) float16 logprob of the token that actually follows

Position p in [start, len(input_ids) - 1) holds the teacher's distribution over the *next* token, so it
lines up with the student's logits at p: `student_logits[:, p]` vs `topk_*[:, p]`. P = T - 1 - start.

NOTE: logprobs are stored raw (before any temperature), quantized to steps of 1/16 nat: the error is at
most 1/32 nat for logprobs >= LOGPROB_FLOOR (-15.94); anything lower (probability < 1.2e-7), including
ranks the engine did not return, is stored as the floor. Ranks are sorted, so the quantized values rise
along K; storing their differences is lossless and lets zstd shrink them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    hash_json,
    read_json,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)
from distill.errors import DistillError

STORE_FORMAT = 1
LOGPROB_SCALE = 16  # steps per nat
LOGPROB_FLOOR = -255 / LOGPROB_SCALE
LOGPROB_MAX_ERROR = 0.5 / LOGPROB_SCALE
STORE_KEY_FIELD, SHARD_FIELD = "distill.store", "distill.shard"  # Parquet metadata of each shard
# Where a store's inputs were when it was made: shown, never part of its identity (the content hashes
# are), so a moved cache or another machine's copy of the same inputs makes the same store.
LOCATIONS = (("teacher", "path"), ("source", "file"))


def content_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without the locations of its inputs (stores made before they were left out held them)."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in identity.items()}
    for section, field in LOCATIONS:
        if isinstance(out.get(section), dict):
            out[section].pop(field, None)
    return out


def identity_key(identity: dict[str, Any]) -> str:
    return hash_json(content_identity(identity))


# --------------------------------------------------------------------------- encoding


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative ints (any shape) at `bits` bits each, little-endian bit order."""
    flat = np.ascontiguousarray(ids, dtype=np.uint32).reshape(-1)
    bit_matrix = (flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1  # (N, bits)
    return np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_ids(data: bytes, count: int, bits: int) -> np.ndarray:
    bit_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = 1 << np.arange(bits, dtype=np.int64)
    return bit_array.reshape(count, bits).astype(np.int64) @ weights


def quantize_logprobs(logprobs: np.ndarray) -> bytes:
    """(P, K) float logprobs sorted by rank -> delta-coded uint8 bytes."""
    lp = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=-np.inf, neginf=-np.inf)
    q = np.clip(np.rint(-lp * LOGPROB_SCALE), 0, 255).astype(np.uint8)  # 0 = logprob 0
    # NOTE: uint8 differences wrap modulo 256 and the cumulative sum unwraps them, so decoding is
    # exact even if the engine ever returned ranks out of order.
    return np.diff(q, axis=-1, prepend=np.zeros(q.shape[:-1] + (1,), dtype=np.uint8)).tobytes()


def dequantize_logprobs(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    deltas = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    q = np.cumsum(deltas, axis=-1, dtype=np.uint8)
    return -q.astype(np.float32) / LOGPROB_SCALE


# --------------------------------------------------------------------------- rows


@dataclass
class Capture:
    """The teacher's view of one sequence, before encoding.

    topk_ids / topk_logprobs: (P, K); token_logprobs: (P,); P = len(input_ids) - 1 - start.
    """

    id: str
    input_ids: list[int]
    start: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray
    truncated: bool = False

    @property
    def num_positions(self) -> int:
        return len(self.input_ids) - 1 - self.start

    def from_position(self, start: int, full_length: int | None = None) -> Capture:
        """The same capture with the teacher's distributions kept from position `start` of the sequence
        as it was before any truncation (a prompt cut from the left moves it back by what was cut)."""
        cut = (full_length - len(self.input_ids)) if full_length is not None else 0
        start = max(start - cut, self.start)
        skip = start - self.start
        return Capture(
            self.id, self.input_ids, start, self.topk_ids[skip:], self.topk_logprobs[skip:],
            self.token_logprobs[skip:], self.truncated,
        )  # fmt: skip


def encode_row(c: Capture, bits: int) -> dict[str, Any]:
    if c.topk_ids.shape[0] != c.num_positions or c.token_logprobs.shape[0] != c.num_positions:
        raise ValueError(f"{c.id}: {c.topk_ids.shape[0]} captured positions, expected {c.num_positions}")
    return {
        "id": c.id,
        "input_ids": [int(t) for t in c.input_ids],
        "start": int(c.start),
        "truncated": bool(c.truncated),
        "topk_ids": pack_ids(c.topk_ids, bits),
        "topk_logprobs": quantize_logprobs(c.topk_logprobs),
        "token_logprobs": np.asarray(c.token_logprobs, dtype=np.float16).tobytes(),
    }


def decode_row(row: dict[str, Any], k: int, bits: int) -> Capture:
    positions = len(row["input_ids"]) - 1 - row["start"]
    return Capture(
        id=row["id"],
        input_ids=list(row["input_ids"]),
        start=row["start"],
        topk_ids=unpack_ids(row["topk_ids"], positions * k, bits).reshape(positions, k),
        topk_logprobs=dequantize_logprobs(row["topk_logprobs"], (positions, k)),
        token_logprobs=np.frombuffer(row["token_logprobs"], dtype=np.float16).astype(np.float32),
        truncated=row["truncated"],
    )


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("start", pa.int32()),
            ("truncated", pa.bool_()),
            ("topk_ids", pa.binary()),
            ("topk_logprobs", pa.binary()),
            ("token_logprobs", pa.binary()),
        ]
    )


def write_shard(
    path: Path, captures: list[Capture], bits: int, store_key: str | None = None
) -> dict[str, Any]:
    """Write one Parquet shard atomically; returns its manifest entry. `store_key` (see `identity_key`)
    goes into the file's metadata, so a shard copied in from another store is told apart."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [encode_row(c, bits) for c in captures]
    schema = _schema()
    if store_key is not None:
        schema = schema.with_metadata({STORE_KEY_FIELD: store_key, SHARD_FIELD: path.name})
    table = pa.Table.from_pylist(rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=9, use_dictionary=["id"])
    atomic_write_bytes(path, buffer.getvalue())
    return {
        "rows": len(rows),
        "positions": int(sum(c.num_positions for c in captures)),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "truncated": int(sum(c.truncated for c in captures)),
    }


# --------------------------------------------------------------------------- the store


class TeacherStore:
    """A teacher store directory: `manifest.json` + `shard-NNNNN.parquet`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise DistillError(f"no teacher store at {self.root} (manifest.json missing)")
        try:
            self.manifest: dict[str, Any] = read_json(path)
            identity = self.manifest["identity"]
            self.k: int = identity["k"]
            self.vocab_size: int = identity["vocab_size"]
            self.bits: int = identity["encoding"]["id_bits"]
            self.manifest["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DistillError(f"{path}: not a teacher store manifest ({type(exc).__name__}: {exc})") from exc
        self.key = identity_key(identity)

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.manifest["shards"]

    def shard_paths(self) -> list[Path]:
        return [self.root / name for name in sorted(self.shards)]

    def summary(self) -> dict[str, Any]:
        shards = self.shards.values()
        positions = sum(s["positions"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        identity = self.manifest["identity"]
        return {
            "store": str(self.root),
            "mode": identity["mode"],
            "teacher": self.manifest.get("made_from", {}).get("teacher") or identity["teacher"].get("path"),
            "backend": identity["capture"]["backend"],
            "k": self.k,
            "vocab_size": self.vocab_size,
            "shards": f"{len(self.shards)} of {self.manifest['num_shards']}",
            "slices": self.manifest.get("slices") or "all",
            "rows": sum(s["rows"] for s in shards),
            "positions": positions,
            "truncated": sum(s["truncated"] for s in shards),
            "bytes": size,
            "bytes_per_token": round(size / positions, 2) if positions else None,
            "complete": self.complete,
        }

    @property
    def teacher_draws(self) -> bool:
        """Each stored next token is a draw from the teacher's full distribution at its raw logits:
        sampled (not scored corpus text) at temperature 1 with no nucleus cut."""
        identity = self.manifest["identity"]
        capture = identity.get("capture", {})
        return (
            identity["mode"] == "sample" and capture.get("temperature") == 1.0 and capture.get("top_p") == 1.0
        )

    @property
    def complete(self) -> bool:
        """Every shard of the whole job is present (a `--shard I/N` store alone never is, unless N=1)."""
        return len(self.shards) == self.manifest["num_shards"]

    def require_complete(self) -> None:
        if not self.complete:
            missing = self.manifest["num_shards"] - len(self.shards)
            raise DistillError(
                f"teacher store {self.root} is missing {missing} of {self.manifest['num_shards']} shards; "
                "finish `distill generate` (or merge the other --shard stores) first"
            )

    def verify(self) -> None:
        """Check every shard's presence, size and SHA-256 against the manifest."""
        for name in sorted(self.shards):
            self._checked_bytes(name)

    def problem(self) -> str | None:
        """Why this store cannot be read as it is (incomplete, a shard missing or damaged), or None."""
        try:
            self.require_complete()
            self.verify()
        except DistillError as exc:
            return str(exc)
        return None

    def _checked_bytes(self, name: str) -> bytes:
        path, entry = self.root / name, self.shards[name]
        if not path.is_file():
            raise DistillError(
                f"{path}: shard listed in the manifest is missing; `distill generate` redoes it"
            )
        data = path.read_bytes()
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise DistillError(
                f"{path}: checksum mismatch with the store's manifest (a corrupted, truncated or foreign "
                "shard); `distill generate` redoes it"
            )
        return data

    def _read_shard(self, name: str):
        """The shard's table, checked against the manifest: bytes, store, rows and positions."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, entry = self.root / name, self.shards[name]
        data = self._checked_bytes(name)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DistillError(f"{path}: unreadable shard ({exc}); run `distill store verify`") from exc
        meta = table.schema.metadata or {}
        key = meta.get(STORE_KEY_FIELD.encode())
        if key is not None and (key.decode() != self.key or meta.get(SHARD_FIELD.encode()) != name.encode()):
            raise DistillError(
                f"{path}: written for another store or shard than this manifest describes "
                f"({meta.get(SHARD_FIELD.encode(), b'?').decode()} of a store with other settings); "
                "regenerate it (`distill generate`) or use the store it came from"
            )
        if table.num_rows != entry["rows"]:
            raise DistillError(f"{path}: {table.num_rows} rows, the manifest records {entry['rows']}")
        return table

    def _decode(self, path: Path, row: dict[str, Any]) -> Capture:
        positions = len(row["input_ids"]) - 1 - row["start"]
        sizes = (len(row["topk_ids"]), len(row["topk_logprobs"]), len(row["token_logprobs"]))
        expected = ((positions * self.k * self.bits + 7) // 8, positions * self.k, 2 * positions)
        if positions < 0 or sizes != expected:
            raise DistillError(
                f"{path}: row {row['id']} does not hold {positions} positions of top-{self.k} at "
                f"{self.bits} bits per id (bytes {sizes}, expected {expected}): not this store's data"
            )
        return decode_row(row, self.k, self.bits)

    def check_vocab(self, vocab_size: int, what: str) -> None:
        if vocab_size != self.vocab_size:
            raise DistillError(
                f"teacher store {self.root} has vocabulary {self.vocab_size}, but {what} has {vocab_size}; "
                "the student must share the teacher's tokenizer"
            )

    def rows(self) -> Iterator[Capture]:
        """Every row, shard by shard; each shard is checked against the manifest before any row of it is
        used (its checksum, the store it was written for, its rows and positions)."""
        for name in sorted(self.shards):
            path = self.root / name
            captures = [self._decode(path, row) for row in self._read_shard(name).to_pylist()]
            positions = sum(c.num_positions for c in captures)
            if positions != self.shards[name]["positions"]:
                raise DistillError(
                    f"{path}: {positions} positions, the manifest records {self.shards[name]['positions']}"
                )
            yield from captures

    def batches(self, batch_size: int, pad_id: int = 0) -> Iterator[dict[str, Any]]:
        """Padded torch batches in store order (see `collate`)."""
        buffer: list[Capture] = []
        for capture in self.rows():
            buffer.append(capture)
            if len(buffer) == batch_size:
                yield collate(buffer, self.k, pad_id)
                buffer = []
        if buffer:
            yield collate(buffer, self.k, pad_id)


def collate(captures: list[Capture], k: int, pad_id: int = 0) -> dict[str, Any]:
    """Right-padded batch.

    Returns input_ids (B, T), attention_mask (B, T), loss_mask (B, T) (True where position t has the
    teacher's distribution over token t+1), topk_ids (B, T, K), topk_logprobs (B, T, K) float32,
    token_logprobs (B, T) float32.
    """
    import torch

    T = max(len(c.input_ids) for c in captures)
    B = len(captures)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    topk_ids = torch.zeros((B, T, k), dtype=torch.long)
    topk_logprobs = torch.full((B, T, k), LOGPROB_FLOOR, dtype=torch.float32)
    token_logprobs = torch.zeros((B, T), dtype=torch.float32)
    for b, c in enumerate(captures):
        n, s, e = len(c.input_ids), c.start, len(c.input_ids) - 1
        input_ids[b, :n] = torch.tensor(c.input_ids)
        attention_mask[b, :n] = 1
        loss_mask[b, s:e] = True
        topk_ids[b, s:e] = torch.from_numpy(c.topk_ids)
        topk_logprobs[b, s:e] = torch.from_numpy(c.topk_logprobs)
        token_logprobs[b, s:e] = torch.from_numpy(c.token_logprobs)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
        "token_logprobs": token_logprobs,
    }


# --------------------------------------------------------------------------- manifest and merge


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def open_or_create(
    root: Path,
    identity: dict[str, Any],
    num_shards: int,
    slice_: list[int] | None,
    overwrite: bool,
    made_from: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest dict of the store at `root`: reused when `identity` matches, else refused or reset
    (a store with no shard yet holds nothing to lose: it is reset).

    `slice_` is [I, N] for a `--shard I/N` job (recorded; any slices of the same job may share a store).
    `made_from`: where the inputs are (recorded for people, not compared).
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)  # shards half-written by a job that died (a full disk, a kill)
    path = root / "manifest.json"
    identity = content_identity(identity)
    if path.exists():
        existing = read_json(path)
        same = content_identity(existing["identity"]) == identity and existing["num_shards"] == num_shards
        if same and not overwrite:
            if slice_ and slice_ not in existing["slices"]:
                existing["slices"] = sorted([*existing["slices"], slice_])
            existing["made_from"] = made_from or existing.get("made_from", {})
            return existing
        if not overwrite and existing["shards"]:
            changed = _identity_diff(content_identity(existing["identity"]), identity) or ["num_shards"]
            raise DistillError(
                f"{root} holds a teacher store made with different settings ({', '.join(changed)} changed); "
                "pass --overwrite to replace it, or write to another directory"
            )
        for old in root.glob("shard-*.parquet"):
            old.unlink()
    manifest = {
        "format": STORE_FORMAT,
        "identity": identity,
        "num_shards": num_shards,
        "slices": [slice_] if slice_ else [],
        "shards": {},
        "made_from": made_from or {},
    }
    atomic_write_json(path, manifest)
    return manifest


def _identity_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            changed += _identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            changed.append(f"{prefix}{key}")
    return changed


def record_shard(root: Path, manifest: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
    manifest["shards"][name] = entry
    atomic_write_json(root / "manifest.json", manifest)


def merge_stores(out: Path, inputs: list[Path]) -> TeacherStore:
    """Join shard stores made by `--shard I/N` jobs into one store at `out`."""
    import shutil

    stores = [TeacherStore(p) for p in inputs]
    first = stores[0]
    for other in stores[1:]:
        diff = _identity_diff(
            content_identity(first.manifest["identity"]), content_identity(other.manifest["identity"])
        )
        if diff or other.manifest["num_shards"] != first.manifest["num_shards"]:
            raise DistillError(
                f"cannot merge {other.root} into {first.root}: {', '.join(diff) or 'num_shards'} differ"
            )
    shards: dict[str, tuple[TeacherStore, dict[str, Any]]] = {}
    for store in stores:
        for name in store.shards:  # intact, and of the store it is merged from
            store._read_shard(name)
        for name, entry in store.shards.items():
            if name in shards and shards[name][1]["sha256"] != entry["sha256"]:
                raise DistillError(
                    f"{name} is in {shards[name][0].root} and {store.root} with different contents"
                )
            shards.setdefault(name, (store, entry))
    slices = sorted({tuple(sl) for st in stores for sl in st.manifest.get("slices", [])})
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists() and out.resolve() not in {s.root.resolve() for s in stores}:
        raise DistillError(f"{out} already holds a teacher store; merge into an empty directory")
    manifest = {
        "format": STORE_FORMAT,
        "made_from": first.manifest.get("made_from", {}),
        "identity": first.manifest["identity"],
        "num_shards": first.manifest["num_shards"],
        "slices": [list(sl) for sl in slices],
        "shards": {},
    }
    for name in sorted(shards):
        store, entry = shards[name]
        if store.root.resolve() != out.resolve():
            shutil.copyfile(store.root / name, out / f".{name}.tmp")
            (out / f".{name}.tmp").replace(out / name)
        manifest["shards"][name] = entry
    atomic_write_json(out / "manifest.json", manifest)
    return TeacherStore(out)
