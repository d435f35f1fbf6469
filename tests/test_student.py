"""Student training on a real teacher store (captured with the transformers backend: no engine start)."""

import json
import shutil

import pytest

from distill.tracking import read_metrics

from .conftest import MICRO, TEACHER, TINY, run_cli, train_run

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
    """`distill COMMAND` on the micro recipe with this module's store, through the CLI's main in this
    process (nothing here is about processes; the launch tests are test_distributed's)."""
    return run_cli(args[0], TINY, *MICRO, *TEACHER, *STORE, f"runs_dir={runs}", *args[1:])


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

    with pytest.raises(DistillError, match="no teacher store at .*teacher"):
        train_run(micro("train.loss=reverse_kl"))


def test_lora_trains_only_adapters_and_exports_adapter_and_merged_model(micro):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from distill.models import build_tiny_llama
    from distill.tokenizer import load_tokenizer

    recipe = micro(
        "train.loss=ce",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.lr=1e-2",
        "student.lora.r=4",
        "student.lora.alpha=8",
        "student.lora.target_modules=[q_proj, v_proj]",
    )
    result = train_run(recipe, progress=False)
    adapter = recipe.run_dir / "student" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    merged = load_file(result.final_dir / "model.safetensors")
    assert not any("lora" in k for k in merged)  # a plain HF model, servable as is
    from distill.stages.prepare import prepare

    base = build_tiny_llama(
        recipe.student.tiny, load_tokenizer(prepare(recipe).tokenizer_dir), seed=recipe.train.seed
    )
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    assert torch.equal(merged["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # frozen
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"]
    )
    again = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)


def test_lora_target_that_does_not_exist_is_refused_before_training(micro):
    from distill.errors import DistillError

    recipe = micro("train.loss=ce", "student.lora.target_modules=[q_proj, wq]")
    with pytest.raises(
        DistillError, match=r"student.lora.target_modules: wq not in the model \(its linear layers: .*q_proj"
    ):
        train_run(recipe, progress=False)


def test_a_store_from_another_tokenizer_is_refused(micro):
    import numpy as np

    from distill.errors import DistillError

    from .test_store import make_store, random_capture

    recipe = micro("train.loss=forward_kl")
    identity = {
        "mode": "score",
        "k": 4,
        "vocab_size": 4096,
        "encoding": {"id_bits": 12},
        "tokenizer_hash": "0" * 64,
    }
    make_store(
        recipe.run_dir / "teacher",
        [random_capture(np.random.default_rng(0), "a", vocab=4096, k=4)],
        identity=identity,
    )
    with pytest.raises(DistillError, match="was made with another tokenizer than the student's") as refused:
        train_run(recipe, progress=False)
    assert "set train.cross_tokenizer.method=byte (or uld)" in str(refused.value)
    # across tokenizers, the store's own tokenizer is needed to read its text: named where it was looked for
    crossing = micro("train.loss=forward_kl", "train.cross_tokenizer.method=byte")
    with pytest.raises(
        DistillError, match=r"the tokenizer it was made with \(sha256 000000000000\) is not at"
    ):
        train_run(crossing, progress=False)
    assert not (crossing.run_dir / "student").exists()


OWN_TOKENIZER = ["student.tokenizer=corpus", "student.vocab_size=1024"]  # the teacher's has 4,096 tokens


@pytest.mark.slow
def test_a_student_with_its_own_tokenizer_learns_across_tokenizers_and_is_refused_as_a_draft(
    store_runs, tmp_path
):
    from distill.tokenizer import load_tokenizer

    shutil.copytree(store_runs / "tiny" / "teacher", tmp_path / "tiny" / "teacher")
    steps = [*TRAIN, "train.max_steps=16", "train.eval_every=16", "train.ce_weight=0", "--no-progress"]
    for method in ("byte", "uld"):
        out = distill("train", *OWN_TOKENIZER, f"train.cross_tokenizer.method={method}", *steps, "--overwrite",
                      runs=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [r for r in read_metrics(tmp_path / "tiny" / "student" / "metrics.jsonl") if "loss" in r]
        assert len(rows) == 16
        first, last = sum(r["loss_kd"] for r in rows[:4]) / 4, sum(r["loss_kd"] for r in rows[-4:]) / 4
        assert last < first * 0.9, (method, first, last)
        for r in rows:  # what could not be aligned is counted: here, only a block's first partial character
            assert r["spans"] > 0 and 0 <= r["unaligned"] <= 0.05 * r["spans"]
            assert r["tokens"] % 1 == 0 and 0.2 < r["one_to_one_share"] < 1
        assert "val_bpb" in rows[-1] and "val_kl" not in rows[-1]  # token-level KL is not measured across
    final = tmp_path / "tiny" / "student" / "final"
    assert len(load_tokenizer(final)) == 1024  # the student is exported with its own tokenizer
    out = distill("serve", "--draft", *OWN_TOKENIZER, runs=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "cannot be the teacher's speculative-decoding draft" in out.stderr


# A teacher trained long enough to know something (held-out perplexity ~290 against 4,096 uniform) and
# a store of its own samples (temperature 1) of 128 prompts with their top-32: the demo's kind of store.
STRONGER_TEACHER = [
    "pretrain.max_steps=300",
    "pretrain.batch_size=16",
    "pretrain.lr=3e-3",
    "pretrain.warmup_steps=20",
    "pretrain.save_every=100",
    "pretrain.eval_every=100",
]
KD_STORE = [
    "teacher.backend=hf",
    "generate.mode=sample",
    "generate.num_sequences=128",
    "generate.items_per_shard=64",
    "generate.top_k=32",
    "generate.max_new_tokens=128",
]
SAME_BUDGET = [
    "train.max_steps=150",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=10",
    "train.log_every=10",
    "train.eval_every=50",
    "train.save_every=150",
    "--no-progress",
]


@pytest.mark.slow
def test_kd_student_beats_the_sft_student_on_held_out_text(cache_dir, tmp_path):
    """Judged where neither objective reaches: bits per byte of held-out human text (the corpus's
    validation split, and text from outside the corpus) and the full-vocabulary KL to the teacher."""

    def run(*args):
        out = run_cli(args[0], TINY, *MICRO, *STRONGER_TEACHER, *KD_STORE, f"runs_dir={tmp_path}", *args[1:])
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    run("generate")
    results = {}
    for name, loss in (("sft", ["train.loss=ce"]), ("kd", [])):  # kd: tiny.yaml's own train.loss
        run("train", *loss, *SAME_BUDGET, "--overwrite")
        last = read_metrics(tmp_path / "tiny" / "student" / "metrics.jsonl")[-1]
        assert last["step"] == 150
        results[name] = last
    record = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["stages"]["train"]["outputs"]
    assert record["tail"] == "bucket"  # tiny.yaml mixes in CE (ce_weight 0.5): auto picks the bucket
    kd, sft = results["kd"], results["sft"]
    # the same sequences and the same number of target tokens: only the objective differs
    assert kd["tokens"] == sft["tokens"]
    print(
        {
            n: {k: round(v, 4) for k, v in r.items() if k.startswith(("val_", "outside_"))}
            for n, r in results.items()
        }
    )
    for text in ("val", "outside"):
        assert kd[f"{text}_kl_full"] < sft[f"{text}_kl_full"] - 0.01
        assert kd[f"{text}_bpb"] < sft[f"{text}_bpb"]
        assert kd[f"{text}_top1"] > sft[f"{text}_top1"]


@pytest.mark.slow
def test_the_sampled_tail_refuses_a_store_of_scored_corpus_text(store_runs, tmp_path):
    shutil.copytree(store_runs / "tiny" / "teacher", tmp_path / "tiny" / "teacher")
    out = distill("train", "train.tail=sample", *TRAIN, "--no-progress", runs=tmp_path)
    assert out.returncode != 0
    assert "train.tail=sample needs a store whose tokens the teacher sampled" in out.stderr
    assert "Traceback" not in out.stderr
