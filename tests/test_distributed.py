"""Distributed student training for real: `distill train` launches 2 gloo processes with accelerate
launch (DDP, DeepSpeed ZeRO-2, ZeRO-3), each is killed with SIGKILL after a checkpoint, resumed, and
must reproduce the single-process run (same global batch) step by step, the hidden-state loss and its
learned projection included."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from distill.store import TeacherStore
from distill.tracking import read_metrics

from .conftest import MICRO, TEACHER, TINY, kill_tree, run_cli

STORE = [  # scoring 3k tokens on CPU: teacher.backend auto captures with transformers (no engine start)
    "generate.mode=score",
    "generate.num_sequences=48",
    "generate.items_per_shard=24",
    "generate.top_k=16",
    "generate.validation_sequences=16",
]
TRAIN = [
    "train.max_steps=30",
    "train.lr=3e-3",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=10",
    "train.save_every=10",
    "train.keep_last=3",
    # train.hidden with a student narrower than the teacher (64 against 128): a learned projection, trained
    # with the student, kept in checkpoints (so resumed) and never exported
    "student.tiny.hidden_size=64",
    "train.hidden={pairs: [[0, 1]], loss: mse, weight: 0.5}",
]
MODES = {
    "ddp": ["train.distributed.backend=ddp"],
    "zero2": ["train.distributed.backend=deepspeed", "train.distributed.zero_stage=2"],
    "zero3": ["train.distributed.backend=deepspeed", "train.distributed.zero_stage=3"],
}


def command(*args, runs):
    return [
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


def distill(*args, runs):
    return subprocess.run(command(*args, runs=runs), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def store_runs(cache_dir, tmp_path_factory):
    """A teacher store and a held-out store, shared by the runs of this module (each copies it)."""
    runs = tmp_path_factory.mktemp("dist")
    for split in ("train", "validation"):  # through the CLI's main in this process: no launch here
        out = run_cli(*command("generate", "--split", split, runs=runs)[3:])
        assert out.returncode == 0, out.stderr[-3000:]
        assert "generate: teacher.backend auto: transformers (scoring " in out.stdout
    assert TeacherStore(runs / "tiny" / "teacher").summary()["backend"] == "hf"
    return runs


def fresh_run(store_runs, path):
    import shutil

    for name in ("teacher", "teacher-validation"):
        shutil.copytree(store_runs / "tiny" / name, path / "tiny" / name)
    return path


@pytest.fixture(scope="module")
def reference(store_runs, tmp_path_factory):
    """One process, batch 8: the run every 2-process mode (2 x batch 4) must reproduce."""
    runs = fresh_run(store_runs, tmp_path_factory.mktemp("single"))
    from transformers import AutoModelForCausalLM

    out = distill("train", *TRAIN, "train.batch_size=8", "--no-progress", runs=runs)
    assert out.returncode == 0, out.stderr[-3000:]
    student = runs / "tiny" / "student"
    checkpoint = load_file(student / "checkpoints" / "step-000010" / "model.safetensors")
    assert tuple(checkpoint["projections.0.weight"].shape) == (128, 64)
    assert all(r["loss_hidden"] > 0 for r in read_metrics(student / "metrics.jsonl") if "loss" in r)
    assert not any("projection" in k for k in load_file(student / "final" / "model.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(student / "final").config.hidden_size == 64
    return student


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_killed_and_resumed_reproduce_the_single_process_run(
    mode, store_runs, reference, tmp_path
):
    runs = fresh_run(store_runs, tmp_path)
    student = runs / "tiny" / "student"
    args = (
        "train",
        *TRAIN,
        "train.batch_size=4",
        *MODES[mode],
        "train.distributed.num_processes=2",
        "--no-progress",
    )
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(*args, runs=runs), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (student / "checkpoints" / "step-000010" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        kill_tree(proc)
    assert not (student / "final").exists(), "training finished before it could be killed"
    launched = log_path.read_text()
    # the launch really was 2 processes of the asked kind
    assert "launch: " in launched and "--num_processes 2" in launched
    assert f"recipes/accelerate/{mode}.yaml" in launched

    out = distill(*args, "--resume", runs=runs)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "resuming from" in out.stdout + out.stderr

    want, got = read_metrics(reference / "metrics.jsonl"), read_metrics(student / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 31))  # every step logged once, none lost or doubled
    for a, b in zip(want, got, strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["loss_hidden"] == pytest.approx(a["loss_hidden"], rel=1e-4)
        if "val_kl" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
            assert b["val_kl"] == pytest.approx(a["val_kl"], rel=1e-3)
    wa = load_file(reference / "final" / "model.safetensors")
    wb = load_file(student / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()  # the plain student: no projection weights under any mode
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)  # ZeRO-3: gathered from 2 shards
    state = json.loads((student / "checkpoints" / "step-000030" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["val_kl"] is not None


@pytest.mark.slow
def test_lora_under_zero3_exports_the_same_adapter_as_one_process(store_runs, cache_dir, tmp_path):
    lora = "student.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"
    base = ("train", "train.max_steps=6", "train.lr=3e-3", "train.save_every=6", lora, "--no-progress")
    single = fresh_run(store_runs, tmp_path / "single")
    assert distill(*base, "train.batch_size=8", runs=single).returncode == 0
    zero3 = fresh_run(store_runs, tmp_path / "zero3")
    out = distill(
        *base, "train.batch_size=4", *MODES["zero3"], "train.distributed.num_processes=2", runs=zero3
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-8000:]  # a rank's crash: its stacks
    # DeepSpeed on CPU did not JIT-compile its shared-memory all-reduce (training never uses it)
    assert not (cache_dir / "torch_extensions" / "deepspeed_shm_comm").exists()
    for name in ("adapter/adapter_model.safetensors", "final/model.safetensors"):
        a = load_file(single / "tiny" / "student" / name)
        b = load_file(zero3 / "tiny" / "student" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(
        "lora_A" in k for k in load_file(zero3 / "tiny" / "student" / "adapter/adapter_model.safetensors")
    )


def test_zero3_recipe_under_a_launch_that_is_not_distributed_is_refused_before_training(store_runs, tmp_path):
    runs = fresh_run(store_runs, tmp_path)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `accelerate launch --cpu --num_processes 2` silently starts a single plain process
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "2", "-m", "distill"]
    cmd += command("train", *TRAIN, *MODES["zero3"], "train.distributed.num_processes=2", runs=runs)[3:]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("distill: error:")]
    assert errors == [
        "distill: error: train.distributed: the recipe asks for DeepSpeed ZeRO-3 on 2 processes, but this launch "
        "runs 1 process, distributed type NO; run `distill train RECIPE` and it launches itself (`--print-launch` "
        f"shows the command), or pass --config_file {TINY.parent / 'accelerate' / 'zero3.yaml'} --num_processes 2 "
        "to accelerate launch"
    ]
    assert not (runs / "tiny" / "student" / "checkpoints").exists()


def test_print_launch_shows_the_accelerate_command_and_runs_nothing(store_runs, tmp_path):
    runs = fresh_run(store_runs, tmp_path)
    out = distill("train", *MODES["zero3"], "train.distributed.num_processes=8", "--print-launch", runs=runs)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith("launch: ") and " launch --config_file " in line
    assert (
        f"{TINY.parent / 'accelerate' / 'zero3.yaml'} --num_processes 8 --num_machines 1 -m distill train "
        in line
    )
    assert line.endswith("train.distributed.num_processes=8")
    assert not (runs / "tiny" / "student").exists()


def test_the_llama3_recipe_prints_its_zero3_launch_without_the_models_here():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "train",
            str(TINY.parent / "llama3-8b-to-1b.yaml"),
            "--print-launch",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "accelerate/zero3.yaml --num_processes 8 --num_machines 1 -m distill train" in out.stdout
    single = subprocess.run(
        [sys.executable, "-m", "distill", "train", str(TINY), "--print-launch"],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0 and single.stdout.startswith("launch: none (train.distributed.backend=none")
