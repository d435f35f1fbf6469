"""Models: device and dtype choice, tiny Llama models built from configs, HF models loaded by path."""

from __future__ import annotations

from pathlib import Path

from distill.config import TinyModelConfig
from distill.errors import DistillError


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DistillError("device: cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` is bfloat16 on GPUs and float32 on CPUs.

    NOTE: this CPU (AVX2, no bf16 hardware) runs bf16 training 5-8x slower than fp32, so the CPU
    accommodation is fp32; GPUs keep bf16.
    """
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def tiny_llama_config(cfg: TinyModelConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_tiny_llama(cfg: TinyModelConfig, tokenizer, seed: int = 0):
    """A freshly initialised LlamaForCausalLM (deterministic for a given seed)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(cfg, tokenizer))


def check_model_dir(path: str | Path, field: str) -> Path:
    """A Hugging Face model directory that exists and has a config.json, or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise DistillError(f"{field}: model path does not exist: {path}")
    if not (path / "config.json").is_file():
        raise DistillError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    return path


def load_causal_lm(path: str | Path, field: str, dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path, field)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_causal_lm(path: str | Path, field: str) -> Path:
    """A model directory whose config names a causal LM architecture, or a one-line error."""
    import json

    path = check_model_dir(path, field)
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise DistillError(
            f"{field}: {path} is not a causal language model (architectures: {archs or 'none'})"
        )
    return path


def model_fingerprint(path: Path, cache_dir: Path) -> dict[str, str]:
    """SHA-256 of a model's config.json and of its weight files (the latter cached by path, size, mtime,
    since hashing 16 GB of Llama 3 8B weights takes a minute)."""
    from distill.artifacts import atomic_write_json, hash_json, read_json, sha256_file

    path = Path(path).resolve()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    stat_key = hash_json([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights] + [str(path)])
    cache_file = Path(cache_dir) / "model-hashes" / f"{stat_key}.json"
    if cache_file.exists():
        weights_hash = read_json(cache_file)["weights_hash"]
    else:
        weights_hash = hash_json({p.name: sha256_file(p) for p in weights})
        atomic_write_json(cache_file, {"path": str(path), "weights_hash": weights_hash})
    return {"path": str(path), "config_hash": sha256_file(path / "config.json"), "weights_hash": weights_hash}
