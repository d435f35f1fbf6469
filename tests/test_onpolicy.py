"""On-policy distillation against a real teacher server (`vllm serve` on loopback, started once here)."""

import json
import shutil

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.tracking import read_metrics

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
    from distill.generate import engine_args, teacher_path
    from distill.teacher_server import TeacherServer

    recipe = micro(*ON_POLICY)
    args = engine_args(recipe, teacher_path(recipe))
    with TeacherServer(args, tmp_path_factory.mktemp("server") / "server.log") as srv:
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
    from distill.generate import teacher_path
    from distill.teacher import HfTeacher
    from distill.teacher_server import TeacherClient

    model = teacher_path(micro(*ON_POLICY))
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
    from distill.student import train_student

    recipe = micro(
        *ON_POLICY, "train.max_steps=30", "train.eval_every=30", f"train.on_policy.teacher_url={server.url}"
    )
    result = train_student(recipe, progress=False)
    rows = read_metrics(recipe.run_dir / "student" / "metrics.jsonl")
    assert rows[0] == {"step": 0, "val_acceptance": result.start_acceptance}
    assert all(r["sampled_batches"] == r["step"] for r in rows[1:])  # lambda 1: every micro-batch sampled
    # measured: 0.016 for the untrained student, about 0.25 after 30 steps
    assert result.val_acceptance > result.start_acceptance + 0.1
    assert rows[-1]["acceptance"] > rows[1]["acceptance"]  # also on the training samples
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["outputs"]["val_acceptance"] == result.val_acceptance


def test_the_lambda_coin_is_deterministic_and_fair():
    from distill.onpolicy import draws_on_policy

    draws = [draws_on_policy(0, g, 0.3) for g in range(4000)]
    assert draws == [draws_on_policy(0, g, 0.3) for g in range(4000)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert all(draws_on_policy(0, g, 1.0) for g in range(100)) and not any(
        draws_on_policy(0, g, 0.0) for g in range(100)
    )


@pytest.fixture(scope="module")
def mixed_store(micro):
    """A teacher store for the offline share of a mixed run (the transformers backend: no engine start)."""
    from distill.generate import generate

    recipe = micro(*ON_POLICY, "teacher.backend=hf", "generate.mode=score", "generate.num_sequences=32")
    generate(recipe)
    return recipe.run_dir / "teacher"


@pytest.mark.slow
def test_a_mixed_run_killed_and_resumed_reproduces_the_uninterrupted_one(
    server, micro, mixed_store, tmp_path, monkeypatch
):
    import distill.train as train_mod
    from distill.onpolicy import draws_on_policy
    from distill.student import train_student

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

    full = train_student(recipe("full"), progress=False)
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
        train_student(recipe("cut"), progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train_student(micro(*mixed, runs=tmp_path / "cut"), resume=True, progress=False)
    cut = read_metrics(tmp_path / "cut" / "tiny" / "student" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in rows]
    for a, b in zip(rows[1:], cut[1:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["sampled_batches"] == a["sampled_batches"]
    assert resumed.val_acceptance == pytest.approx(full.val_acceptance, rel=1e-4)


@pytest.mark.slow
def test_a_dead_teacher_stops_training_after_bounded_retries_keeping_the_checkpoint(
    server, micro, monkeypatch
):
    """Runs last in this module: it stops the module's server."""
    import distill.train as train_mod
    from distill.student import train_student
    from distill.train import list_checkpoints

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
        train_student(recipe, progress=False)
    assert [p.name for p in list_checkpoints(recipe.run_dir / "student")] == ["step-000003"]
