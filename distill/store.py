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

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.artifacts import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from distill.errors import DistillError

STORE_FORMAT = 1
LOGPROB_SCALE = 16  # steps per nat
LOGPROB_FLOOR = -255 / LOGPROB_SCALE
LOGPROB_MAX_ERROR = 0.5 / LOGPROB_SCALE


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


def write_shard(path: Path, captures: list[Capture], bits: int) -> dict[str, Any]:
    """Write one Parquet shard atomically; returns its manifest entry."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [encode_row(c, bits) for c in captures]
    table = pa.Table.from_pylist(rows, schema=_schema())
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
        self.manifest: dict[str, Any] = read_json(path)
        identity = self.manifest["identity"]
        self.k: int = identity["k"]
        self.vocab_size: int = identity["vocab_size"]
        self.bits: int = identity["encoding"]["id_bits"]

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
            "teacher": identity["teacher"]["path"],
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
        for name, entry in sorted(self.shards.items()):
            path = self.root / name
            if not path.is_file():
                raise DistillError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise DistillError(f"{path}: checksum mismatch (corrupted or truncated shard); regenerate it")

    def check_vocab(self, vocab_size: int, what: str) -> None:
        if vocab_size != self.vocab_size:
            raise DistillError(
                f"teacher store {self.root} has vocabulary {self.vocab_size}, but {what} has {vocab_size}; "
                "the student must share the teacher's tokenizer"
            )

    def rows(self) -> Iterator[Capture]:
        import pyarrow.parquet as pq

        for path in self.shard_paths():
            try:
                table = pq.read_table(path)
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise DistillError(f"{path}: unreadable shard ({exc}); run `distill store verify`") from exc
            for row in table.to_pylist():
                yield decode_row(row, self.k, self.bits)

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
    root: Path, identity: dict[str, Any], num_shards: int, slice_: list[int] | None, overwrite: bool
) -> dict[str, Any]:
    """The manifest dict of the store at `root`: reused when `identity` matches, else refused or reset.

    `slice_` is [I, N] for a `--shard I/N` job (recorded; any slices of the same job may share a store).
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.json"
    if path.exists():
        existing = read_json(path)
        if existing["identity"] == identity and existing["num_shards"] == num_shards and not overwrite:
            if slice_ and slice_ not in existing["slices"]:
                existing["slices"] = sorted([*existing["slices"], slice_])
            return existing
        if not overwrite:
            changed = _identity_diff(existing["identity"], identity) or ["num_shards"]
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
        diff = _identity_diff(first.manifest["identity"], other.manifest["identity"])
        if diff or other.manifest["num_shards"] != first.manifest["num_shards"]:
            raise DistillError(
                f"cannot merge {other.root} into {first.root}: {', '.join(diff) or 'num_shards'} differ"
            )
    shards: dict[str, tuple[TeacherStore, dict[str, Any]]] = {}
    for store in stores:
        store.verify()
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


def describe(store: TeacherStore) -> str:
    return json.dumps(store.summary(), indent=2)
