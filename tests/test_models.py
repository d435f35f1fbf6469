import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import TinyModelConfig
from distill.errors import DistillError
from distill.models import build_tiny_llama, check_model_dir, count_parameters, load_causal_lm
from distill.tokenizer import load_tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "vllm_generate.py"


@pytest.fixture(scope="module")
def tiny_model_dir(prepared, tmp_path_factory):
    tok = load_tokenizer(prepared.tokenizer_dir)
    cfg = TinyModelConfig(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256)
    model = build_tiny_llama(cfg, tok, seed=3)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model


def test_build_from_config_sizes_and_determinism(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    a, b = build_tiny_llama(cfg, tok, seed=1), build_tiny_llama(cfg, tok, seed=1)
    assert a.config.model_type == "llama" and a.config.num_key_value_heads == 1
    assert a.config.vocab_size == len(tok)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    embeddings = 2 * len(tok) * 64
    assert count_parameters(a) > embeddings


def test_transformers_loads_the_saved_directory(tiny_model_dir):
    path, original = tiny_model_dir
    loaded = load_causal_lm(path, "student.model", torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-6)


def test_missing_model_path_names_the_path(tmp_path):
    with pytest.raises(DistillError, match=r"student.model: model path does not exist: .*/nowhere"):
        check_model_dir(tmp_path / "nowhere", "student.model")
    with pytest.raises(DistillError, match="not a Hugging Face model directory"):
        check_model_dir(tmp_path, "teacher.model")


@pytest.mark.slow
def test_vllm_loads_and_generates_the_same_model(micro, tmp_path):
    """vLLM's engine (CPU build here) loads what distill exports, generates, and scores like
    transformers: a student trained with LoRA, whose final/ is the adapter merged into the weights."""
    from .conftest import train_run

    recipe = micro("train.loss=ce", "train.max_steps=2", "train.batch_size=2", "student.lora.r=4")
    path = train_run(recipe, progress=False).final_dir
    assert (path.parent / "adapter" / "adapter_config.json").exists()  # LoRA trained; final/ is merged
    model = load_causal_lm(path, "student.model", torch.float32)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert len(results) == 3
    for r in results:
        assert len(r["token_ids"]) == 12  # ignore_eos: exactly max_tokens
        # the logprob vLLM reports for each generated token equals transformers' on the same sequence
        ids = torch.tensor([r["prompt_ids"] + r["token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        start = len(r["prompt_ids"])
        expected = [logprobs[start - 1 + i, t].item() for i, t in enumerate(r["token_ids"])]
        assert r["logprobs"] == pytest.approx(expected, abs=2e-3)
        # greedy: every generated token is transformers' argmax at that position
        argmax = [int(logprobs[start - 1 + i].argmax()) for i in range(len(r["token_ids"]))]
        top_gap = [
            (logprobs[start - 1 + i].max() - logprobs[start - 1 + i, t]).item()
            for i, t in enumerate(r["token_ids"])
        ]
        assert all(a == t or gap < 1e-4 for a, t, gap in zip(argmax, r["token_ids"], top_gap, strict=True))
