"""The `distill` command as a user runs it: a real process, its output and its exit status."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill import __version__

from .conftest import run_cli, train_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def distill(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_help_lists_every_stage():
    out = distill("--help")
    assert out.returncode == 0
    for command in (
        "prepare",
        "pretrain",
        "generate",
        "train",
        "eval",
        "quantize",
        "serve",
        "bench",
        "run",
        "promote",
        "registry",
        "config",
    ):
        assert command in out.stdout


def test_version():
    out = distill("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"distill {__version__}"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["promote"], "no student to promote at {run}/student/final (run `distill train` first)"),
        (["bench", "serve"], "no student to bench at {run}/student/final (run `distill train` first)"),
        (["serve", "--student"], "no model to serve at {run}/student/final (run `distill train` first)"),
    ],
)
def test_later_stages_before_training_say_what_is_missing(command, message, tmp_path):
    out = distill(*command, TINY, f"runs_dir={tmp_path}")
    assert out.returncode == 1
    assert out.stderr == f"distill: error: {message.format(run=tmp_path / 'tiny')}\n"


def test_a_moved_run_directory_is_the_run_where_it_is_now(tmp_path):
    from distill.config import load_recipe, recipe_to_yaml

    first = tmp_path / "first" / "tiny"
    first.mkdir(parents=True)
    (first / "recipe.yaml").write_text(recipe_to_yaml(load_recipe(TINY, [f"runs_dir={first.parent}"])))
    moved = tmp_path / "elsewhere" / "copy"
    first.parent.rename(moved.parent)
    (moved.parent / "tiny").rename(moved)
    out = run_cli("serve", moved, "--student", "--dry-run")  # the command it would run, from the copy
    assert out.returncode == 0, out.stderr
    assert f" serve {moved}/student/final " in out.stdout and str(first) not in out.stdout


def test_config_show_prints_the_resolved_recipe_with_overrides():
    out = distill("config", "show", TINY, "train.max_steps=20", "serve.port=9001")
    assert out.returncode == 0
    assert "max_steps: 20" in out.stdout and "port: 9001" in out.stdout
    assert "min_lr_ratio: 0.1" in out.stdout  # defaults are shown too


def test_config_fields_documents_each_field():
    out = distill("config", "fields")
    assert out.returncode == 0
    assert any(
        line.startswith("train.lr ") and "Peak learning rate" in line for line in out.stdout.splitlines()
    )


def test_bad_recipe_value_is_one_line_and_nonzero():
    out = distill("config", "show", TINY, "train.lr=fast")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"distill: error: {TINY}: train.lr: expected a number, got 'fast' (from override train.lr=fast)"
    )


def test_debug_shows_the_traceback():
    out = distill("--debug", "config", "show", TINY, "train.lr=fast")
    assert out.returncode != 0
    assert "Traceback (most recent call last)" in out.stderr and "DistillError" in out.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (("config", "show", "missing.yaml"), "distill: error: recipe not found: missing.yaml"),
        (("config", "show", TINY, "trian.lr=1"), "trian: unknown key (did you mean 'train'?)"),
    ],
)
def test_user_errors(args, expected):
    out = distill(*args)
    assert out.returncode == 1 and expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_malformed_yaml_shows_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nteacher:\n  tiny: [1, 2\n")
    out = distill("config", "show", str(bad))
    assert out.returncode == 1 and f"{bad}:4:" in out.stderr and "malformed YAML" in out.stderr


def test_missing_student_model_names_the_path(tmp_path, cache_dir):
    out = run_cli(
        "train",
        TINY,
        "train.loss=ce",
        "student.tiny=null",
        f"student.model={tmp_path}/no-such-model",
        f"runs_dir={tmp_path}",
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"distill: error: student.model: model path does not exist: {tmp_path}/no-such-model"
    )


def test_run_directory_that_cannot_be_written(tmp_path, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = distill("prepare", TINY, f"runs_dir={blocker}")
    assert out.returncode == 1
    assert out.stderr.startswith(f"distill: error: run directory {blocker}/tiny is not writable")
    assert len(out.stderr.strip().splitlines()) == 1


def test_train_sft_student_from_a_model_directory(cache_dir, tmp_path):
    """`distill train` with train.loss=ce (the SFT baseline), the student loaded from an HF directory."""
    from .conftest import MICRO

    first = run_cli(
        "train",
        TINY,
        *MICRO,
        "train.loss=ce",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.save_every=3",
        "train.eval_every=3",
        f"runs_dir={tmp_path}/a",
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    student = tmp_path / "a" / "tiny" / "student" / "final"
    assert (student / "config.json").exists() and (student / "tokenizer.json").exists()
    second = run_cli(
        "train",
        TINY,
        *MICRO,
        "train.loss=ce",
        "train.max_steps=3",
        "train.batch_size=2",
        "student.tiny=null",
        f"student.model={student}",
        f"runs_dir={tmp_path}/b",
        "--no-progress",
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "validation loss" in second.stdout
    assert (tmp_path / "b" / "tiny" / "student" / "final" / "model.safetensors").exists()


def test_distillation_needs_a_teacher_store(cache_dir, tmp_path):
    from .conftest import MICRO

    out = run_cli("train", TINY, *MICRO, "train.loss=forward_kl", f"runs_dir={tmp_path}")
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"distill: error: no teacher store at {tmp_path}/tiny/teacher (manifest.json missing)"
    )


def test_store_and_student_vocabularies_must_match(micro, prepared, tmp_path):
    import numpy as np
    import pytest

    from distill.errors import DistillError
    from distill.models import build_tiny_llama
    from distill.tokenizer import load_tokenizer

    from .test_store import make_store, random_capture

    recipe = micro("train.loss=forward_kl", "train.max_steps=2", "train.batch_size=1")
    rng = np.random.default_rng(0)
    identity = {"mode": "score", "k": 4, "vocab_size": 4096, "encoding": {"id_bits": 12}}
    make_store(recipe.run_dir / "teacher", [random_capture(rng, "a", vocab=4096, k=4)], identity=identity)
    assert train_run(recipe, progress=False).steps == 2  # the store fits: it trains
    tok = load_tokenizer(prepared.tokenizer_dir)
    other = build_tiny_llama(recipe.student.tiny, tok)
    other.resize_token_embeddings(1000)
    other.save_pretrained(tmp_path / "student-1000")
    recipe = micro("train.loss=forward_kl", "student.tiny=null", f"student.model={tmp_path / 'student-1000'}")
    with pytest.raises(DistillError, match="has vocabulary 4096, but student.model has 1000"):
        train_run(recipe)


def test_serve_dry_run_prints_the_llama3_draft_command_without_the_models():
    out = distill("serve", ROOT / "recipes" / "llama3-8b-to-1b.yaml", "--draft", "--dry-run")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert " serve /models/Meta-Llama-3-8B-Instruct --host " in line and '"method": "draft_model"' in line
    assert "--enforce-eager" not in line
