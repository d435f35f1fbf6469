"""Checkpoints of the loop: written atomically by every process together, listed, pruned, and checked
against the settings they were made with (a resume must compute what the uninterrupted run would)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.artifacts import (
    atomic_write_json,
    begin_directory,
    commit_directory,
    hash_json,
    read_json,
    remove_directory,
)
from distill.config import BOOKKEEPING
from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.training.loop import TrainJob


def settings_hash(job: TrainJob) -> str:
    """What must match to resume exactly: every setting but logging and bookkeeping."""
    train = job.cfg.model_dump(mode="json", exclude=set(BOOKKEEPING))
    for key in ("teacher_url", "retries"):  # where the teacher answers is not a training setting
        train.get("on_policy", {}).pop(key, None)
    teacher_tokenizer = job.teacher_tokenizer_dir
    return hash_json(
        {
            "train": train,
            "seq_len": job.seq_len,
            "tokens": str(Path(job.tokens_dir).resolve()),
            "tokenizer": str(Path(job.tokenizer_dir).resolve()),
            "teacher_tokenizer": str(Path(teacher_tokenizer).resolve()) if teacher_tokenizer else None,
            "store": _store_fingerprint(job.store),
            "model": job.model_settings,
            "device": job.device,
            "mixed_precision": job.mixed_precision,
        }
    )


def _store_fingerprint(store: Path | None) -> str | None:
    if store is None:
        return None
    manifest = read_json(Path(store) / "manifest.json")
    return hash_json({"identity": manifest["identity"], "shards": manifest["shards"]})


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once trainer_state.json is inside)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, out_dir: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Every process writes its part (DeepSpeed shards, RNG states) into one temporary directory, which
    the main process renames when complete: a kill mid-write never replaces or hides the last good one."""
    target = Path(out_dir) / "checkpoints" / f"step-{state['step']:06d}"
    tmp = target.with_name(f".{target.name}.tmp-save")
    if accelerator.is_main_process:
        begin_directory(target, tag="save")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", state)
        commit_directory(tmp, target)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            remove_directory(old)
    accelerator.wait_for_everyone()
    return target


def check_checkpoints(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; checkpoints without --resume are refused (never overwritten)."""
    checkpoints = list_checkpoints(out_dir)
    if checkpoints and not resume:
        raise DistillError(
            f"{out_dir} has checkpoints (last: {checkpoints[-1].name}); pass --resume to continue "
            "or --overwrite to start over"
        )
    return checkpoints[-1] if checkpoints else None
