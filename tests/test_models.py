import pytest
import torch

from distill.config import TinyModelConfig
from distill.errors import DistillError
from distill.models import build_tiny_llama, check_model_dir, count_parameters, load_causal_lm
from distill.tokenizer import load_tokenizer


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
