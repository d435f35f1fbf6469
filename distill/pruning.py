"""What a pruned student keeps of its teacher, its decoder layers and the channels and heads inside them,
measured on calibration text.

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

Width (`width_importance`, `width_plan`, `prune_tensor`), as Minitron measures it, from activations on the
same calibration tokens: an MLP channel by the mean |activation| entering down_proj, a query head by the
mean norm of its output entering o_proj, a residual channel by the mean |output| of every RMSNorm (both of
each layer and the final one). Heads go GQA-aware: whole KV groups (by the summed scores of their heads),
then the same number of query heads inside every kept group, so num_heads / num_kv_heads stays whole and
each kept query head still reads its own group's keys and values. The pruned model is a plain HF Llama
directory with an explicit head_dim, which transformers and vLLM load.
"""

from __future__ import annotations

import math
from pathlib import Path

from distill.errors import DistillError


def hidden_states(model, blocks: list[list[int]], batch_size: int = 8):
    """The residual stream at every layer boundary, (L + 1, N, H) fp32 over the N tokens of `blocks`
    (each block a list of token ids; padding excluded). Entry i is layer i's input, i + 1 its output."""
    import torch

    from distill.heldout import padded

    parts = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(blocks), batch_size):
            ids, mask = padded(blocks[lo : lo + batch_size], model.device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            mask = mask.bool()
            # NOTE: the last entry may be the final norm's output rather than the last layer's (it depends
            # on the transformers version); only the last layer's block influence reads it, and windows
            # never reach it since the last layer is always kept.
            parts.append(torch.stack([h[mask].float().cpu() for h in out.hidden_states]))
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
        x = torch.tensor([ids], device=model.device)
        return model(input_ids=x, use_cache=False).logits[0].float().log_softmax(-1)

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


# --------------------------------------------------------------------------- width

WIDTH_MODELS = ("llama", "mistral")  # the tensor layout prune_tensor knows


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def width_importance(model, blocks: list[list[int]]) -> dict:
    """Mean activation magnitudes on the calibration tokens (one block at a time, so no padding):
    `mlp[l][c]` |input of layer l's down_proj| per channel, `heads[l][h]` the norm of query head h's slice
    of the input of o_proj, `hidden[c]` |output| per channel summed over every RMSNorm. Deterministic for
    given weights and blocks."""
    import torch

    config = model.config.to_dict()
    d, heads = head_dim(config), config["num_attention_heads"]
    layers = model.model.layers
    mlp = torch.zeros(len(layers), config["intermediate_size"], dtype=torch.float64)
    head = torch.zeros(len(layers), heads, dtype=torch.float64)
    hidden = torch.zeros(config["hidden_size"], dtype=torch.float64)

    def add_to(table, row=None, per_head=False):
        def hook(_module, args, output=None):
            x = (args[0] if output is None else output)[0].detach().double()  # (T, width), batch of one
            value = x.view(x.shape[0], heads, d).norm(dim=-1) if per_head else x.abs()
            (table if row is None else table[row]).add_(value.sum(0).cpu())

        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(add_to(mlp, i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(add_to(head, i, per_head=True)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(add_to(hidden)))
    hooks.append(model.model.norm.register_forward_hook(add_to(hidden)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in blocks:
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    tokens = sum(len(ids) for ids in blocks)

    def rounded(t):  # 6 significant digits: the ranking, at a fraction of the JSON
        return [float(f"{v:.6g}") for v in (t / tokens).tolist()]

    return {"tokens": tokens, "hidden": rounded(hidden), "mlp": [rounded(r) for r in mlp],
            "heads": [rounded(r) for r in head]}  # fmt: skip


def check_width(config: dict, cut, field: str = "student.cut") -> None:
    """Refuse width targets the teacher (its config.json) cannot give, in one line each."""
    width = cut.width
    if not width:
        return
    if config.get("model_type") not in WIDTH_MODELS:
        raise DistillError(
            f"{field}: width pruning knows Llama-layout models ({', '.join(WIDTH_MODELS)}); the teacher is "
            f"{config.get('model_type')!r}"
        )
    names = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads"}  # fmt: skip
    teacher = {
        **config,
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
    }
    for key, value in width.items():
        if value > teacher[key]:
            raise DistillError(f"{field}.{names[key]}: {value} asked for, the teacher has {teacher[key]}")
    d = head_dim(config)
    if "hidden_size" in width and width["hidden_size"] % d:
        raise DistillError(
            f"{field}.hidden_size: {width['hidden_size']} is not a multiple of the head dimension {d}"
        )
    groups = width.get("num_key_value_heads", teacher["num_key_value_heads"])
    heads = width.get(
        "num_attention_heads", groups * (teacher["num_attention_heads"] // teacher["num_key_value_heads"])
    )
    if heads % groups:
        raise DistillError(
            f"{field}.num_heads: {heads} heads are not divisible by the {groups} KV groups (every group keeps "
            "the same number of query heads)"
        )
    per_group = teacher["num_attention_heads"] // teacher["num_key_value_heads"]
    if heads // groups > per_group:
        raise DistillError(
            f"{field}.num_heads: {heads} heads in {groups} KV groups is {heads // groups} per group; the "
            f"teacher's groups hold {per_group}"
        )


def _top(scores: list[float], k: int) -> list[int]:
    """The indices of the k largest scores, in increasing index order (ties: the lower index)."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def width_plan(importance: dict, config: dict, cut, layers: list[int]) -> dict:
    """What the student keeps inside each of `layers` (teacher indices): `hidden` residual channels,
    per kept layer the `mlp` channels, `kv_heads` (KV groups) and `heads` (query heads), each None where
    the teacher's width stays."""
    check_width(config, cut)
    width = cut.width
    plan: dict = {"hidden": None, "mlp": None, "kv_heads": None, "heads": None}
    if "hidden_size" in width:
        plan["hidden"] = _top(importance["hidden"], width["hidden_size"])
    if "intermediate_size" in width:
        plan["mlp"] = [_top(importance["mlp"][i], width["intermediate_size"]) for i in layers]
    if "num_attention_heads" in width or "num_key_value_heads" in width:
        q = config["num_attention_heads"]
        g = config.get("num_key_value_heads") or q
        groups = width.get("num_key_value_heads", g)
        per_group = width.get("num_attention_heads", groups * (q // g)) // groups
        plan["kv_heads"], plan["heads"] = [], []
        for i in layers:
            scores = importance["heads"][i]
            members = [list(range(k * (q // g), (k + 1) * (q // g))) for k in range(g)]
            kept_groups = _top([sum(scores[h] for h in m) for m in members], groups)
            plan["kv_heads"].append(kept_groups)
            plan["heads"].append(
                [
                    m[j]
                    for k in kept_groups
                    for m in [members[k]]
                    for j in _top([scores[h] for h in m], per_group)
                ]
            )
    return plan


def pruned_config(config: dict, plan: dict) -> dict:
    """The teacher's config.json for the student of `plan` (layers renumbered by the caller)."""
    out = dict(config)
    out["head_dim"] = head_dim(config)  # explicit: hidden_size / num_heads no longer gives it
    if plan["hidden"] is not None:
        out["hidden_size"] = len(plan["hidden"])
    if plan["mlp"] is not None:
        out["intermediate_size"] = len(plan["mlp"][0])
    if plan["heads"] is not None:
        out["num_attention_heads"], out["num_key_value_heads"] = (
            len(plan["heads"][0]),
            len(plan["kv_heads"][0]),
        )
    return out


def prune_tensor(name: str, tensor, plan: dict, d: int):
    """`tensor` (named as in the student, its layer index renumbered to the plan's position) with only the
    rows and columns the plan keeps; names outside the Llama layout are refused."""
    import torch

    def index(idx):
        return None if idx is None else torch.tensor(idx, dtype=torch.long)

    def heads(idx):  # head indices -> their rows
        return None if idx is None else [h * d + j for h in idx for j in range(d)]

    def take(t, rows=None, cols=None):
        if rows is not None:
            t = t.index_select(0, index(rows))
        if cols is not None:
            t = t.index_select(1, index(cols))
        return t

    hidden = plan["hidden"]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return take(tensor, cols=hidden)
    if name == "model.norm.weight":
        return take(tensor, rows=hidden)
    from distill.models import LAYER_PREFIX

    if name.startswith(LAYER_PREFIX):
        i, rest = name[len(LAYER_PREFIX) :].split(".", 1)
        i = int(i)
        mlp = plan["mlp"][i] if plan["mlp"] is not None else None
        q = heads(plan["heads"][i]) if plan["heads"] is not None else None
        kv = heads(plan["kv_heads"][i]) if plan["kv_heads"] is not None else None
        parts = {
            "self_attn.q_proj.weight": (q, hidden), "self_attn.q_proj.bias": (q, None),
            "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv, None),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv, None),
            "self_attn.o_proj.weight": (hidden, q), "self_attn.o_proj.bias": (hidden, None),
            "mlp.gate_proj.weight": (mlp, hidden), "mlp.gate_proj.bias": (mlp, None),
            "mlp.up_proj.weight": (mlp, hidden), "mlp.up_proj.bias": (mlp, None),
            "mlp.down_proj.weight": (hidden, mlp), "mlp.down_proj.bias": (hidden, None),
            "input_layernorm.weight": (hidden, None), "post_attention_layernorm.weight": (hidden, None),
        }  # fmt: skip
        if rest in parts:
            rows, cols = parts[rest]
            return take(tensor, rows, cols)
    raise DistillError(f"student.cut: width pruning does not know the teacher's tensor {name}")


# --------------------------------------------------------------------------- the cut a recipe asks for

IMPORTANCE_FORMAT = 1


def measured(cut) -> bool:
    """Whether the cut is chosen from measurements (importance- or KL-chosen layers, any width target)."""
    return cut.select != "even" or bool(cut.width)


def importance_choice(teacher: Path, cut, recipe, log=print) -> dict:
    """The layers `cut` keeps of the teacher at `teacher` and, for width targets, the channels and heads
    inside them, with why: what was measured on `cut.calibration` corpus train documents, cached under
    `<cache>/importance/` by the teacher's weights and the calibration text. Goes into the cut student's
    distill-cut.json."""
    from distill.artifacts import atomic_write_json, read_json
    from distill.corpus import prepare_corpus
    from distill.models import check_model_dir, model_fingerprint, resolve_device

    teacher = check_model_dir(teacher, "teacher.model")
    config = check_cut(teacher, cut)  # before anything is measured or written
    corpus = prepare_corpus(recipe.data, recipe.cache_path)
    calibration = calibration_of(cut, recipe, corpus.text_hash)
    path = _cache_file(model_fingerprint(teacher, recipe.cache_path), calibration, recipe.cache_path)
    drop = config["num_hidden_layers"] - (cut.num_layers or 0)
    known = read_json(path) if path.is_file() else None
    if not _has(known, cut, drop):
        # measured once per teacher and calibration text; each new size or method adds what it needs
        fresh = measure_importance(
            teacher, corpus, calibration, cut, drop, known, log, resolve_device(recipe.device)
        )
        atomic_write_json(path, fresh)
        known = fresh
    return _choice(known, cut, calibration, config)


def known_choice(teacher: Path, cut, recipe) -> dict | None:
    """What importance_choice returns, where everything it needs was measured before, else None;
    writes nothing (dry runs)."""
    from distill.artifacts import read_json
    from distill.corpus import Corpus, corpus_root
    from distill.models import model_fingerprint

    config = check_cut(teacher, cut)
    root = corpus_root(recipe.data, recipe.cache_path)
    fingerprint = model_fingerprint(teacher, recipe.cache_path, remember=False)
    if fingerprint is None or not (root / "manifest.json").is_file():
        return None
    calibration = calibration_of(cut, recipe, Corpus(root).text_hash)
    path = _cache_file(fingerprint, calibration, recipe.cache_path)
    known = read_json(path) if path.is_file() else None
    drop = config["num_hidden_layers"] - (cut.num_layers or 0)
    return _choice(known, cut, calibration, config) if _has(known, cut, drop) else None


def _has(known: dict | None, cut, drop: int) -> bool:
    if known is None:
        return False
    if cut.width and "width" not in known:
        return False
    if cut.select == "even" or drop == 0:
        return True
    return str(drop) in known.get("window_kl" if cut.select == "kl" else "window_distance", {})


def _choice(importance: dict, cut, calibration: dict, config: dict) -> dict:
    from distill.models import cut_layers

    total = config["num_hidden_layers"]
    if cut.select == "even" or cut.num_layers == total:
        layers = cut_layers(total, cut)
    else:
        layers = keep_layers(importance, cut.num_layers, by="kl" if cut.select == "kl" else "angle")
    choice = {"select": cut.select, "layers": layers, "calibration": calibration}
    if cut.width:
        choice["width"] = cut.width
        choice["kept"] = width_plan(importance["width"], config, cut, layers)
    if cut.select != "even":  # the depth scores (the width ones are in the cache, and large)
        choice["importance"] = {k: v for k, v in importance.items() if k != "width"}
    else:
        choice["importance"] = {"tokens": importance["width"]["tokens"]}
    if cut.width:
        choice["importance"]["width"] = importance["width"]
    return choice


def check_cut(teacher: Path, cut) -> dict:
    """The teacher's config.json, once the cut is one it can give (layer count and width targets)."""
    import json

    config = json.loads((teacher / "config.json").read_text())
    total = config.get("num_hidden_layers")
    total = total if isinstance(total, int) else 0
    from distill.models import cut_layers

    cut_layers(total, cut)
    if cut.select != "even":
        check_keep(total, cut)
    check_width(config, cut)
    return config


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


def measure_importance(
    teacher: Path,
    corpus,
    calibration: dict,
    cut,
    drop: int,
    known: dict | None,
    log=print,
    device: str = "cpu",
) -> dict:
    """`known` (the cached measurements, or None) with what `cut` needs added."""
    import torch

    from distill.heldout import Documents
    from distill.models import load_causal_lm
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    docs = Documents.encode(
        corpus.texts("train"), tokenizer, calibration["max_tokens"], calibration["documents"]
    )
    if not docs.ids:
        raise DistillError("student.cut: the corpus's train split has no text to calibrate importance on")
    out = {"window_distance": {}, "window_kl": {}, **(known or {})}
    # NOTE: fp32 whatever the recipe's dtype: angles between nearly parallel hidden states need the
    # precision. On the recipe's device (a GPU measures Llama 3 8B in minutes; the scores do not depend on it
    # beyond rounding).
    model = load_causal_lm(teacher, "teacher.model", torch.float32).to(device)
    if cut.select != "even" and drop and str(drop) not in out["window_distance"]:
        log(
            f"student.cut: measuring the teacher's layer importance on {len(docs.ids)} corpus train documents"
        )
        depth = layer_importance(model, docs.ids, drop=[drop])
        out.update(layers=depth["layers"], tokens=depth["tokens"], block_influence=depth["block_influence"])
        out["window_distance"] = {**out["window_distance"], str(drop): depth["window_distance"][drop]}
    if cut.select == "kl" and drop and str(drop) not in out["window_kl"]:
        log(f"student.cut: measuring the KL to the teacher without each block of {drop} layers")
        out["window_kl"] = {**out["window_kl"], str(drop): window_kl(model, docs.ids, drop)}
    if cut.width and "width" not in out:
        log(
            f"student.cut: measuring the teacher's channel and head importance on {len(docs.ids)} corpus train documents"
        )
        out["width"] = width_importance(model, docs.ids)
    return out
