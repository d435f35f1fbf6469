"""Experiment tracking: wandb (offline by default), or a null tracker with the same methods."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill.artifacts import atomic_write_text
from distill.config import TrackingConfig
from distill.errors import DistillError


class NullTracker:
    """Stands in when wandb is disabled; accepts the same calls and does nothing."""

    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(
        self, cfg: TrackingConfig, name: str, out_dir: Path, config: dict[str, Any], resume_id: str | None
    ):
        import wandb

        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                id=resume_id,
                resume="allow" if resume_id else None,
                mode=cfg.wandb,
                dir=str(out_dir),
                config=config,
            )
        except wandb.errors.UsageError as exc:
            raise DistillError(
                f"tracking.wandb={cfg.wandb}: {exc} (log in with `wandb login`, or use tracking.wandb=offline)"
            ) from exc
        self.run_dir = Path(self.run.dir).parent
        self.id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(
    cfg: TrackingConfig, name: str, out_dir: Path, config: dict[str, Any], resume_id: str | None = None
):
    if cfg.wandb == "disabled":
        return NullTracker()
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbTracker(cfg, name, out_dir, config, resume_id)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step. On resume, rows after the checkpoint are dropped
    so that the log reads exactly as an uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            rows = _parse_rows(self.path.read_text())
            kept = [row for row in rows if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def _parse_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return _parse_rows(Path(path).read_text())
