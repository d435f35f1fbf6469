"""Which of a teacher's decoder layers a pruned student keeps, measured on calibration text.

Measures, from the teacher's hidden states (one forward pass over the calibration blocks, fp32):
- `block_influence[i]`: 1 - the mean cosine similarity between layer i's input and its output, over
  every calibration token. A layer that barely turns the residual stream is cheap to drop.
- `window_distance[n][s]`: the mean angular distance (arccos of the cosine, over pi) between the
  residual stream before layer s and after layer s + n - 1: what dropping the n contiguous layers from s
  would skip. The smallest one marks the block that does least.

`keep_layers` turns those into the layers a student keeps: the first and the last layer stay (they map
embeddings in and logits out), and the dropped layers are one contiguous block, the one of least angular
distance. Dropping one middle block keeps far more of SmolLM2-135M than spacing the kept layers evenly
(docs/real-teacher.md, measured by bench/cut_layers.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from distill.errors import DistillError


def hidden_states(model, blocks: list[list[int]], batch_size: int = 8):
    """The residual stream at every layer boundary, (L + 1, N, H) fp32 over the N tokens of `blocks`
    (each block a list of token ids; padding excluded). Entry i is layer i's input, i + 1 its output."""
    import torch

    parts = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(blocks), batch_size):
            seqs = blocks[lo : lo + batch_size]
            T = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), T), dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.bool)
            for b, s in enumerate(seqs):
                ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), True
            out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            # NOTE: the last entry may be the final norm's output rather than the last layer's (it depends
            # on the transformers version); only the last layer's block influence reads it, and windows
            # never reach it since the last layer is always kept.
            parts.append(torch.stack([h[mask].float() for h in out.hidden_states]))
    model.train(was_training)
    return torch.cat(parts, dim=1)


def _cosine(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)


def layer_importance(model, blocks: list[list[int]], drop: list[int] | None = None) -> dict:
    """Block influence of every layer and, for each count in `drop`, the angular distance of every
    contiguous window of that many layers. Deterministic for given weights and blocks."""
    states = hidden_states(model, blocks)
    total = states.shape[0] - 1
    influence = [1.0 - _cosine(states[i], states[i + 1]).mean().item() for i in range(total)]
    windows = {}
    for n in drop or []:
        if not 0 < n < total:
            raise DistillError(f"cannot drop {n} of {total} layers")
        windows[n] = [
            (_cosine(states[s], states[s + n]).acos().mean() / math.pi).item() for s in range(total - n + 1)
        ]
    return {
        "layers": total,
        "tokens": states.shape[1],
        "block_influence": influence,
        "window_distance": windows,
    }


def window_kl(model, blocks: list[list[int]], drop: int) -> list[float | None]:
    """Per start s: the mean full-vocabulary KL(model || model without its layers s .. s + drop - 1), nats
    per token over the calibration blocks, for the windows that keep the first and the last layer (None
    elsewhere): how far dropping each block moves the teacher's next-token distribution, which is what
    distillation has to win back; measured, where the angles only estimate it."""
    import torch

    from distill.losses import _kl

    layers, total = model.model.layers, model.config.num_hidden_layers
    was_training = model.training
    model.eval()

    def log_probs(ids: list[int]):
        # NOTE: no KV cache: its layer slots follow the full model's layer indices. fp32 log-softmax.
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)

    kl: list[float | None] = [None] * (total - drop + 1)
    try:
        with torch.no_grad():
            reference = [log_probs(ids) for ids in blocks]  # one at a time: no padding to mask
            for start in range(1, total - drop):
                kept = [layer for i, layer in enumerate(layers) if not start <= i < start + drop]
                model.model.layers, model.config.num_hidden_layers = torch.nn.ModuleList(kept), len(kept)
                summed = sum(
                    _kl(p, log_probs(ids)).sum().item() for p, ids in zip(reference, blocks, strict=True)
                )
                kl[start] = summed / sum(len(ids) for ids in blocks)
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, total
        model.train(was_training)
    return kl


def keep_layers(importance: dict, num_layers: int, by: str = "angle") -> list[int]:
    """The `num_layers` layers to keep: all but the contiguous block of least angular distance (`by`
    angle) or whose removal moves the teacher's distribution least (`by` kl), never the first or the last
    layer."""
    total = importance["layers"]
    if not 2 <= num_layers <= total:
        raise DistillError(f"cannot keep {num_layers} of {total} layers by importance (2 to {total})")
    n = total - num_layers
    if n == 0:
        return list(range(total))
    table = importance.get("window_kl" if by == "kl" else "window_distance", {})
    scores = table.get(n) or table.get(str(n))
    if scores is None:
        raise DistillError(f"no window {'KLs' if by == 'kl' else 'distances'} for dropping {n} layers")
    # windows that keep layer 0 and layer total - 1: starts 1 .. total - 1 - n
    start = min(range(1, total - n), key=lambda s: scores[s])
    return [*range(start), *range(start + n, total)]


# --------------------------------------------------------------------------- student.cut.select: importance

IMPORTANCE_FORMAT = 1


def importance_choice(teacher: Path, cut, recipe, log=print) -> dict:
    """The layers `cut` (select: importance or kl) keeps of the teacher at `teacher`, and why: what
    was measured on `cut.calibration` corpus train documents, cached under `<cache>/importance/` by the
    teacher's weights and the calibration text. Goes into the cut student's distill-cut.json."""
    from distill.artifacts import atomic_write_json, read_json
    from distill.corpus import prepare_corpus
    from distill.models import check_model_dir, model_fingerprint

    teacher = check_model_dir(teacher, "teacher.model")
    total = check_count(teacher, cut)
    corpus = prepare_corpus(recipe.data, recipe.cache_path)
    calibration = calibration_of(cut, recipe, corpus.text_hash)
    path = _cache_file(model_fingerprint(teacher, recipe.cache_path), calibration, recipe.cache_path)
    drop = total - cut.num_layers
    known = read_json(path) if path.is_file() else None
    if not _has(known, cut.select, drop):
        # measured once per teacher and calibration text; each new size or method adds its windows
        fresh = measure_importance(teacher, corpus, calibration, drop, cut.select == "kl", log)
        for table in ("window_distance", "window_kl"):
            fresh[table] = {**(known or {}).get(table, {}), **fresh.get(table, {})}
        atomic_write_json(path, fresh)
        known = fresh
    return _choice(known, cut, calibration)


def known_choice(teacher: Path, cut, recipe) -> dict | None:
    """What importance_choice returns, where everything it needs was measured before, else None;
    writes nothing (dry runs)."""
    from distill.artifacts import read_json
    from distill.corpus import Corpus, corpus_root
    from distill.models import model_fingerprint

    total = check_count(teacher, cut)
    root = corpus_root(recipe.data, recipe.cache_path)
    fingerprint = model_fingerprint(teacher, recipe.cache_path, remember=False)
    if fingerprint is None or not (root / "manifest.json").is_file():
        return None
    calibration = calibration_of(cut, recipe, Corpus(root).text_hash)
    path = _cache_file(fingerprint, calibration, recipe.cache_path)
    known = read_json(path) if path.is_file() else None
    return _choice(known, cut, calibration) if _has(known, cut.select, total - cut.num_layers) else None


def _has(known: dict | None, select: str, drop: int) -> bool:
    table = "window_kl" if select == "kl" else "window_distance"
    return known is not None and (drop == 0 or str(drop) in known.get(table, {}))


def _choice(importance: dict, cut, calibration: dict) -> dict:
    layers = keep_layers(importance, cut.num_layers, by="kl" if cut.select == "kl" else "angle")
    return {"select": cut.select, "layers": layers, "calibration": calibration, "importance": importance}


def check_count(teacher: Path, cut) -> int:
    """The teacher's layer count, once the number `cut` keeps is one importance can choose."""
    import json

    total = json.loads((teacher / "config.json").read_text()).get("num_hidden_layers")
    check_keep(total if isinstance(total, int) else 0, cut)
    return total


def check_keep(total: int, cut) -> None:
    if cut.num_layers > total:
        raise DistillError(
            f"student.cut.num_layers: {cut.num_layers} layers asked for, the teacher has {total}"
        )
    if cut.num_layers < 2:
        raise DistillError(
            "student.cut.num_layers: select: importance keeps the first and the last layer, so 2 or more"
        )


def calibration_of(cut, recipe, corpus_hash: str) -> dict:
    return {"documents": cut.calibration, "max_tokens": recipe.data.seq_len, "corpus": corpus_hash}


def _cache_file(fingerprint: dict, calibration: dict, cache_dir: Path) -> Path:
    from distill.artifacts import hash_json

    key = {"format": IMPORTANCE_FORMAT, "teacher": fingerprint, **calibration}
    return Path(cache_dir) / "importance" / f"{hash_json(key)[:16]}.json"


def measure_importance(teacher: Path, corpus, calibration: dict, drop: int, kl: bool, log=print) -> dict:
    import torch

    from distill.heldout import Documents
    from distill.models import load_causal_lm
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    docs = Documents.encode(
        corpus.texts("train"), tokenizer, calibration["max_tokens"], calibration["documents"]
    )
    if not docs.ids:
        raise DistillError(
            "student.cut.select: importance: the corpus's train split has no text to calibrate on"
        )
    log(f"student.cut: measuring the teacher's layer importance on {len(docs.ids)} corpus train documents")
    # NOTE: fp32 whatever the recipe's dtype: angles between nearly parallel hidden states need the precision.
    model = load_causal_lm(teacher, "teacher.model", torch.float32)
    importance = layer_importance(model, docs.ids, drop=[drop] if drop else [])
    importance["window_distance"] = {str(n): d for n, d in importance["window_distance"].items()}
    if kl and drop:
        log(f"student.cut: measuring the KL to the teacher without each block of {drop} layers")
        importance["window_kl"] = {str(drop): window_kl(model, docs.ids, drop)}
    return importance
