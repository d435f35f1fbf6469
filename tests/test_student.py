"""Student training on a real teacher store (captured with the transformers backend: no engine start)."""

import json
import shutil
import subprocess
import sys

import pytest

from distill.tracking import read_metrics

from .conftest import MICRO, TINY
from .test_pretrain import TEACHER

STORE = [
    "teacher.backend=hf",
    "generate.mode=score",
    "generate.num_sequences=48",
    "generate.items_per_shard=24",
    "generate.top_k=16",
]
TRAIN = [
    "train.max_steps=30",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=10",
    "train.save_every=10",
]


def distill(*args, runs):
    cmd = [
        sys.executable,
        "-m",
        "distill",
        args[0],
        str(TINY),
        *MICRO,
        *TEACHER,
        *STORE,
        f"runs_dir={runs}",
        *args[1:],
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def store_runs(cache_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("kd")
    out = distill("generate", runs=runs)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs


@pytest.mark.slow
def test_kd_student_learns_from_the_store(store_runs):
    out = distill(
        "train", "train.loss=forward_kl", "train.ce_weight=0.1", *TRAIN, "--no-progress", runs=store_runs
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(store_runs / "tiny" / "student" / "metrics.jsonl")
    assert {"loss", "loss_kd", "loss_ce", "lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    first, last = sum(r["loss_kd"] for r in rows[:5]) / 5, sum(r["loss_kd"] for r in rows[-5:]) / 5
    assert last < first * 0.8
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_kd"] + 0.1 * r["loss_ce"], rel=1e-6)
    assert rows[0]["tokens"] == 8 * 63  # score mode over 64-token blocks: 63 targets per sequence
    assert (store_runs / "tiny" / "student" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_sft_baseline_trains_on_the_same_sequences(store_runs, tmp_path):
    shutil.copytree(store_runs / "tiny" / "teacher", tmp_path / "tiny" / "teacher")
    out = distill("train", "train.loss=ce", *TRAIN, "--no-progress", runs=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path / "tiny" / "student" / "metrics.jsonl")
    assert "loss_kd" not in rows[0] and rows[0]["loss"] == pytest.approx(rows[0]["loss_ce"])
    assert rows[0]["tokens"] == 8 * 63  # the store's positions (here the same blocks), masked like KD
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"


def test_an_empty_or_missing_store_is_refused_before_training(micro):
    from distill.errors import DistillError
    from distill.student import train_student

    with pytest.raises(DistillError, match="no teacher store at .*teacher"):
        train_student(micro("train.loss=reverse_kl"))
