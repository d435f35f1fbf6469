"""A byte-level BPE tokenizer trained locally on the corpus, saved in Hugging Face format.

Byte-level BPE (the kind Llama 3 uses) never meets an unknown character. Special tokens follow Llama 3's
names so chat-free code paths treat our tiny models and real Llama 3 the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.artifacts import atomic_directory, hash_json, remove_stale_temps, sha256_file
from distill.corpus import Corpus

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
TOKENIZER_FORMAT = 1


def train_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path, model_max_length: int = 4096) -> Path:
    """Train (or reuse) a BPE tokenizer on the train split; returns its directory."""
    key = hash_json({"format": TOKENIZER_FORMAT, "texts": corpus.text_hash, "vocab": vocab_size})[:16]
    root = Path(cache_dir) / "tokenizers" / key
    remove_stale_temps(root.parent)
    if (root / "tokenizer.json").exists():
        return root
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.texts("train"), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )
    with atomic_directory(root) as tmp:
        fast.save_pretrained(tmp)
    return root


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_hash(path: Path) -> str:
    return sha256_file(Path(path) / "tokenizer.json")


def tokenizer_files_hash(path: Path) -> str:
    """Every tokenizer file of a model directory (what lm-eval reads besides config and weights), hashed;
    unlike tokenizer_hash, also for slow tokenizers and with the tokenizer config and chat template."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens"))
                   or p.suffix in (".jinja", ".model", ".tiktoken") or p.name in ("vocab.json", "merges.txt")))  # fmt: skip
    return hash_json({p.name: sha256_file(p) for p in files})


def vocabulary(path: Path | str) -> dict[str, int]:
    """A tokenizer.json's token -> id map, added tokens included (whatever the file's layout)."""
    import json

    spec = json.loads((Path(path) / "tokenizer.json").read_text())
    vocab = spec.get("model", {}).get("vocab", {})
    pieces = dict(vocab) if isinstance(vocab, dict) else {str(v[0]): i for i, v in enumerate(vocab)}
    pieces.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return pieces


def other_vocabulary(a: Path | str, b: Path | str) -> bool:
    """Whether two model directories read and write different token ids, as their tokenizer.json files
    show (a model without one, e.g. a remote-code tokenizer's, is taken to share the other's): what a vLLM
    draft and its target, and a token-level comparison (KL, top-1, a draft's acceptance), must not have."""
    files = [Path(m) / "tokenizer.json" for m in (a, b)]
    return all(f.is_file() for f in files) and vocabulary(a) != vocabulary(b)


def tokenize_corpus(corpus: Corpus, tokenizer_dir: Path, cache_dir: Path) -> Path:
    """Token ids of each split as one flat array: BOS doc EOS BOS doc EOS ... (`<split>.npy`)."""
    key = hash_json({"texts": corpus.text_hash, "tokenizer": tokenizer_hash(tokenizer_dir)})[:16]
    root = Path(cache_dir) / "tokens" / key
    remove_stale_temps(root.parent)
    if (root / "test.npy").exists():
        return root
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.model_max_length = 1 << 62  # whole documents here; blocks are cut later
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    with atomic_directory(root) as tmp:
        for split in ("train", "validation", "test"):
            encoded = tokenizer(corpus.texts(split), add_special_tokens=True)["input_ids"]
            flat = np.fromiter((t for ids in encoded for t in (*ids, tokenizer.eos_token_id)), dtype=dtype)
            np.save(tmp / f"{split}.npy", flat)
    return root
