"""Layer importance for pruning (distill/pruning.py), on tiny Llamas built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.errors import DistillError


def tiny_llama(layers: int = 6, identity: tuple[int, ...] = (), seed: int = 0, vocab_size: int = 64):
    """A random Llama (GQA, tied embeddings) whose `identity` layers add nothing to the residual stream
    (their attention output and MLP down projections are zero)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for i in identity:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


BLOCKS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10], [60, 3, 33, 7, 47, 11, 50, 12, 13]]


def test_hidden_states_hold_every_layer_boundary_over_the_real_tokens_only():
    from distill.pruning import hidden_states

    states = hidden_states(tiny_llama(layers=4), BLOCKS, batch_size=2)
    assert tuple(states.shape) == (5, sum(map(len, BLOCKS)), 32)


def test_a_layer_that_adds_nothing_has_no_influence_and_its_block_is_the_one_dropped():
    from distill.pruning import keep_layers, layer_importance

    importance = layer_importance(tiny_llama(identity=(2, 3)), BLOCKS, drop=[1, 2, 3])
    influence = importance["block_influence"]
    assert importance["layers"] == 6 and importance["tokens"] == sum(map(len, BLOCKS))
    assert influence[2] < 1e-6 and influence[3] < 1e-6
    assert min(influence[i] for i in (0, 1, 4, 5)) > 1e-3
    assert importance["window_distance"][2][2] < 1e-3  # skipping layers 2-3 skips nothing
    assert keep_layers(importance, 4) == [0, 1, 4, 5]
    assert keep_layers(importance, 5) in ([0, 1, 3, 4, 5], [0, 1, 2, 4, 5])
    assert keep_layers(importance, 6) == list(range(6))


def test_the_first_and_the_last_layer_are_kept_even_when_they_matter_least():
    from distill.pruning import keep_layers, layer_importance

    importance = layer_importance(tiny_llama(identity=(0, 5)), BLOCKS, drop=[1])
    assert importance["block_influence"][0] < 1e-6 and importance["block_influence"][5] < 1e-6
    kept = keep_layers(importance, 5)
    assert kept[0] == 0 and kept[-1] == 5 and len(kept) == 5


def test_importance_is_deterministic_for_a_calibration_set():
    from distill.pruning import layer_importance

    model = tiny_llama(seed=1)
    first = layer_importance(model, BLOCKS, drop=[2])
    assert layer_importance(model, BLOCKS, drop=[2]) == first
    assert layer_importance(model, BLOCKS[:2], drop=[2]) != first  # and it depends on the blocks


def test_impossible_cuts_are_one_line():
    from distill.pruning import keep_layers, layer_importance

    model = tiny_llama(layers=4)
    with pytest.raises(DistillError, match="cannot drop 4 of 4 layers"):
        layer_importance(model, BLOCKS, drop=[4])
    importance = layer_importance(model, BLOCKS, drop=[1])
    with pytest.raises(DistillError, match=r"cannot keep 1 of 4 layers by importance \(2 to 4\)"):
        keep_layers(importance, 1)
    with pytest.raises(DistillError, match="no window distances for dropping 2 layers"):
        keep_layers(importance, 2)


# --------------------------------------------------------------------------- student.cut.select: importance


@pytest.fixture(scope="module")
def hollow_teacher(prepared, tmp_path_factory):
    """A 6-layer Llama with the corpus's tokenizer whose layers 2 and 3 add nothing, saved as a model
    directory."""
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    model = tiny_llama(identity=(2, 3), vocab_size=len(tokenizer))
    out = tmp_path_factory.mktemp("hollow-teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cut_recipe(teacher, cache_dir, tmp_path, *overrides):
    from distill.config import load_recipe
    from tests.conftest import MICRO, TINY

    return load_recipe(TINY, [*MICRO, f"runs_dir={tmp_path / 'runs'}", f"cache_dir={cache_dir}", "teacher.tiny=null",
                              f"teacher.model={teacher}", "student.tiny=null", *overrides])  # fmt: skip


@pytest.mark.parametrize("select", ["importance", "kl"])
def test_a_cut_chosen_by_importance_drops_the_layers_that_do_nothing(
    select, hollow_teacher, cache_dir, tmp_path
):
    """The importance-chosen student is the teacher without its two hollow layers: it computes exactly what
    the teacher computes; its distill-cut.json says how the layers were chosen; a dry run, which writes
    nothing, plans with it once it is made."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from distill.models import local_models

    recipe = cut_recipe(hollow_teacher, cache_dir, tmp_path, "student.cut.num_layers=4",
                        f"student.cut.select={select}", "student.cut.calibration=8")  # fmt: skip
    before = set((cache_dir / "importance").glob("*")) if (cache_dir / "importance").exists() else set()
    planned = local_models(recipe, convert=False)
    assert planned.student.cut.select == select and planned.student.model is None
    assert (
        set((cache_dir / "importance").glob("*")) if (cache_dir / "importance").exists() else set()
    ) == before
    made = Path(local_models(recipe, log=lambda line: None).student.model)
    record = json.loads((made / "distill-cut.json").read_text())
    assert record["layers"] == [0, 1, 4, 5] and record["chosen"]["select"] == select
    assert record["chosen"]["calibration"]["documents"] == 8
    assert record["chosen"]["importance"]["block_influence"][2] < 1e-6
    if select == "kl":  # every block measured; dropping the hollow one moves nothing
        kl = record["chosen"]["importance"]["window_kl"]["2"]
        assert min((v, s) for s, v in enumerate(kl) if v is not None)[1] == 2 and abs(kl[2]) < 1e-6
    assert local_models(recipe, convert=False).student.model == str(made)

    ids = torch.tensor([[1, 7, 42, 99, 5, 63, 12, 8]])
    teacher = AutoModelForCausalLM.from_pretrained(str(hollow_teacher), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(made), dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def test_impossible_importance_cuts_are_one_line_and_nothing_is_written(hollow_teacher, cache_dir, tmp_path):
    from distill.models import local_models

    with pytest.raises(DistillError, match=r"student\.cut.*a layers list is chosen already"):
        cut_recipe(
            hollow_teacher, cache_dir, tmp_path, "student.cut.layers=[0,5]", "student.cut.select=importance"
        )
    for count, message in ((7, "7 layers asked for, the teacher has 6"), (1, "so 2 or more")):
        recipe = cut_recipe(hollow_teacher, cache_dir, tmp_path, f"student.cut.num_layers={count}",
                            "student.cut.select=importance")  # fmt: skip
        for convert in (False, True):
            with pytest.raises(DistillError, match=rf"student\.cut\.num_layers: .*{message}"):
                local_models(recipe, convert=convert)
    assert not (tmp_path / "runs").exists()


def test_window_kl_measures_the_model_without_each_block_and_puts_it_back():
    """Dropping the two layers that add nothing moves nothing (KL 0); every other block moves the
    distribution; the model is whole again afterwards."""
    import torch

    from distill.pruning import window_kl

    model = tiny_llama(identity=(2, 3))
    x = torch.tensor([BLOCKS[0]])
    with torch.no_grad():
        before = model(input_ids=x).logits
    kl = window_kl(model, BLOCKS, drop=2)
    assert len(kl) == 5 and kl[0] is None and kl[-1] is None  # the first and the last layer stay
    assert abs(kl[2]) < 1e-6
    assert all(v > 1e-4 for s, v in enumerate(kl) if v is not None and s != 2)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before)


# --------------------------------------------------------------------------- width


def gqa_llama(vocab_size: int = 64, seed: int = 0):
    """A random 3-layer Llama: 4 query heads in 2 KV groups (head dim 16), width 64, 48 MLP channels, tied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gqa_teacher(prepared, tmp_path_factory):
    """gqa_llama with the corpus's tokenizer, in which nothing flows through KV group 1 (its value rows are
    zero, so heads 2 and 3 output nothing) nor through MLP channels 0-15 (zero up rows), saved as a model
    directory."""
    import torch

    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    model = gqa_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[16:32].zero_()
            layer.mlp.up_proj.weight[:16].zero_()
    out = tmp_path_factory.mktemp("gqa-teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_width_pruned_student_equals_a_hand_built_one(gqa_teacher, cache_dir):
    """Kept residual channels, MLP channels, KV groups and query heads gathered from every tensor they
    appear in, the layers renumbered, the head dim kept and the embeddings still tied: the pruned
    directory computes what a model assembled by hand from the teacher's slices computes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from distill.config import CutConfig
    from distill.models import cut_student

    teacher = AutoModelForCausalLM.from_pretrained(str(gqa_teacher), dtype=torch.float32).eval()
    hidden = [c for c in range(64) if c % 5]  # 51 of 64 ... cut to a multiple of the head dim below
    hidden = hidden[:48]
    mlp = {0: list(range(8, 40)), 2: list(range(16, 48))}
    kv = {0: [1], 2: [0]}
    heads = {0: [2, 3], 2: [0, 1]}
    kept = {
        "hidden": hidden,
        "mlp": [mlp[0], mlp[2]],
        "kv_heads": [kv[0], kv[2]],
        "heads": [heads[0], heads[2]],
    }
    cut = CutConfig(layers=[0, 2], hidden_size=48, intermediate_size=32, num_heads=2, num_kv_heads=1)
    chosen = {
        "select": "even",
        "layers": [0, 2],
        "calibration": {"hand": True},
        "width": cut.width,
        "kept": kept,
    }
    out = cut_student(gqa_teacher, cut, "float32", cache_dir, log=lambda _: None, chosen=chosen)
    student = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()

    config = LlamaConfig(**{**teacher.config.to_dict(), "hidden_size": 48, "intermediate_size": 32,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})  # fmt: skip
    reference = LlamaForCausalLM(config).eval()

    def rows_of(head_list):
        return [h * 16 + j for h in head_list for j in range(16)]

    t = teacher.model
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(t.embed_tokens.weight[:, hidden])
        reference.model.norm.weight.copy_(t.norm.weight[hidden])
        for new, old in enumerate((0, 2)):
            a, b = reference.model.layers[new], t.layers[old]
            a.input_layernorm.weight.copy_(b.input_layernorm.weight[hidden])
            a.post_attention_layernorm.weight.copy_(b.post_attention_layernorm.weight[hidden])
            a.self_attn.q_proj.weight.copy_(b.self_attn.q_proj.weight[rows_of(heads[old])][:, hidden])
            a.self_attn.k_proj.weight.copy_(b.self_attn.k_proj.weight[rows_of(kv[old])][:, hidden])
            a.self_attn.v_proj.weight.copy_(b.self_attn.v_proj.weight[rows_of(kv[old])][:, hidden])
            a.self_attn.o_proj.weight.copy_(b.self_attn.o_proj.weight[hidden][:, rows_of(heads[old])])
            a.mlp.gate_proj.weight.copy_(b.mlp.gate_proj.weight[mlp[old]][:, hidden])
            a.mlp.up_proj.weight.copy_(b.mlp.up_proj.weight[mlp[old]][:, hidden])
            a.mlp.down_proj.weight.copy_(b.mlp.down_proj.weight[hidden][:, mlp[old]])
    assert student.config.head_dim == 16 and student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 7, 42, 99, 5, 63, 12, 8]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_width_importance_finds_what_carries_nothing_and_pruning_it_changes_nothing(
    gqa_teacher, cache_dir, tmp_path
):
    """Measured on calibration text, KV group 1 (with its query heads 2 and 3) and MLP channels 0-15 carry
    nothing, so the student without them computes exactly what the teacher computes; distill-cut.json
    records what was kept and the scores."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from distill.models import local_models

    recipe = cut_recipe(gqa_teacher, cache_dir, tmp_path, "student.cut.num_kv_heads=1",
                        "student.cut.intermediate_size=32", "student.cut.calibration=8")  # fmt: skip
    assert local_models(recipe, convert=False).student.model is None  # a dry run measures nothing
    made = Path(local_models(recipe, log=lambda line: None).student.model)
    record = json.loads((made / "distill-cut.json").read_text())
    kept = record["chosen"]["kept"]
    assert record["layers"] == [0, 1, 2] and kept["hidden"] is None
    assert kept["kv_heads"] == [[0]] * 3 and kept["heads"] == [[0, 1]] * 3
    assert kept["mlp"] == [list(range(16, 48))] * 3
    scores = record["chosen"]["importance"]["width"]
    assert all(max(row[2:]) == 0 and min(row[:2]) > 0 for row in scores["heads"])
    assert all(max(row[:16]) == 0 and min(row[16:]) > 0 for row in scores["mlp"])
    assert local_models(recipe, convert=False).student.model == str(made)  # planned with, once made

    ids = torch.tensor([[1, 7, 42, 99, 5, 63, 12, 8]])
    teacher = AutoModelForCausalLM.from_pretrained(str(gqa_teacher), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(made), dtype=torch.float32).eval()
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 1)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def test_residual_channels_that_every_norm_silences_are_the_ones_dropped():
    import torch

    from distill.config import CutConfig
    from distill.pruning import width_importance, width_plan

    model = gqa_llama()
    dead = [3, 17, 40, 63]
    with torch.no_grad():
        for norm in [model.model.norm] + [n for layer in model.model.layers
                                          for n in (layer.input_layernorm, layer.post_attention_layernorm)]:  # fmt: skip
            norm.weight[dead] = 0.0
    importance = width_importance(model, BLOCKS)
    assert [importance["hidden"][c] for c in dead] == [0.0] * 4 and min(importance["hidden"]) == 0.0
    plan = width_plan(importance, model.config.to_dict(), CutConfig(hidden_size=48), [0, 1, 2])
    assert len(plan["hidden"]) == 48 and not set(dead) & set(plan["hidden"])
    assert plan["hidden"] == sorted(plan["hidden"]) and plan["mlp"] is None and plan["heads"] is None


def test_width_importance_is_deterministic_for_a_calibration_set():
    from distill.pruning import width_importance

    model = gqa_llama(seed=1)
    first = width_importance(model, BLOCKS)
    assert width_importance(model, BLOCKS) == first
    assert width_importance(model, BLOCKS[:2]) != first


def test_impossible_width_targets_are_one_line_and_nothing_is_written(gqa_teacher, cache_dir, tmp_path):
    from distill.models import local_models

    with pytest.raises(DistillError, match="num_heads 3 is not divisible by num_kv_heads 2"):
        cut_recipe(gqa_teacher, cache_dir, tmp_path, "student.cut.num_heads=3", "student.cut.num_kv_heads=2")
    cases = {
        "student.cut.hidden_size=40": r"student\.cut\.hidden_size: 40 is not a multiple of the head dimension 16",
        "student.cut.num_heads=3": r"student\.cut\.num_heads: 3 heads are not divisible by the 2 KV groups",
        "student.cut.intermediate_size=64": r"student\.cut\.intermediate_size: 64 asked for, the teacher has 48",
        "student.cut.hidden_size=80": r"student\.cut\.hidden_size: 80 asked for, the teacher has 64",
        "student.cut.num_kv_heads=3": r"student\.cut\.num_kv_heads: 3 asked for, the teacher has 2",
    }
    cuts = set((cache_dir / "cuts").glob("*")) if (cache_dir / "cuts").exists() else set()
    for override, message in cases.items():
        recipe = cut_recipe(gqa_teacher, cache_dir, tmp_path, override)
        for convert in (False, True):
            with pytest.raises(DistillError, match=message):
                local_models(recipe, convert=convert)
    assert not (tmp_path / "runs").exists()
    assert (set((cache_dir / "cuts").glob("*")) if (cache_dir / "cuts").exists() else set()) == cuts


# --------------------------------------------------------------------------- prune, then distill


@pytest.mark.slow
def test_a_two_layer_teacher_pruned_to_one_narrower_layer_is_distilled_and_served_by_distill_run(
    micro, cache_dir, tmp_path
):
    """`distill run` from the micro teacher (2 layers, width 128, 2 heads in 2 KV groups) to a student of
    its last layer pruned to width 64, one KV group, 128 MLP channels: generate, train a few KD steps with
    the hidden-state loss through a learned projection, eval, and vLLM serving the pruned student alone."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import MICRO, TEACHER, TINY, teacher_of

    teacher = teacher_of(micro(*TEACHER))
    runs = tmp_path / "runs"
    args = [str(TINY), *MICRO, f"runs_dir={runs}", f"cache_dir={cache_dir}", "teacher.tiny=null",
            f"teacher.model={teacher}", "student.tiny=null", "student.cut.num_layers=1",
            "student.cut.hidden_size=64", "student.cut.num_heads=1", "student.cut.num_kv_heads=1",
            "student.cut.intermediate_size=128", "student.cut.calibration=8",
            "train.hidden={pairs: [[0, 1]], loss: cosine, weight: 0.5}",
            "teacher.backend=hf", "generate.mode=score", "generate.num_sequences=32", "generate.top_k=16",
            "generate.validation_sequences=8", "train.max_steps=6", "train.batch_size=8", "train.lr=3e-3",
            "train.warmup_steps=1", "train.eval_every=6", "train.save_every=6", "eval.backend=hf",
            "eval.limit=16", "eval.tasks=[distill_ppl]", "eval.gate.criteria=[]", "eval.gate.min_acceptance_rate=null",
            "serve.bench.setups=[student]", "serve.bench.requests=4", "serve.bench.concurrency=[2]",
            "serve.bench.max_tokens=8", "serve.bench.prompt_tokens=16", "serve.max_model_len=256",
            "pipeline.quantize=false", "pipeline.promote=false", "pipeline.sft_baseline=false"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "distill", "run", *args, "--no-progress"],
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = runs / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for stage in ("generate", "train", "eval", "bench"):
        assert manifest[stage]["status"] == "done", stage
    config = json.loads((run_dir / "student" / "final" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (1, 64, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (1, 1, 64)
    assert not any("projection" in k for k in load_file(run_dir / "student" / "final" / "model.safetensors"))
    kept = json.loads((run_dir / "student" / "final" / "distill-cut.json").read_text())["chosen"]["kept"]
    assert len(kept["hidden"]) == 64 and kept["kv_heads"] in ([[0]], [[1]]) and len(kept["mlp"][0]) == 128
    metrics = [json.loads(line) for line in (run_dir / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_hidden"] > 0 for r in metrics if "loss" in r)
    served = json.loads((run_dir / "serve" / "bench.json").read_text())["setups"]["student"]
    level = served["levels"]["2"]  # vLLM loaded the pruned directory and generated with it
    assert level["errors"] == 0 and level["output_tokens"] == 4 * 8 and served["healthy_after"]
