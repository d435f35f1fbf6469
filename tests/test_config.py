from pathlib import Path

import pytest

from distill.config import RecipeConfig, apply_overrides, field_docs, load_recipe, recipe_to_yaml
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_opens_with_a_header(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, RecipeConfig)
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path.name} must open with a comment saying what it does and on what hardware"
    assert any(line.startswith("# Run:") for line in header), f"{path.name}: the header names the command"


def test_recipes_directory_is_not_empty():
    assert any(p.name == "tiny.yaml" for p in RECIPES)


def test_overrides_apply_with_yaml_types():
    recipe = load_recipe(
        ROOT / "recipes/tiny.yaml", ["train.max_steps=20", "train.lr=1e-4", "eval.tasks=[a, b]"]
    )
    assert recipe.train.max_steps == 20
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.eval.tasks == ["a", "b"]


def test_override_creates_nested_section():
    raw = apply_overrides({"name": "x"}, ["student.lora.r=8"])
    assert raw["student"]["lora"]["r"] == 8


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["train.max_steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe


def _error(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DistillError) as info:
        load_recipe(path, overrides)
    return str(info.value)


BASE = "name: t\nteacher: {tiny: {}}\nstudent: {tiny: {}}\n"


def test_wrong_type_names_file_and_dotted_path(tmp_path):
    msg = _error(tmp_path, BASE, ["train.lr=fast"])
    assert (
        msg == f"{tmp_path / 'r.yaml'}: train.lr: expected a number, got 'fast' (from override train.lr=fast)"
    )


def test_unknown_key_suggests_the_closest(tmp_path):
    msg = _error(tmp_path, BASE + "train: {lrr: 0.1}\n")
    assert "train.lrr: unknown key (did you mean 'lr'?)" in msg


def test_unknown_key_inside_a_list_item(tmp_path):
    msg = _error(tmp_path, BASE + "eval: {gate: {criteria: [{task: a, metrc: acc}]}}\n")
    assert "eval.gate.criteria.0.metrc: unknown key (did you mean 'metric'?)" in msg


def test_unknown_top_level_section(tmp_path):
    msg = _error(tmp_path, BASE + "trian: {}\n")
    assert "trian: unknown key (did you mean 'train'?)" in msg


def test_out_of_range_value(tmp_path):
    msg = _error(tmp_path, BASE, ["train.max_steps=0"])
    assert "train.max_steps: must be greater than 0, got 0" in msg


def test_choice_field(tmp_path):
    msg = _error(tmp_path, BASE, ["train.loss=kl"])
    assert "train.loss: expected 'ce', 'forward_kl'" in msg and "got 'kl'" in msg


def test_integer_field_rejects_text(tmp_path):
    assert "train.batch_size: expected an integer, got 'eight'" in _error(
        tmp_path, BASE, ["train.batch_size=eight"]
    )


def test_cross_field_rule(tmp_path):
    msg = _error(tmp_path, "name: t\nteacher: {model: /m, tiny: {}}\nstudent: {tiny: {}}\n")
    assert "teacher: set exactly one of teacher.model" in msg
    msg = _error(tmp_path, BASE, ["teacher.tiny.num_heads=3"])
    assert "teacher.tiny: hidden_size 256 is not divisible by num_heads 3" in msg


def test_cross_tokenizer_combinations_that_cannot_work_are_refused(tmp_path):
    cross = ["train.cross_tokenizer.method=uld"]
    msg = _error(tmp_path, BASE, [*cross, "train.mode=on_policy"])
    assert "train: cross_tokenizer: trains offline on the teacher store's text at temperature 1" in msg
    assert "got mode on_policy" in msg
    assert "temperature 2.0" in _error(tmp_path, BASE, [*cross, "train.temperature=2"])
    assert "train.cross_tokenizer.method: expected 'byte' or 'uld'" in _error(
        tmp_path, BASE, ["train.cross_tokenizer.method=gold"]
    )
    cut = "name: t\nteacher: {model: /m}\nstudent: {cut: {num_layers: 1}, tokenizer: corpus}\n"
    assert "student: tokenizer: a student cut from its teacher keeps the teacher's tokenizer" in _error(
        tmp_path, cut
    )
    msg = _error(tmp_path, BASE, ["student.vocab_size=2048"])
    assert "student: vocab_size: only for tokenizer: corpus" in msg


def test_on_policy_combinations_that_cannot_sample_are_refused(tmp_path):
    on_policy = ["train.mode=on_policy"]
    msg = _error(
        tmp_path, BASE, [*on_policy, "train.distributed.backend=deepspeed", "train.distributed.zero_stage=3"]
    )
    assert "train: mode: on_policy samples with the student's whole weights in every process; ZeRO-3" in msg
    msg = _error(tmp_path, BASE, [*on_policy, "train.on_policy.sampler=vllm", "student.lora={r: 8}"])
    assert (
        "train.on_policy.sampler=vllm reloads whole model weights into its engine, not LoRA adapters" in msg
    )
    # each alone is fine
    load_recipe(tmp_path / "r.yaml", [*on_policy, "train.on_policy.sampler=vllm"])
    load_recipe(tmp_path / "r.yaml", [*on_policy, "student.lora={r: 8}"])


def test_missing_required_field(tmp_path):
    assert "name: required field is missing" in _error(tmp_path, "teacher: {tiny: {}}\nstudent: {tiny: {}}\n")


def test_malformed_yaml_reports_the_line(tmp_path):
    msg = _error(tmp_path, "name: t\nteacher:\n  tiny: {hidden_size: 4\nstudent: {}\n")
    assert f"{tmp_path / 'r.yaml'}:4:" in msg and "malformed YAML" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(DistillError, match="recipe not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_override_must_be_key_value(tmp_path):
    assert "expected dotted.key=value" in _error(tmp_path, BASE, ["train.lr"])


def test_override_into_a_scalar_is_refused(tmp_path):
    assert "name is not a section" in _error(tmp_path, BASE, ["name.x=1"])


def test_every_field_is_documented():
    rows = field_docs()
    undocumented = [path for path, _, doc in rows if not doc]
    assert not undocumented, undocumented
    paths = {path for path, _, _ in rows}
    assert {"train.lr", "teacher.tiny.hidden_size", "eval.gate.quant_min_retention", "serve.port"} <= paths


def test_pretrain_section_is_cross_entropy_only(tmp_path):
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["pretrain.max_steps=5"])
    assert recipe.pretrain.loss == "ce"
    assert "pretrain.loss: expected 'ce', got 'jsd'" in _error(tmp_path, BASE, ["pretrain.loss=jsd"])


def test_no_silent_coercion(tmp_path):
    assert "train.log_every: expected an integer, got True" in _error(
        tmp_path, BASE, ["train.log_every=true"]
    )
    assert "train.lr: expected a number, got '0.001'" in _error(tmp_path, BASE + "train: {lr: '0.001'}\n")
    assert "train.max_steps: expected an integer, got 2.5" in _error(tmp_path, BASE, ["train.max_steps=2.5"])


def test_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "train: {lr: 1e-4, max_steps: 10}\n")
    assert load_recipe(path).train.lr == pytest.approx(1e-4)
    assert load_recipe(path, ["train.lr=3E-5"]).train.lr == pytest.approx(3e-5)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    msg = _error(tmp_path, BASE + "train:\n  lr: 0.1\n  lr: 0.2\n")
    assert ":6:" in msg and "duplicate key 'lr' (first at line 5)" in msg


def test_override_fills_a_null_section():
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["student.lora=null", "student.lora.r=8"])
    assert recipe.student.lora.r == 8


def test_errors_from_the_file_are_not_blamed_on_overrides(tmp_path):
    msg = _error(tmp_path, BASE + "train: {lr: fast}\n", ["train.max_steps=3"])
    assert msg.endswith("train.lr: expected a number, got 'fast'")


def test_unclosed_bracket_names_where_it_opened(tmp_path):
    msg = _error(tmp_path, "name: t\nteacher:\n  tiny: [1, 2\n")
    assert "malformed YAML" in msg and "at line 3" in msg


def test_sequence_length_must_fit_both_models(tmp_path):
    msg = _error(tmp_path, BASE, ["data.seq_len=4096"])
    assert "data.seq_len 4096 exceeds teacher.tiny.max_position_embeddings 512" in msg
    msg = _error(tmp_path, BASE, ["teacher.tiny.max_position_embeddings=8192", "data.seq_len=4096"])
    assert "exceeds student.tiny.max_position_embeddings 512" in msg


def test_several_processes_need_a_distributed_backend(tmp_path):
    msg = _error(tmp_path, BASE, ["train.distributed.num_processes=2"])
    assert (
        "train.distributed: num_processes/num_machines: more than one process needs backend ddp or deepspeed"
        in msg
    )
    recipe = load_recipe(
        ROOT / "recipes/tiny.yaml",
        ["train.distributed.backend=deepspeed", "train.distributed.num_processes=8"],
    )
    assert recipe.train.distributed.zero_stage == 2


def test_shipped_accelerate_configs_match_the_backends_they_serve():
    import yaml

    for name, kind, stage in (
        ("ddp", "MULTI_GPU", None),
        ("zero2", "DEEPSPEED", 2),
        ("zero3", "DEEPSPEED", 3),
    ):
        cfg = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] == kind
        assert cfg.get("deepspeed_config", {}).get("zero_stage") == stage


def test_the_sampled_tail_only_where_it_is_unbiased(tmp_path):
    for overrides, why in (
        (["train.tail=sample", "train.loss=jsd"], "got loss jsd, temperature 1.0"),
        (["train.tail=sample", "train.temperature=2.0"], "got loss forward_kl, temperature 2.0"),
    ):
        msg = _error(tmp_path, BASE, overrides)
        assert "train: tail: sample estimates forward_kl at temperature 1" in msg and why in msg, msg
    assert "tail: sample needs the teacher's own samples" in _error(
        tmp_path, BASE, ["train.tail=sample", "train.mode=on_policy"]
    )
    assert load_recipe(tmp_path / "r.yaml", ["train.loss=jsd"]).train.tail == "auto"  # auto resolves later


def test_a_run_name_is_one_directory_inside_runs_dir(tmp_path):
    for bad in ("../../x", "a/b", "..", "''", ".hidden"):
        msg = _error(tmp_path, BASE, [f"name={bad}"])
        assert "name: " in msg and "is not a run name: the run directory is <runs_dir>/<name>" in msg, bad
    assert load_recipe(tmp_path / "r.yaml", ["name=llama3-8b_to_1b.v2"]).run_dir == Path(
        "runs/llama3-8b_to_1b.v2"
    )


def test_an_error_names_the_override_that_took_effect(tmp_path):
    msg = _error(tmp_path, BASE, ["generate.top_k=16", "generate.top_k=5000"])
    assert msg.endswith(
        "generate.top_k: must be less than or equal to 1024, got 5000 (from override generate.top_k=5000)"
    )
