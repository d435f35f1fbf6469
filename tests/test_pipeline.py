"""`distill run` (what `make demo` calls) on a micro recipe, through the real CLI: every stage from nothing,
a rerun that does no work, and a kill -9 during training that a rerun completes with the same student."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import MICRO, ROOT, TEACHER, TINY, kill_tree

REDUCED = [
    *MICRO,
    *TEACHER,
    "teacher.backend=hf",  # the stores through transformers: the chaining is the point (vLLM's: test_generate)
    "generate.mode=score",
    "generate.num_sequences=48",
    "generate.items_per_shard=24",
    "generate.top_k=16",
    "generate.validation_sequences=16",
    "train.max_steps=24",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=3",
    "train.eval_every=8",
    "train.save_every=4",
    "quantize.calibration_samples=16",
    "quantize.calibration_seq_len=64",
    "eval.backend=hf",
    "eval.limit=40",
    "serve.bench.setups=[teacher+student]",
    "serve.bench.requests=8",
    "serve.bench.concurrency=[2]",
    "serve.bench.max_tokens=8",
    "serve.bench.prompt_tokens=16",
    "pipeline.sft_baseline=true",
    # a gate this micro teacher's students can pass (the point here is the chaining, not the quality)
    "eval.gate.criteria=[{task: distill_cloze, metric: acc, max_drop: 0.5}]",
    "eval.gate.min_acceptance_rate=0.05",
]


def run_cmd(runs, *extra):
    return [sys.executable, "-m", "distill", "run", str(TINY), *REDUCED, f"runs_dir={runs}",
            f"registry_dir={runs / 'registry'}", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(cache_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("pipeline")
    out = subprocess.run(run_cmd(runs), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs, out.stdout


@pytest.mark.slow
def test_every_stage_runs_from_nothing_and_a_rerun_does_no_work(full_run):
    runs, stdout = full_run
    run_dir = runs / "tiny"
    stages = ["prepare", "pretrain", "generate", "train", "baseline", "quantize", "eval", "bench", "report",
              "promote"]  # fmt: skip
    assert f"run: {run_dir} (ran: {', '.join(stages)}; skipped as unchanged: nothing;" in stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for stage in stages:
        record = manifest[stage]
        assert record["status"] == "done" and record["pipeline_hash"] and record["versions"]["vllm"], stage
        assert record["seconds"] >= 0 and record["finished_at"], stage
    assert (
        manifest["eval"]["outputs"]["eval_passed"] and manifest["promote"]["outputs"]["promoted"] == "tiny@1"
    )
    # the artifacts of every stage
    assert (run_dir / "teacher" / "manifest.json").exists() and (run_dir / "teacher-validation").is_dir()
    for model in ("student/final", "baseline/final", "quant/w8a8"):
        assert (run_dir / model / "config.json").exists(), model
    gate = json.loads((run_dir / "eval" / "gate.json").read_text())
    assert gate["passed"] and set(gate["models"]) == {"teacher", "sft", "student", "student-w8a8"}
    assert gate["models"]["sft"]["role"] == "baseline"  # evaluated next to the student, not gated
    assert {c["model"] for c in gate["checks"]} == {"student", "student-w8a8"}
    (serve,) = [c for c in gate["checks"] if c["task"] == "serve"]
    bench = json.loads((run_dir / "serve" / "bench.json").read_text())["setups"]
    assert serve["value"] == bench["teacher+student"]["acceptance_rate"] > 0
    assert (run_dir / "report" / "report.html").exists()
    entry = json.loads((runs / "registry" / "tiny" / "1" / "entry.json").read_text())
    assert entry["gate"]["passed"] and set(entry["quantized"]) == {"w8a8"}
    # the summary table: the teacher, the SFT baseline, the KD student and the quantized student
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[1:]] == ["| teacher", "| SFT baseline", "| KD student",
                                                          "| student-w8a8"]  # fmt: skip
    # the eval stage's expected acceptance of both drafts, next to the measured one for the KD student
    expected = {name: gate["models"][name]["expected_acceptance"] for name in ("sft", "student")}
    assert expected["student"]["acceptance_rate"] == pytest.approx(
        bench["teacher+student"]["acceptance_rate"], abs=0.05
    )
    for label, name in (("| SFT baseline", "sft"), ("| KD student", "student")):
        (row,) = [r.split(" | ") for r in table if r.startswith(label + " ")]
        assert row[-3] == f"{expected[name]['acceptance_rate']:.3f}", row
    assert "gate: PASSED" in stdout and f"report: {run_dir / 'report' / 'report.html'}" in stdout
    assert "promoted: tiny@1; serve it: distill serve --promoted tiny@1 --student" in stdout

    started = time.time()
    again = subprocess.run(run_cmd(runs), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(ran: nothing; skipped as unchanged: {', '.join(stages)};" in again.stdout
    assert time.time() - started < 60  # nothing was recomputed (no engine started, no model trained)
    assert not (runs / "registry" / "tiny" / "2").exists()

    # a damaged shard is not "unchanged": the store is checked, and generate goes back to work
    shard = sorted((run_dir / "teacher").glob("shard-*.parquet"))[0]
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    damaged = subprocess.run(run_cmd(runs, "--dry-run"), capture_output=True, text=True)
    shard.write_bytes(good)
    assert damaged.returncode == 0, damaged.stderr[-2000:]
    assert f"generate: {shard}: checksum mismatch with the store's manifest" in damaged.stdout
    assert "[generate] will continue" in damaged.stdout and "[prepare] unchanged: skipped" in damaged.stdout

    # a changed section redoes its stage and what follows, not what precedes
    changed = subprocess.run(run_cmd(runs, "--dry-run", "eval.limit=30"), capture_output=True, text=True)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "[train] unchanged: skipped" in changed.stdout
    assert "[eval] inputs changed: will redo" in changed.stdout and "[bench] inputs changed" in changed.stdout


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_ends_with_the_uninterrupted_student(full_run, tmp_path):
    runs, _ = full_run
    killed = tmp_path / "runs"
    shutil.copytree(runs / "tiny", killed / "tiny")  # the same finished stages; training is redone below
    flags = ["pipeline.quantize=false", "pipeline.bench=false", "pipeline.sft_baseline=false"]
    proc = subprocess.Popen(run_cmd(killed, "--from", "train", *flags), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoints = killed / "tiny" / "student" / "checkpoints"
    deadline = time.time() + 600
    while not list(checkpoints.glob("step-000008/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training finished before it could be killed"
        time.sleep(0.05)
    kill_tree(proc)
    assert not (killed / "tiny" / "student" / "final").exists()
    manifest = json.loads((killed / "tiny" / "manifest.json").read_text())["stages"]
    assert manifest["train"]["status"] == "running"

    out = subprocess.run(run_cmd(killed, *flags), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[generate] unchanged: skipped" in out.stdout and "[train] continuing" in out.stdout
    a = load_file(runs / "tiny" / "student" / "final" / "model.safetensors")
    b = load_file(killed / "tiny" / "student" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_train_stage_launches_ddp_processes_and_matches_one_process(full_run, tmp_path):
    """train.distributed asks for DDP over 2 processes: `distill run` trains through `accelerate launch`,
    with half the batch per process, the same global batch and so (nearly) the same student."""
    runs, _ = full_run
    launched = tmp_path / "runs"
    shutil.copytree(runs / "tiny", launched / "tiny")
    started = time.time()
    flags = ["pipeline.quantize=false", "pipeline.bench=false", "pipeline.sft_baseline=false",
             "train.distributed.backend=ddp", "train.distributed.num_processes=2", "train.batch_size=4"]  # fmt: skip
    out = subprocess.run(run_cmd(launched, "--only", "train", *flags), capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[train] running" in out.stdout
    assert (
        "accelerate launch --config_file" in out.stdout + out.stderr
        and "--num_processes 2" in out.stdout + out.stderr
    )
    record = json.loads((launched / "tiny" / "manifest.json").read_text())["stages"]["train"]
    assert record["status"] == "done" and record["outputs"]["launched"] is True
    one = load_file(runs / "tiny" / "student" / "final" / "model.safetensors")
    two = load_file(launched / "tiny" / "student" / "final" / "model.safetensors")
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)  # only the reduction order differs
    # retrained (not the copied student): written after the test started
    assert (launched / "tiny" / "student" / "final" / "model.safetensors").stat().st_mtime > started


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_dry_runs(recipe, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(ROOT / "recipes" / recipe), f"runs_dir={tmp_path}",
         "--dry-run"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[train] will run" in out.stdout and "[eval] will run" in out.stdout
    assert not (tmp_path / recipe.removesuffix(".yaml")).exists()  # a plan only: nothing written
