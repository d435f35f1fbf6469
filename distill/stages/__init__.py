"""The stages, side by side: each is a function of the run and its own recipe section, and no stage module
imports another (they share only the layer below: run, config, store, models, losses, vllm, tracking).
What a stage needs from another, it reads from the run directory.

Each stage module also declares how `distill run` drives it, beside its code: `pipeline_stages(recipe)`
returns its `Stage` records (train returns two: the KD student and the SFT baseline). The pipeline lists
the modules in order and does the rest (hashes, skipping, resuming, the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Stage:
    """One stage as `distill run` drives it. `ctx` is the pipeline's view of the run being built: `.recipe`,
    `.layout` (its RunDir), `.progress`, `.log`, `.run(teacher=...)` (the Run, its data prepared and its
    teacher resolved on first use), `.prepared()` (prepare now) and `.set_teacher(path)`."""

    name: str
    inputs: dict[str, Any]  # the recipe sections the stage reads: hashed, and chained to the stage before
    run: Callable[[Any, bool], dict]  # run(ctx, redo) -> outputs; redo: the inputs changed since the last run
    outputs: Callable[[Any], list[Path] | None]  # what must exist for it to count as done (None: damaged)
    plan: Callable[[Any], list[str]]  # the commands a dry run prints
    off: str | None = None  # why the recipe leaves it out
    hash: str = ""


def dump(section) -> Any:
    """A recipe section as the plain data a stage's inputs hash reads (None stays None)."""
    return section.model_dump() if section is not None else None


def nothing(ctx) -> list[Path]:
    """The outputs of a stage that is done once it ran (its own reuse checks the rest)."""
    return []
