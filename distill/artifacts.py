"""Files between stages: atomic writes, content hashes, and the run manifest.

Every write goes to a temporary name in the same directory, is fsynced, then renamed over the target,
so a stage killed mid-write leaves the previous good file (or directory) in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.errors import DistillError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys), for cache keys and input hashes."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def hash_tree(root: Path) -> str:
    """Hash of every file's relative path and content under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def begin_directory(target: Path, tag: str | int | None = None) -> Path:
    """A fresh temporary sibling of `target` to fill (`.name.tmp-TAG`, TAG the pid by default)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid() if tag is None else tag}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_directory(tmp: Path, target: Path) -> None:
    """fsync the filled `tmp` and rename it to `target`; an existing `target` is replaced only now."""
    target = Path(target)
    fsync_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is fsynced and renamed to `target`.

    An existing `target` is replaced only after the new one is complete. If the body raises (or the
    process dies), `target` is untouched and the temporary directory is left for `remove_stale_temps`.
    """
    tmp = begin_directory(target)
    yield tmp
    commit_directory(tmp, target)


@contextmanager
def exclusive(lock_path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the body: processes that share a
    cache take turns at building one entry instead of building it together. The kernel drops the lock
    when its holder exits, killed or not, so a dead holder never blocks the next. `waiting` is printed
    once if another process holds the lock."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _writer_alive(name: str) -> bool:
    """`.name.tmp-PID` of another process of this machine that is still running (still writing it)."""
    tag = name.rsplit("-", 1)[-1]
    if not tag.isdigit() or int(tag) == os.getpid():
        return False
    try:
        os.kill(int(tag), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def remove_stale_temps(directory: Path) -> None:
    """Clean up after writes that died: delete `.name.tmp-PID` and `.name.del-PID`; a `.name.old-PID`
    whose `name` is gone (killed between the two renames of `atomic_directory`) is put back. The
    temporaries of a writer that is still running are left alone."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(".") or _writer_alive(path.name):
            continue
        if ".old-" in path.name:
            target = directory / path.name[1:].rsplit(".old-", 1)[0]
            if not target.exists():
                os.replace(path, target)
                continue
        if any(marker in path.name for marker in (".tmp-", ".old-", ".del-")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


QUANT_RECORD = "distill-quant.json"  # written last into quant/<scheme>/: the directory is finished


def remove_directory(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its real name."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and prove we can write there, or raise a one-line error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DistillError(f"{what} {path} is not writable: {exc.strerror or exc}") from exc
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunManifest:
    """`runs/<name>/manifest.json`: per stage its status, inputs hash, outputs, duration, versions."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data: dict[str, Any] = read_json(self.path) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def record(
        self, name: str, status: str, inputs_hash: str, outputs: dict[str, Any], seconds: float, **extra: Any
    ) -> None:
        old = self.data["stages"].get(name) or {}
        if "pipeline_hash" in old and "pipeline_hash" not in extra and old.get("inputs_hash") == inputs_hash:
            extra["pipeline_hash"] = old["pipeline_hash"]  # the stage redone by hand with the same inputs
        self.data["stages"][name] = {
            **extra,
            "status": status,
            "inputs_hash": inputs_hash,
            "outputs": outputs,
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": package_versions(),
        }
        atomic_write_json(self.path, self.data)


def package_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("distill", "torch", "transformers", "vllm", "accelerate", "deepspeed", "peft", "lm-eval"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
