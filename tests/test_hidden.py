"""Hidden-state distillation (train.hidden, distill/training/hidden.py): the loss, the projections, and
the recipes it refuses. Its distributed runs (DDP, ZeRO-2, ZeRO-3) are test_distributed's."""

from __future__ import annotations

import pytest

from .conftest import MICRO, TEACHER, TINY, run_cli


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]


def setup_for(teacher_model, init=None):
    from distill.training.hidden import HiddenSetup

    return HiddenSetup(teacher=None, teacher_width=teacher_model.config.hidden_size, init_channels=init)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_the_hidden_loss_between_identical_models_through_identity_projections_is_zero(kind):
    import torch

    from distill.config import HiddenConfig
    from distill.training.hidden import HiddenTeacher, hidden_loss, projected

    teacher = tiny_llama(layers=3)
    student = tiny_llama(layers=3)
    student.load_state_dict(teacher.state_dict())
    cfg = HiddenConfig(pairs=[[0, 0], [2, 2]], loss=kind)
    model = projected(student, cfg, setup_for(teacher))
    assert all(isinstance(p, torch.nn.Identity) for p in model.projections)  # same width: no map to learn
    ids = torch.tensor(IDS)
    positions = torch.ones_like(ids, dtype=torch.bool)
    out, states = model(input_ids=ids, hidden=True)
    target = HiddenTeacher(teacher, cfg.pairs).states(ids)
    assert hidden_loss(states, target, positions, kind).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(out.logits, teacher(input_ids=ids).logits)
    # and it is not zero where the layers differ: the pairs are the layers they name
    crossed = HiddenConfig(pairs=[[0, 2]], loss=kind)
    _, states = projected(student, crossed, setup_for(teacher))(input_ids=ids, hidden=True)
    assert (
        hidden_loss(states, HiddenTeacher(teacher, crossed.pairs).states(ids), positions, kind).item() > 1e-3
    )


def test_a_narrower_students_projection_is_learned_and_starts_as_the_channels_it_kept():
    import torch

    from distill.config import HiddenConfig
    from distill.training.hidden import projected, student_of, student_state_dict

    teacher, student = tiny_llama(hidden=48), tiny_llama(hidden=32, seed=1)
    kept = list(range(0, 48, 3)) + list(range(1, 48, 3))[:16]
    model = projected(student, HiddenConfig(pairs=[[1, 1]]), setup_for(teacher, init=kept))
    (linear,) = model.projections
    assert tuple(linear.weight.shape) == (48, 32) and linear.weight.requires_grad
    x = torch.randn(5, 32)
    expected = torch.zeros(5, 48)
    expected[:, kept] = x  # student channel c lands on the teacher channel it was cut from
    torch.testing.assert_close(linear(x), expected)
    assert any(name.startswith("projections.") for name, _ in model.named_parameters())
    plain = student_state_dict(model.state_dict())
    assert plain.keys() == student.state_dict().keys() and student_of(model) is student


def test_hidden_pairs_naming_layers_that_do_not_exist_are_one_line_and_nothing_is_written(tmp_path):
    runs = tmp_path / "runs"
    cases = {
        "[[1, 0]]": "train.hidden.pairs: student layer 1 does not exist (the student has 1 layers, 0-0)",
        "[[0, 2]]": "train.hidden.pairs: teacher layer 2 does not exist (the teacher has 2 layers, 0-1)",
    }
    for pairs, message in cases.items():
        for verb in (["train"], ["run", "--dry-run"]):
            out = run_cli(
                verb[0], TINY, *MICRO, f"runs_dir={runs}", f"train.hidden={{pairs: {pairs}}}", *verb[1:]
            )
            assert out.returncode == 1 and out.stderr.strip().endswith(message), out.stderr
            assert len(out.stderr.splitlines()) == 1
    assert not runs.exists()


def test_hidden_states_from_a_teacher_that_is_only_a_store_are_refused_before_training(cache_dir, tmp_path):
    """A run whose embedded teacher is not trained has nothing to take hidden states from (its store, if
    any, holds top-k logprobs): one line, and no student is written."""
    runs = tmp_path / "runs"
    untrained = [*TEACHER, "pretrain.max_steps=3"]  # a teacher no test pretrains
    out = run_cli("train", TINY, *MICRO, *untrained, f"runs_dir={runs}", "train.hidden={pairs: [[0, 1]]}")
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "train.hidden: the hidden-state loss needs the teacher's hidden states" in out.stderr
    assert "this run's teacher is only its store" in out.stderr
    assert not (runs / "tiny" / "student").exists()


def test_the_sft_baseline_of_a_hidden_state_recipe_is_plain_cross_entropy():
    from distill.config import load_recipe
    from distill.stages.train import BASELINE_OVERRIDES

    recipe = load_recipe(TINY, ["train.hidden={pairs: [[0, 1]]}", *BASELINE_OVERRIDES])
    assert recipe.train.hidden is None and recipe.train.loss == "ce"
    with pytest.raises(Exception, match="hidden: the hidden-state loss trains on the teacher store"):
        load_recipe(TINY, ["train.hidden={pairs: [[0, 1]]}", "train.mode=on_policy"])
