"""The embedded teacher: pretraining through the real CLI, kill -9 mid-run, --resume, and the cache."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.tracking import read_metrics

from .conftest import MICRO, TEACHER, TINY


def data_only_cache(cache_dir: Path, dest: Path) -> Path:
    """A cache with the session's corpus, tokenizer and tokens but no teachers."""
    for part in ("corpus", "tokenizers", "tokens"):
        shutil.copytree(cache_dir / part, dest / part)
    return dest


def pretrain_cmd(cache: Path, runs: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill",
        "pretrain",
        str(TINY),
        *MICRO,
        *TEACHER,
        f"cache_dir={cache}",
        f"runs_dir={runs}",
        "--no-progress",
        *flags,
    ]


def teacher_dir(cache: Path) -> Path:
    (found,) = (p for p in (cache / "teachers").iterdir() if not p.name.startswith("."))  # not the lock
    return found


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(cache_dir, prepared, tmp_path):
    killed_cache = data_only_cache(cache_dir, tmp_path / "killed")
    proc = subprocess.Popen(
        pretrain_cmd(killed_cache, tmp_path / "runs"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpts = list((killed_cache / "teachers").glob("*/checkpoints/step-000008/trainer_state.json"))
        if ckpts or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "pretraining finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    out = teacher_dir(killed_cache)
    assert not (out / "teacher.json").exists() and not (out / "final").exists()
    done = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert done and all((out / "checkpoints" / d / "trainer_state.json").exists() for d in done)

    refused = subprocess.run(pretrain_cmd(killed_cache, tmp_path / "runs"), capture_output=True, text=True)
    assert refused.returncode == 1 and "pass --resume to continue" in refused.stderr

    resumed = subprocess.run(
        pretrain_cmd(killed_cache, tmp_path / "runs", "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    clean_cache = data_only_cache(cache_dir, tmp_path / "clean")
    clean = subprocess.run(pretrain_cmd(clean_cache, tmp_path / "runs2"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed_rows = read_metrics(out / "metrics.jsonl")
    clean_rows = read_metrics(teacher_dir(clean_cache) / "metrics.jsonl")
    assert [r["step"] for r in killed_rows] == list(range(1, 41))
    assert [r["loss"] for r in killed_rows] == [r["loss"] for r in clean_rows]
    assert (out / "final" / "model.safetensors").read_bytes() == (
        teacher_dir(clean_cache) / "final" / "model.safetensors"
    ).read_bytes()


def test_pretrained_teacher_beats_uniform_and_is_reused(micro):
    from distill.pipeline import open_run
    from distill.stages.pretrain import pretrain

    recipe = micro(*TEACHER, "pretrain.seed=11")  # a teacher no other test has pretrained
    first = pretrain(open_run(recipe, teacher=None), progress=False)
    assert not first.reused
    assert first.test_loss < first.uniform_loss - 1.0
    assert first.uniform_loss == pytest.approx(math.log(4096))
    weights = first.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = pretrain(open_run(recipe, teacher=None), progress=False)
    assert second.reused and second.path == first.path and second.test_loss == first.test_loss
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    # bookkeeping settings do not invalidate the cache; training settings do
    again = open_run(micro(*TEACHER, "pretrain.seed=11", "pretrain.log_every=5"), teacher=None)
    assert pretrain(again, progress=False).reused
    from distill.run import teacher_key
    from distill.stages.prepare import prepare

    assert teacher_key(micro(*TEACHER, "pretrain.lr=1e-4"), prepare(recipe)) != teacher_key(
        recipe, prepare(recipe)
    )
    # the prompts to sample from are not what the teacher learns from: another count keeps it
    fewer = micro(*TEACHER, "pretrain.seed=11", "data.num_prompts=100")
    assert prepare(fewer).corpus.content_hash != prepare(recipe).corpus.content_hash
    assert teacher_key(fewer, prepare(fewer)) == teacher_key(recipe, prepare(recipe))
    assert prepare(fewer).tokenizer_dir == prepare(recipe).tokenizer_dir
    manifest = (recipe.run_dir / "manifest.json").read_text()
    assert '"pretrain"' in manifest and '"prepare"' in manifest


def test_pretrain_refuses_a_recipe_with_a_real_teacher(micro):
    from distill.errors import DistillError
    from distill.run import Run
    from distill.stages.pretrain import pretrain

    with pytest.raises(DistillError, match="no teacher to pretrain"):
        pretrain(Run(micro("teacher.tiny=null", "teacher.model=/models/llama")))


@pytest.mark.slow
def test_two_jobs_sharing_a_cache_pretrain_the_teacher_once(cache_dir, prepared, tmp_path):
    """Two jobs on one cache, both started while the teacher's lock is held: both wait, then one
    pretrains the teacher and the other reuses it."""
    from distill.artifacts import exclusive
    from distill.config import load_recipe
    from distill.run import teacher_key
    from distill.stages.prepare import prepare

    cache = data_only_cache(cache_dir, tmp_path / "cache")
    short = ("pretrain.max_steps=12", "pretrain.save_every=6")
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, *short, f"cache_dir={cache}", f"runs_dir={tmp_path}"])
    lock = cache / "teachers" / f".{teacher_key(recipe, prepare(recipe))}.lock"
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    with exclusive(lock):
        jobs = []
        for i, log in enumerate(logs):
            with open(log, "w") as fh:
                cmd = pretrain_cmd(cache, tmp_path / f"runs{i}", *short)
                jobs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + 300
        while not all("waiting for it to finish" in log.read_text() for log in logs):
            assert time.time() < deadline and all(job.poll() is None for job in jobs), logs[0].read_text()
            time.sleep(0.1)
        assert not (cache / "teachers" / lock.name[1:-5]).exists()  # nothing trained while the lock is held
    assert [job.wait(timeout=600) for job in jobs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    reused = ["(reused)" in log.read_text() for log in logs]
    assert sorted(reused) == [False, True]  # one trained, the other reused what it trained
    out = teacher_dir(cache)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 13))  # trained once
    assert (out / "final" / "model.safetensors").exists()
