"""`distill run`: every stage of a recipe in order, skipping what is already done.

The stages: prepare, pretrain (a tiny teacher), generate (the teacher store and the held-out store),
train (the KD student; through `accelerate launch` when train.distributed asks), baseline (the SFT
student, pipeline.sft_baseline), quantize, eval (lm-eval and the gate, quantized students included),
bench (the vLLM serving benchmark; its acceptance joins the gate), report, promote (when the gate
passed). Each declares itself beside its code (`pipeline_stages` in its module, `distill.stages.Stage`).

Each stage's inputs hash chains the recipe sections it reads with the hash of the stage before it, so a
changed section redoes its stage and everything after. The run's manifest.json records per stage its
status, inputs hash, outputs, duration and package versions; a stage is skipped when its record is
finished under the same hash and its outputs exist, and no stage before it ran (a stage that runs
changes what the later ones read, so they run too; their own reuse, per model in eval and per student
in quantize, keeps that cheap). A stage starts by recording itself as `running`
under its hash: after a kill, the rerun finds it there and continues it (generation resumes at the
first unfinished shard, training from its last checkpoint) instead of starting over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.artifacts import RunManifest, hash_json, read_json
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.run import Run, RunDir
from distill.stages import Stage

STAGES = (
    "prepare",
    "pretrain",
    "generate",
    "train",
    "baseline",
    "quantize",
    "eval",
    "bench",
    "report",
    "promote",
)
FINISHED = ("done", "refused")


@dataclass
class RunResult:
    recipe: RecipeConfig
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def open_run(recipe: RecipeConfig, teacher: str | None = "pretrain", progress: bool = True) -> Run:
    """The run of `recipe` with its inputs resolved, once, here: stage prepare (cached; it writes the run's
    recipe.yaml), then the teacher. teacher: "pretrain" resolves teacher.model, or the embedded teacher
    (stage pretrain trains it now or reuses it); "ready" takes the embedded teacher only if it is trained
    already (training's dense validation never pretrains one); None resolves no teacher."""
    from distill.stages.prepare import prepare

    run = Run(recipe, prepare(recipe))
    return run if teacher is None else resolve_teacher(run, teacher, progress)


class Inputs:
    """What `distill run` hands each stage (`ctx`; see distill.stages.Stage): the recipe, its run
    directory, progress and log, and the run's inputs, resolved once, when the first stage that reads them
    runs (stage prepare builds the data, stage pretrain or teacher.model gives the teacher)."""

    def __init__(self, recipe: RecipeConfig, progress: bool, log=print):
        self.recipe, self.progress, self.log = recipe, progress, log
        self.layout = RunDir(recipe.run_dir)
        self._run: Run | None = None

    def prepared(self) -> Run:
        from distill.stages.prepare import prepare

        self._run = Run(self.recipe, prepare(self.recipe))
        return self._run

    def run(self, teacher: str | None = "pretrain") -> Run:
        if self._run is None:
            self.prepared()
        if teacher is not None and not self._run.has_teacher:
            self._run = resolve_teacher(self._run, teacher, self.progress)
        return self._run

    def set_teacher(self, path: Path) -> None:
        self._run = self.run(teacher=None).with_teacher(path)


def resolve_teacher(run: Run, teacher: str = "pretrain", progress: bool = True) -> Run:
    """`run` with its teacher resolved as `open_run` does (see there)."""
    from distill.models import check_causal_lm
    from distill.run import embedded_teacher_dir
    from distill.stages.pretrain import pretrain

    recipe = run.recipe
    if recipe.teacher.model:
        path = check_causal_lm(recipe.teacher.model, "teacher.model") if teacher == "pretrain" else None
        return run.with_teacher(path or Path(recipe.teacher.model))
    if teacher == "ready":
        path = embedded_teacher_dir(recipe, run.data) / "final"
        return run.with_teacher(path) if (path / "config.json").exists() else run
    return run.with_teacher(pretrain(run, resume=True, progress=progress).path)


def stages(recipe: RecipeConfig) -> list[Stage]:
    """The recipe's stages in order, each declared beside its code (`pipeline_stages` in its module)."""
    from distill.stages import bench, evaluate, generate, prepare, pretrain, promote, quantize, report, train

    modules = (prepare, pretrain, generate, train, quantize, evaluate, bench, report, promote)
    return [stage for module in modules for stage in module.pipeline_stages(recipe)]


def plan(recipe: RecipeConfig) -> list[Stage]:
    """The recipe's stages with their chained inputs hashes."""
    upstream = hash_json({"distill-pipeline": 1, "name": recipe.name, "device": recipe.device})
    out = stages(recipe)
    assert tuple(s.name for s in out) == STAGES
    for stage in out:
        if stage.off is None:
            stage.hash = hash_json({"stage": stage.name, "inputs": stage.inputs, "upstream": upstream})
            upstream = stage.hash
    return out


def state(stage: Stage, manifest: RunManifest, ctx: Inputs) -> str:
    """finished (same inputs, outputs present), interrupted (started under these inputs), changed (run by
    `distill run` with other inputs), or new (never run by `distill run`: the stage's own reuse decides)."""
    record = manifest.stage(stage.name)
    if record is None or "pipeline_hash" not in record:
        return "new"
    if record["pipeline_hash"] != stage.hash:
        return "changed"
    outputs = stage.outputs(ctx)
    if record["status"] in FINISHED and outputs is not None and all(p.exists() for p in outputs):
        return "finished"
    return "interrupted"


def select(names: list[str], start: str | None, only: str | None) -> set[str]:
    for value, flag in ((start, "--from"), (only, "--only")):
        if value is not None and value not in names:
            raise DistillError(f"{flag} {value}: not a stage (stages: {', '.join(names)})")
    if only is not None:
        return {only}
    if start is not None:
        return set(names[names.index(start) :])
    return set()


def run(
    recipe: RecipeConfig,
    start: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    log=print,
) -> RunResult:
    """Run the stages of `recipe` in order: a finished stage with unchanged inputs is skipped (unless
    `start`/`only` forces it), an interrupted one continues, a changed one is redone."""
    started = time.perf_counter()
    all_stages = plan(recipe)
    ctx = Inputs(recipe, progress, log)
    forced = select([s.name for s in all_stages], start, only)
    result = RunResult(recipe)
    manifest = RunManifest(recipe.run_dir)
    for stage in all_stages:
        if only is not None and stage.name != only:
            continue
        if stage.off is not None:
            log(f"[{stage.name}] off: {stage.off}")
            continue
        status = state(stage, manifest, ctx)
        if status == "finished" and stage.name not in forced and not result.ran:
            log(f"[{stage.name}] unchanged: skipped")
            result.skipped.append(stage.name)
            continue
        if dry_run:
            rerun = (
                "will rerun (--from/--only)" if stage.name in forced else "will rerun (an earlier stage runs)"
            )
            what = {"new": "will run", "interrupted": "will continue", "changed": "inputs changed: will redo",
                    "finished": rerun}[status]  # fmt: skip
            result.ran.append(stage.name)  # what follows a stage that runs runs too
            log(f"[{stage.name}] {what}")
            for line in stage.plan(ctx):
                log(f"    {line}")
            continue
        log(f"[{stage.name}] {'continuing' if status == 'interrupted' else 'running'}")
        t0 = time.perf_counter()
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        RunManifest(recipe.run_dir).record(
            stage.name, "running", stage.hash, {}, 0.0, pipeline_hash=stage.hash
        )
        outputs = stage.run(ctx, status in ("changed",) or (status == "finished" and stage.name in forced))
        fresh = RunManifest(recipe.run_dir)  # stages write their own records: merge their outputs
        own_record = fresh.stage(stage.name) or {}
        own = own_record.get("outputs", {})
        # the stage's own inputs hash stays (its reruns by hand with the same inputs keep this record)
        inputs_hash = own_record["inputs_hash"] if own_record.get("status") != "running" else stage.hash
        status_word = "done"
        if stage.name == "promote" and outputs.get("refused"):
            status_word = "refused"
        seconds = time.perf_counter() - t0
        fresh.record(
            stage.name, status_word, inputs_hash, {**own, **outputs}, seconds, pipeline_hash=stage.hash
        )
        manifest = fresh
        result.ran.append(stage.name)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- the summary


def _score(models: dict, name: str, task: str, metric: str) -> str:
    value = models.get(name, {}).get("scores", {}).get(task, {}).get(metric)
    return "" if value is None else f"{value:.4g}"


HELD_OUT_COLUMNS = (
    ("distill_outside_ppl", "bits_per_byte"),
    ("distill_match_test", "kl"),
    ("distill_match_outside", "kl"),
    ("distill_match_outside", "top1_agreement"),
    ("distill_bytes_outside", "byte_agreement"),
)


def summary(recipe: RecipeConfig, result: RunResult) -> list[str]:
    """The table `distill run` ends with: every model's size, scores, acceptance and speed, the gate,
    the report and how to serve the promoted student."""
    from distill.gate import DISTILLED_DRAFT
    from distill.stages.report import _md_table, by_role, gather

    layout = RunDir(recipe.run_dir)
    run_dir = layout.path
    lines = [f"run: {run_dir} (ran: {', '.join(result.ran) or 'nothing'}; "
             f"skipped as unchanged: {', '.join(result.skipped) or 'nothing'}; {result.seconds:.0f}s)"]  # fmt: skip
    gate_path = layout.gate_file
    if not gate_path.exists():
        return lines
    if read_json(gate_path).get("status") == "evaluating":
        return [*lines, f"gate: the evaluation did not finish ({gate_path})"]
    data = gather(run_dir)  # what the report shows: gate, model sizes, serving benchmark
    gate, sizes = data["gate"], data["sizes"]
    models = gate.get("models", {})
    bench = (data["bench"] or {}).get("setups", {})
    manifest = layout.manifest
    columns = [(c.task, c.metric) for c in recipe.eval.gate.criteria] or [
        (task, next(iter(row), "")) for task, row in next(iter(models.values()), {}).get("scores", {}).items()
    ]
    # the figures no training objective reaches, whether or not the gate names them
    scored = next(iter(models.values()), {}).get("scores", {})
    for task, metric in HELD_OUT_COLUMNS:
        if (task, metric) not in columns and metric in scored.get(task, {}):
            columns.append((task, metric))
    expected = {name: m["expected_acceptance"]["acceptance_rate"] for name, m in models.items()
                if m.get("expected_acceptance")}  # fmt: skip
    measured = {"student": bench.get(DISTILLED_DRAFT, {}).get("acceptance_rate"),
                "sft": bench.get("teacher+baseline", {}).get("acceptance_rate")}  # fmt: skip
    header = ["model", "parameters", "on disk", *[f"{t} {m}" for t, m in columns], "expected acceptance",
              "measured acceptance", "tokens/s alone"]  # fmt: skip
    rows = []
    for name, info in by_role(models):
        size = sizes[name]
        setup = "teacher" if info["role"] == "teacher" else name
        speed = bench.get(setup, {}).get("levels", {})
        top = speed[max(speed, key=int)]["output_tokens_per_s"] if speed else None
        label = {"sft": "SFT baseline", "student": "KD student", "initial": "initial student"}.get(name, name)
        rows.append([
            label,
            f"{size['parameters'] / 1e6:.2f} M" if size["parameters"] else "n/a",
            f"{size['bytes'] / 2**20:.1f} MiB" if size["bytes"] else "n/a",
            *[_score(models, name, t, m) for t, m in columns],
            "" if expected.get(name) is None else f"{expected[name]:.3f}",
            "" if measured.get(name) is None else f"{measured[name]:.3f}",
            "" if top is None else f"{top:,.0f}" + (f" (c={max(speed, key=int)})" if speed else ""),
        ])  # fmt: skip
    lines += ["", _md_table(header, rows), ""]
    from distill.gate import failing

    verdict = "PASSED" if gate["passed"] else "FAILED"
    lines.append(f"gate: {verdict} ({len(gate['checks'])} checks, noise {gate['noise']})")
    lines += [f"  {line}" for line in failing(gate)]
    report = layout.report_html
    if report.exists():
        lines.append(f"report: {report}")
    promoted = (manifest.stage("promote") or {}).get("outputs", {}).get("promoted")
    if promoted:
        lines.append(f"promoted: {promoted}; serve it: distill serve --promoted {promoted} --student "
                     "(or --draft: the teacher with it as draft)")  # fmt: skip
    else:
        why = "pipeline.promote is false" if not recipe.pipeline.promote else "the gate did not pass"
        lines.append(f"not promoted ({why}); to serve the student anyway: distill serve {run_dir} --student")
    return lines
