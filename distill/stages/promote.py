"""Promotion and the registry of promoted students.

`distill promote RUN` copies a run's student (and every quant/<scheme>/ of it) into
`<registry>/<name>/<version>/` with `entry.json` (name, version, time, paths, the gate decision, the
teacher's identity, the serving benchmark's figures, whether the gate was overridden and why) and the
run's resolved recipe, so a promoted version stays what it was when the run is retrained or deleted.

Writes are atomic: a version is assembled in a hidden temporary directory, fsynced, and renamed into
place under a per-name lock; a kill at any point leaves either no new version or a complete one (the
leftover temporary directory is removed by the next promotion). Versions are 1, 2, ... per name;
`NAME` alone means the newest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from distill.artifacts import (
    atomic_write_json,
    begin_directory,
    commit_directory,
    read_json,
    remove_stale_temps,
)
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.run import Run, RunDir

GATE_FAILED = 3
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PromotionRefused(DistillError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=GATE_FAILED)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """NAME or NAME@VERSION."""
    name, sep, version = ref.partition("@")
    if not NAME.match(name) or (sep and not version.isdigit()):
        raise DistillError(f"{ref}: expected NAME or NAME@VERSION (a name of letters, digits, . _ -)")
    return name, int(version) if sep else None


def versions(registry: Path, name: str) -> list[int]:
    root = Path(registry) / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "entry.json").exists())


def resolve(registry: Path, ref: str) -> Path:
    """The directory of NAME@VERSION (or NAME's newest version), or a one-line error naming what exists."""
    name, version = parse_ref(ref)
    have = versions(registry, name)
    if not have:
        names = (
            sorted(p.name for p in Path(registry).iterdir() if p.is_dir()) if Path(registry).is_dir() else []
        )
        raise DistillError(
            f"{name} is not in the registry {registry}"
            + (f" (it has: {', '.join(names)})" if names else " (it is empty; `distill promote RUN` first)")
        )
    if version is None:
        version = have[-1]
    elif version not in have:
        raise DistillError(f"{name}@{version} is not in the registry {registry} (versions: {have})")
    return Path(registry) / name / str(version)


def entries(registry: Path) -> list[dict]:
    registry = Path(registry)
    if not registry.is_dir():
        return []
    out = []
    for root in sorted(p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += [read_json(root / str(v) / "entry.json") for v in versions(registry, root.name)]
    return out


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def teacher_identity(run: Run) -> dict:
    """The teacher the student learned from: the teacher store's record of it (path and hashes of config
    and weights), else the hashes of the run's teacher model, else the recipe's path."""
    manifest = run.store / "manifest.json"
    if manifest.exists():
        store = read_json(manifest)
        path = store.get("made_from", {}).get("teacher")
        return {**store["identity"]["teacher"], **({"path": path} if path else {})}
    from distill.models import model_fingerprint

    try:
        return model_fingerprint(run.teacher, run.recipe.cache_path)
    except (DistillError, OSError):
        return {"path": run.recipe.teacher.model}


def gate_failures(gate: dict | None) -> list[str]:
    from distill.gate import failing

    if gate is None:
        return ["no gate decision (run `distill eval`)"]
    if gate.get("status") == "evaluating":
        return ["the evaluation did not finish (rerun `distill eval`)"]
    if gate.get("passed"):
        return []
    return failing(gate) or ["the gate failed"]


def promote(
    run: Run,
    name: str | None = None,
    force: bool = False,
    reason: str | None = None,
    registry: Path | None = None,
) -> dict:
    """Register the run's student as the next version of `name` (default: the run's name). Refused when
    the gate did not pass, unless `force` with a `reason`, which the entry records."""
    from distill.gate import fresh_bench
    from distill.models import model_fingerprint

    recipe = run.recipe
    name = name or recipe.name
    parse_ref(name)
    if force and not (reason or "").strip():
        raise DistillError('--force needs --reason "..." (the reason is recorded in the registry entry)')
    registry = Path(registry or recipe.registry_path)
    run_dir, student = run.path, run.student
    if not (student / "config.json").exists():
        raise DistillError(f"no student to promote at {student} (run `distill train` first)")
    gate = read_json(run.gate_file) if run.gate_file.exists() else None
    failures = gate_failures(gate)
    if failures and not force:
        raise PromotionRefused(
            f"{run_dir} did not pass the gate, so it is not promoted: {'; '.join(failures)} "
            '(to promote it anyway: --force --reason "...")'
        )
    quants = run.quantized_students()
    bench = fresh_bench(run, recipe.cache_path)
    weights = model_fingerprint(student, recipe.cache_path)["weights_hash"]
    root = registry / name
    with _locked(root):
        remove_stale_temps(root)
        have = versions(registry, name)
        if have:  # promoting the same student again names the version it already has
            newest = read_json(root / str(have[-1]) / "entry.json")
            if newest.get("weights_hash") == weights and newest["quantized"].keys() == {
                q.name for q in quants
            }:
                return {**newest, "reused": True}
        version = (have or [0])[-1] + 1
        target = root / str(version)
        tmp = begin_directory(target)
        shutil.copytree(student, tmp / "student")
        for quant in quants:
            shutil.copytree(quant, tmp / "quant" / quant.name)
        shutil.copy2(run.recipe_file, tmp / "recipe.yaml")
        entry = {
            "name": name,
            "version": version,
            "ref": f"{name}@{version}",
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": str(run_dir.resolve()),
            "student": str((target / "student").resolve()),
            "quantized": {q.name: str((target / "quant" / q.name).resolve()) for q in quants},
            "source": {"student": str(student.resolve()), **{q.name: str(q.resolve()) for q in quants}},
            "weights_hash": weights,
            "teacher": teacher_identity(run),
            "gate": {
                "passed": not failures,
                "failures": failures,
                "checks": (gate or {}).get("checks", []),
                "scores": {m: v.get("scores") for m, v in (gate or {}).get("models", {}).items()},
            },
            "forced": bool(failures),
            "reason": reason if force else None,
            "serve_bench": _bench_summary(bench),
            "num_speculative_tokens": recipe.serve.num_speculative_tokens,
            "promoted_by": os.environ.get("USER") or None,
        }
        atomic_write_json(tmp / "entry.json", entry)
        commit_directory(tmp, target)
    return entry


def _bench_summary(bench: dict | None) -> dict | None:
    if bench is None:
        return None
    return {
        name: {
            "acceptance_rate": row.get("acceptance_rate"),
            "mean_acceptance_length": row.get("mean_acceptance_length"),
            "output_tokens_per_s": {c: v["output_tokens_per_s"] for c, v in row["levels"].items()},
        }
        for name, row in bench["setups"].items()
    }


def served_recipe(entry_dir: Path, overrides: list[str]) -> RecipeConfig:
    """The promoted run's recipe, whose student is the registry's copy (so serving needs no run dir)."""
    from distill.config import load_recipe

    return load_recipe(Path(entry_dir) / "recipe.yaml", overrides)


def student_of(entry_dir: Path, quant: str | None) -> Path:
    path = Path(entry_dir) / ("student" if quant is None else f"quant/{quant}")
    if not (path / "config.json").exists():
        have = sorted(p.name for p in (Path(entry_dir) / "quant").glob("*")) or ["none"]
        raise DistillError(f"{entry_dir} has no quantized student {quant} (it has: {', '.join(have)})")
    return path


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage): a student whose gate failed is
    not promoted, and the stage records why (status `refused`)."""
    from distill.stages import Stage, nothing

    layout = RunDir(recipe.run_dir)

    def go(ctx, redo: bool) -> dict:
        gate_path = layout.gate_file
        failures = gate_failures(read_json(gate_path) if gate_path.exists() else None)
        if failures:
            return {"promoted": None, "refused": failures}
        entry = promote(ctx.run(teacher="ready"))
        return {
            "promoted": entry["ref"],
            "entry": str(recipe.registry_path / entry["name"] / str(entry["version"])),
        }

    return [
        Stage(
            "promote",
            {"registry": str(recipe.registry_path)},
            run=go,
            outputs=nothing,
            plan=lambda ctx: [f"distill promote {layout.path}   (only if the gate passed)"],
            off=None if recipe.pipeline.promote else "pipeline.promote is false",
        )
    ]
