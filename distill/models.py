"""Models: device and dtype choice, tiny Llama models built from configs, HF models loaded by path."""

from __future__ import annotations

import math
from pathlib import Path

from distill.config import TinyModelConfig
from distill.errors import DistillError
from distill.pruning import measured


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


def stored_parameters(model_dir: Path) -> int | None:
    """The parameter count of a model directory, read from its safetensors headers (no weights are
    loaded); None without safetensors files."""
    import json
    import struct

    total, files = 0, sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total if files else None


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


def model_fingerprint(path: Path, cache_dir: Path, remember: bool = True) -> dict[str, str] | None:
    """SHA-256 of a model's config.json and of its weight files (the latter cached by path, size, mtime,
    since hashing 16 GB of Llama 3 8B weights takes a minute); with remember False, only from that cache
    (None if the weights were never hashed), and nothing is written."""
    from distill.artifacts import atomic_write_json, hash_json, read_json, sha256_file

    path = Path(path).resolve()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    stat_key = hash_json([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights] + [str(path)])
    cache_file = Path(cache_dir) / "model-hashes" / f"{stat_key}.json"
    if cache_file.exists():
        weights_hash = read_json(cache_file)["weights_hash"]
    elif not remember:
        return None
    else:
        weights_hash = hash_json({p.name: sha256_file(p) for p in weights})
        atomic_write_json(cache_file, {"path": str(path), "weights_hash": weights_hash})
    return {"path": str(path), "config_hash": sha256_file(path / "config.json"), "weights_hash": weights_hash}


# --------------------------------------------------------------------------- a student cut from the teacher

LAYER_PREFIX = "model.layers."


def cut_layers(total: int, cut, field: str = "student.cut") -> list[int]:
    """The teacher layers a student keeps: `cut.layers`, or `cut.num_layers` evenly spaced from the first
    layer to the last, or all of them (a width-only CutConfig)."""
    if cut.layers is None and cut.num_layers is None:
        return list(range(total))
    if cut.layers is not None:
        if cut.layers[-1] >= total:
            raise DistillError(
                f"{field}.layers: layer {cut.layers[-1]} does not exist (the teacher has {total} layers, 0-{total - 1})"
            )
        return list(cut.layers)
    if cut.num_layers > total:
        raise DistillError(f"{field}.num_layers: {cut.num_layers} layers asked for, the teacher has {total}")
    if cut.num_layers == 1:
        return [total - 1]
    return [round(i * (total - 1) / (cut.num_layers - 1)) for i in range(cut.num_layers)]


def cut_dir(
    fingerprint: dict, layers: list[int], dtype: str, cache_dir: Path, chosen: dict | None = None
) -> Path:
    """Where the cut is cached: by the teacher's weights, the layers, the dtype and, for layers a
    selection chose (student.cut.select), how it chose them."""
    from distill.artifacts import hash_json

    key = {"teacher": fingerprint, "layers": layers, "dtype": dtype}
    if chosen:
        key["chosen"] = {"select": chosen["select"], "calibration": chosen["calibration"]}
        if chosen.get("width"):
            key["chosen"]["width"] = chosen["width"]
    return Path(cache_dir) / "cuts" / hash_json(key)[:16]


def chosen_cut(cut, layers: list[int]):
    """The cut as the list of layers a selection (student.cut.select) chose."""
    return cut.model_copy(update={"layers": layers, "num_layers": None, "select": "even"})


def made_cut(
    teacher: Path, layers: list[int], dtype: str, cache_dir: Path, chosen: dict | None = None
) -> Path | None:
    """The cut of `layers` already made from the teacher at `teacher`, or None; writes nothing."""
    fingerprint = model_fingerprint(teacher, cache_dir, remember=False)
    out = fingerprint and cut_dir(fingerprint, layers, dtype, cache_dir, chosen)
    return out if out and (out / "distill-cut.json").is_file() else None


def cut_student(
    teacher: Path, cut, dtype: str, cache_dir: Path, log=print, chosen: dict | None = None
) -> Path:
    """A model directory holding the teacher's embeddings, final norm, head and the decoder layers `cut`
    keeps, renumbered 0..N-1, and inside them the channels and heads `chosen["kept"]` keeps (width; see
    distill.pruning): read tensor by tensor from the teacher's safetensors files (the teacher is never
    built as a model); cached under `<cache>/cuts/` by the teacher's weights, the layers, dtype and
    how they were chosen."""
    import json
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from distill.artifacts import atomic_directory, atomic_write_json, remove_stale_temps

    teacher = check_model_dir(teacher, "teacher.model")
    config = json.loads((teacher / "config.json").read_text())
    total = config.get("num_hidden_layers")
    files = sorted(teacher.glob("*.safetensors"))
    if not isinstance(total, int) or not files:
        raise DistillError(
            f"student.cut: {teacher} has no num_hidden_layers or no safetensors weights to cut layers from"
        )
    keep = cut_layers(total, chosen_cut(cut, chosen["layers"]) if chosen else cut)
    fingerprint = model_fingerprint(teacher, cache_dir)
    out = cut_dir(fingerprint, keep, dtype, cache_dir, chosen)
    if (out / "distill-cut.json").is_file():
        return out
    plan = chosen.get("kept") if chosen else None
    widths = "".join(f", {k} {v}" for k, v in (chosen or {}).get("width", {}).items())
    log(f"student.cut: the teacher's layers {keep} ({len(keep)} of {total}){widths} into {out}")
    renumber = {old: new for new, old in enumerate(keep)}
    if plan:
        from distill.pruning import head_dim, prune_tensor, pruned_config

        d = head_dim(config)
        config = pruned_config(config, plan)
    remove_stale_temps(out.parent)
    with atomic_directory(out) as tmp:
        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name.startswith(LAYER_PREFIX):
                        index, rest = name[len(LAYER_PREFIX) :].split(".", 1)
                        if int(index) not in renumber:
                            continue
                        name_out = f"{LAYER_PREFIX}{renumber[int(index)]}.{rest}"
                    else:
                        name_out = name
                    tensor = weights.get_tensor(name)
                    if plan:
                        tensor = prune_tensor(name_out, tensor, plan, d)
                    tensors[name_out] = tensor.to(getattr(torch, dtype)).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config["num_hidden_layers"] = len(keep)
        config["dtype"] = dtype
        for key in ("layer_types",):  # per-layer settings follow the layers they belong to
            if isinstance(config.get(key), list) and len(config[key]) == total:
                config[key] = [config[key][i] for i in keep]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in teacher.iterdir():  # tokenizer, chat template, generation config
            if extra.is_file() and (extra.name.startswith(("tokenizer", "special_tokens", "generation_config",
                                                            "chat_template")) or extra.suffix in (".model", ".jinja")):  # fmt: skip
                shutil.copy2(extra, tmp / extra.name)
        atomic_write_json(
            tmp / "distill-cut.json",
            {"teacher": str(teacher), "teacher_layers": total, "layers": keep, "dtype": dtype, **fingerprint,
             **({"chosen": chosen} if chosen else {})},
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- train.hidden's layer pairs


def check_hidden_pairs(pairs: list[list[int]], student_layers: int, teacher_layers: int) -> None:
    """One line for a pair naming a layer the student or the teacher does not have."""
    for s, t in pairs:
        if s >= student_layers:
            raise DistillError(
                f"train.hidden.pairs: student layer {s} does not exist (the student has {student_layers} "
                f"layers, 0-{student_layers - 1})"
            )
        if t >= teacher_layers:
            raise DistillError(
                f"train.hidden.pairs: teacher layer {t} does not exist (the teacher has {teacher_layers} "
                f"layers, 0-{teacher_layers - 1})"
            )


def check_hidden(recipe, dry: bool = False) -> None:
    """check_hidden_pairs with the layer counts the recipe's models have (or will have: an unmade cut, a GGUF
    file, a tiny model), before anything is written; a dry run skips models that are not here."""
    if recipe.train.hidden is None:
        return
    import json

    from distill import gguf

    def layers_of(section, field: str) -> int | None:
        if section.model is None:
            return section.tiny.num_layers
        if gguf.is_gguf(section.model):
            return gguf.inspect(gguf.locate(section.model, field), field).layers
        if dry and not Path(section.model).exists():
            return None
        config = json.loads((check_model_dir(section.model, field) / "config.json").read_text())
        return config["num_hidden_layers"]

    teacher = layers_of(recipe.teacher, "teacher.model")
    cut = recipe.student.cut
    if cut is not None:
        student = None if teacher is None else len(cut_layers(teacher, cut))
    else:
        student = layers_of(recipe.student, "student.model")
    if teacher is not None and student is not None:
        check_hidden_pairs(recipe.train.hidden.pairs, student, teacher)


def local_models(recipe, convert: bool = True, log=print):
    """The recipe with teacher.model and student.model as Hugging Face directories every stage loads by
    path: a .gguf file converted once (distill.gguf), student.cut made from the teacher (cut_student).
    With convert False (dry runs) they are only checked, and nothing is written."""
    from distill import gguf

    check_hidden(recipe, dry=not convert)
    teacher, student = recipe.teacher, recipe.student
    if not (gguf.is_gguf(teacher.model) or gguf.is_gguf(student.model) or student.cut is not None):
        return recipe
    device = resolve_device(recipe.device)

    def dtype_of(section) -> str:
        return str(resolve_dtype(section.dtype, device)).removeprefix("torch.")

    def local(section, field: str):
        if not gguf.is_gguf(section.model):
            return section, None
        if not convert:  # the converted directory if there is one already; else the file, to convert
            path = gguf.locate(section.model, field)
            info = gguf.inspect(path, field)
            if done := gguf.converted(path, dtype_of(section), recipe.cache_path):
                return section.model_copy(update={"model": str(done)}), info
            return section, info
        path = gguf.convert(section.model, field, dtype_of(section), recipe.cache_path, log)
        return section.model_copy(update={"model": str(path)}), None

    teacher, teacher_info = local(teacher, "teacher.model")
    student, _ = local(student, "student.model")
    if student.cut is not None:
        if convert:
            chosen = None
            if measured(student.cut):
                from distill.pruning import importance_choice

                chosen = importance_choice(Path(teacher.model), student.cut, recipe, log)
            path = cut_student(
                Path(teacher.model), student.cut, dtype_of(student), recipe.cache_path, log, chosen
            )
            student = student.model_copy(update={"model": str(path), "cut": None})
        elif not (teacher_info or Path(teacher.model).exists()):
            pass  # a GPU recipe planned where its teacher is not (the cut is checked where it is made)
        else:  # the layer count from the GGUF header or config.json, without cutting anything
            import json

            total = (
                teacher_info.layers
                if teacher_info
                else json.loads(
                    (check_model_dir(teacher.model, "teacher.model") / "config.json").read_text()
                ).get("num_hidden_layers", 0)
            )
            keep = cut_layers(total, student.cut)  # checks the count whatever selects the layers
            chosen, on_disk = None, not gguf.is_gguf(teacher.model)
            if measured(student.cut):
                from distill.pruning import check_keep, known_choice

                if on_disk:  # checks the cut against the teacher's config.json first
                    chosen = known_choice(Path(teacher.model), student.cut, recipe)
                elif student.cut.select != "even":  # a GGUF header gives the layer count alone
                    check_keep(total, student.cut)
                keep = chosen["layers"] if chosen else None
            # the cut every stage uses once it has been made (so a dry run of a finished run skips them)
            if keep and on_disk and (done := made_cut(Path(teacher.model), keep, dtype_of(student),
                                                      recipe.cache_path, chosen)):  # fmt: skip
                student = student.model_copy(update={"model": str(done), "cut": None})
    return recipe.model_copy(update={"teacher": teacher, "student": student})


def initial_student(recipe, tokenizer_dir: Path, out: Path) -> Path:
    """The student before any training, as a model directory vLLM and lm-eval load: student.model itself
    (a cut included, once the CLI has made it), or student.tiny built with train.seed (exactly what
    `distill train` starts from), saved once into `out`."""
    if recipe.student.model:
        return Path(recipe.student.model)
    if (out / "config.json").exists():
        return out
    from distill.artifacts import begin_directory, commit_directory
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    tmp = begin_directory(out)
    build_tiny_llama(recipe.student.tiny, tokenizer, seed=recipe.train.seed).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    commit_directory(tmp, out)
    return out
