"""On-policy distillation against a real teacher server (`vllm serve` on loopback, started once here)."""

import json
import shutil

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.tracking import read_metrics

from .conftest import greedy_gaps, started_for_port, teacher_of, train_run
from .test_student import STRONGER_TEACHER

ON_POLICY = [
    *STRONGER_TEACHER,
    "train.mode=on_policy",
    "generate.top_k=64",
    "train.on_policy.prompt_tokens=24",
    "train.on_policy.max_new_tokens=24",
    "train.on_policy.eval_prompts=16",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def server(micro, tmp_path_factory):
    """The teacher (the same one the recipe would start) behind `vllm serve`, for the whole module."""
    from distill.vllm.engine import teacher_engine_args
    from distill.vllm.server import VllmServer

    recipe = micro(*ON_POLICY)
    args = teacher_engine_args(recipe, teacher_of(recipe))
    with VllmServer(args, tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def micro(cache_dir, tmp_path_factory):
    """Like conftest's `micro`, module-scoped: recipes for tiny.yaml shrunk to seconds."""
    from distill.config import load_recipe

    from .conftest import MICRO, TINY

    def make(*overrides, runs=None):
        runs = runs or tmp_path_factory.mktemp("runs")
        return load_recipe(TINY, [*MICRO, f"runs_dir={runs}", f"cache_dir={cache_dir}", *overrides])

    return make


@pytest.mark.slow
def test_the_teacher_server_scores_like_a_transformers_forward(server, micro):
    from distill.teacher import HfTeacher
    from distill.vllm.client import TeacherClient

    model = teacher_of(micro(*ON_POLICY))
    rng = np.random.default_rng(0)
    items = [(f"s{i}", rng.integers(0, 4096, 40).tolist()) for i in range(6)]
    starts = [0, 5, 10, 20, 30, 38]
    got = TeacherClient(server.url, 16, 256).score(items, start=starts)
    want = HfTeacher(str(model), 16, "cpu", torch.float32, batch_size=6).score(items)
    for g, w, s in zip(got, want, starts, strict=True):
        assert g.start == s and g.topk_ids.shape == (39 - s, 16)
        # ranks agree where logprobs are not tied within fp32 noise; values to 1e-4 nats
        assert np.mean(g.topk_ids == w.topk_ids[s:]) > 0.99
        assert np.abs(g.topk_logprobs - w.topk_logprobs[s:]).max() < 1e-4
        assert np.abs(g.token_logprobs - w.token_logprobs[s:]).max() < 1e-4


@pytest.mark.slow
def test_on_policy_training_raises_the_expected_acceptance(server, micro):

    recipe = micro(
        *ON_POLICY, "train.max_steps=30", "train.eval_every=30", f"train.on_policy.teacher_url={server.url}"
    )
    result = train_run(recipe, progress=False)
    rows = read_metrics(recipe.run_dir / "student" / "metrics.jsonl")
    assert rows[0] == {"step": 0, "val_acceptance": result.start_acceptance}
    assert all(r["sampled_batches"] == r["step"] for r in rows[1:])  # lambda 1: every micro-batch sampled
    # measured: 0.016 for the untrained student, about 0.25 after 30 steps
    assert result.val_acceptance > result.start_acceptance + 0.1
    assert rows[-1]["acceptance"] > rows[1]["acceptance"]  # also on the training samples
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["outputs"]["val_acceptance"] == result.val_acceptance


@pytest.mark.slow
def test_on_policy_training_with_the_vllm_sampler(server, micro, monkeypatch):
    """Training samples from the student in a vLLM engine whose weights are reloaded in place; after the
    run the same engine (kept open here) samples greedily what transformers' forward of the trained
    student picks, and again after the weights are perturbed and handed over: it really samples with the
    weights the trainer hands it."""
    from transformers import AutoModelForCausalLM

    from distill.training.onpolicy import VllmSampler

    kept = []
    monkeypatch.setattr(VllmSampler, "close", lambda self: kept.append(self))  # closed below instead
    recipe = micro(
        *ON_POLICY,
        "train.max_steps=30",
        "train.eval_every=30",
        "train.on_policy.sampler=vllm",
        "train.on_policy.refresh_every=4",
        f"train.on_policy.teacher_url={server.url}",
    )
    try:
        result = train_run(recipe, progress=False)
        (sampler,) = kept
        rows = read_metrics(recipe.run_dir / "student" / "metrics.jsonl")[1:]
        # the engine's weights are at most refresh_every - 1 steps behind the step that sampled
        assert [r["sampler_step"] for r in rows] == [4 * ((r["step"] - 1) // 4) for r in rows]
        assert result.val_acceptance > result.start_acceptance + 0.1

        model = AutoModelForCausalLM.from_pretrained(result.final_dir, torch_dtype=torch.float32)
        sampler.cfg = sampler.cfg.model_copy(update={"temperature": 0.0, "max_new_tokens": 16})
        prompts = np.random.default_rng(0).integers(5, 4000, (8, 12)).tolist()
        sampler.refresh(model, step=30)
        before = sampler.sample(prompts, seed=0)
        assert sampler.refreshed_at == 30 and all(0 < len(c) <= 16 for c in before)  # EOS may end one
        # every token is transformers' argmax, or within fp32 noise of it (a near-tie)
        assert max(greedy_gaps(model, prompts, before)) < 1e-4
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sampler.refresh(model, step=31)
        after = sampler.sample(prompts, seed=0)
        assert sampler.refreshed_at == 31 and after != before
        assert max(greedy_gaps(model, prompts, after)) < 1e-4
    finally:
        monkeypatch.undo()
        for sampler in kept:  # whatever the run left open, also when it failed
            sampler.close()


def test_the_lambda_coin_is_deterministic_and_fair():
    from distill.training.onpolicy import draws_on_policy

    draws = [draws_on_policy(0, g, 0.3) for g in range(4000)]
    assert draws == [draws_on_policy(0, g, 0.3) for g in range(4000)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert all(draws_on_policy(0, g, 1.0) for g in range(100)) and not any(
        draws_on_policy(0, g, 0.0) for g in range(100)
    )


@pytest.fixture(scope="module")
def mixed_store(micro):
    """A teacher store for the offline share of a mixed run (the transformers backend: no engine start)."""
    from distill.pipeline import open_run
    from distill.stages.generate import generate

    recipe = micro(*ON_POLICY, "teacher.backend=hf", "generate.mode=score", "generate.num_sequences=32")
    generate(open_run(recipe))
    return recipe.run_dir / "teacher"


@pytest.mark.slow
def test_a_mixed_run_killed_and_resumed_reproduces_the_uninterrupted_one(
    server, micro, mixed_store, tmp_path, monkeypatch
):
    import distill.training.loop as train_mod
    from distill.training.onpolicy import draws_on_policy

    mixed = [*ON_POLICY, "train.on_policy.lmbda=0.5", "train.grad_accum=2", "train.max_steps=10"]
    mixed += [
        "train.save_every=3",
        "train.eval_every=10",
        "train.keep_last=5",
        f"train.on_policy.teacher_url={server.url}",
    ]

    def recipe(name):
        r = micro(*mixed, runs=tmp_path / name)
        shutil.copytree(mixed_store, r.run_dir / "teacher")
        return r

    full = train_run(recipe("full"), progress=False)
    rows = read_metrics(tmp_path / "full" / "tiny" / "student" / "metrics.jsonl")
    coins = [draws_on_policy(0, g, 0.5) for g in range(20)]
    assert rows[-1]["sampled_batches"] == sum(coins) and rows[-1]["store_batches"] == 20 - sum(coins)
    assert 0 < sum(coins) < 20  # both kinds drawn

    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out_dir, state, keep_last):
        path = real_save(accelerator, out_dir, state, keep_last)
        if state["step"] == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_run(recipe("cut"), progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train_run(micro(*mixed, runs=tmp_path / "cut"), resume=True, progress=False)
    cut = read_metrics(tmp_path / "cut" / "tiny" / "student" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in rows]
    for a, b in zip(rows[1:], cut[1:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["sampled_batches"] == a["sampled_batches"]
    assert resumed.val_acceptance == pytest.approx(full.val_acceptance, rel=1e-4)


def test_processes_sample_disjoint_prompts_that_together_are_the_single_process_batch():
    from types import SimpleNamespace

    from distill.config import OnPolicyConfig
    from distill.training.onpolicy import OnPolicySource, Prompts

    source = OnPolicySource(
        Prompts([[i] for i in range(50)]), SimpleNamespace(k=4), OnPolicyConfig(), 0, 0, None
    )
    for g in range(30):  # 30 global micro-batches of 8 rows: 240 prompts, over several epochs of 50
        ranks = [source.prompt_indices(g * 8 + rank * 4, 4) for rank in range(2)]
        assert ranks[0] + ranks[1] == source.prompt_indices(g * 8, 8)
    epoch = [i for pos in range(50) for i in source.prompt_indices(pos, 1)]
    assert sorted(epoch) == list(range(50))  # each epoch visits every prompt once


def launch(*args, runs):
    """`distill train` with 2 processes, as a user runs it (the CLI launches itself with accelerate)."""
    import subprocess
    import sys

    from .conftest import MICRO, TINY

    cmd = [sys.executable, "-m", "distill", "train", str(TINY), *MICRO, *ON_POLICY, f"runs_dir={runs}"]
    cmd += [*args, "train.distributed.num_processes=2", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_distributed_on_policy_ranks_share_the_server_the_launcher_starts(micro, tmp_path):
    recipe = micro(*ON_POLICY, runs=tmp_path)
    out = launch(
        "train.max_steps=20",
        "train.eval_every=20",
        "train.batch_size=4",
        "train.distributed.backend=ddp",
        runs=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "--num_processes 2" in text and "recipes/accelerate/ddp.yaml" in text
    servers = [line for line in text.splitlines() if line.startswith("teacher server: ")]
    assert len(servers) == 1  # one server for both ranks
    port = servers[0].split()[2].rsplit(":", 1)[1]
    rows = read_metrics(recipe.run_dir / "student" / "metrics.jsonl")
    assert rows[-1]["sampled_batches"] == 40  # 20 steps x 2 processes, every micro-batch sampled
    assert rows[-1]["val_acceptance"] > rows[0]["val_acceptance"] + 0.05
    # the server is gone with the run
    left = started_for_port(port)
    assert not left, f"left running: {[p.cmdline() for p in left]}"


@pytest.mark.slow
def test_on_policy_under_zero2_with_two_processes(server, micro, tmp_path):
    recipe = micro(*ON_POLICY, runs=tmp_path)
    out = launch(
        "train.max_steps=20",
        "train.eval_every=20",
        "train.batch_size=4",
        "train.distributed.backend=deepspeed",
        "train.distributed.zero_stage=2",
        f"train.on_policy.teacher_url={server.url}",
        runs=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "recipes/accelerate/zero2.yaml" in out.stdout + out.stderr
    rows = read_metrics(recipe.run_dir / "student" / "metrics.jsonl")
    assert rows[-1]["sampled_batches"] == 40
    assert rows[-1]["val_acceptance"] > rows[0]["val_acceptance"] + 0.05
    assert (recipe.run_dir / "student" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_dead_teacher_stops_training_after_bounded_retries_keeping_the_checkpoint(
    server, micro, monkeypatch
):
    """Runs last in this module: it stops the module's server."""
    import distill.training.loop as train_mod
    from distill.training.checkpoint import list_checkpoints

    recipe = micro(
        *ON_POLICY,
        "train.max_steps=8",
        "train.save_every=3",
        "train.eval_every=100",
        "train.on_policy.retries=2",
        f"train.on_policy.teacher_url={server.url}",
    )
    real_save = train_mod.save_checkpoint

    def save_then_kill_teacher(accelerator, out_dir, state, keep_last):
        path = real_save(accelerator, out_dir, state, keep_last)
        if state["step"] == 3:
            server.stop()  # the teacher's process dies mid-run
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_kill_teacher)
    with pytest.raises(
        DistillError,
        match=r"the teacher server at http://127.0.0.1:\d+ did not answer after 2 tries .*Last good checkpoint: .*step-000003",
    ):
        train_run(recipe, progress=False)
    assert [p.name for p in list_checkpoints(recipe.run_dir / "student")] == ["step-000003"]
