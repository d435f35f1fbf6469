"""GGUF model files as teachers and students: checked from their header, converted once into a Hugging
Face directory (safetensors in the recipe's dtype, the tokenizer with its chat template, the generation
config) that every stage, vLLM included, loads by path.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, through the `gguf` package) and
dequantizes it; the converted directory is cached under `<cache>/gguf/`, keyed by the file's SHA-256,
the dtype and this module's `CONVERTER` version, so the conversion runs once per file and dtype.
A model file that ships inside an installed Python package is named `pkg:<package>/<file>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

CONVERTER = 1  # bump when the converted directory's contents change
# Dense decoders that transformers converts from GGUF, vLLM serves and distill cuts layer by layer
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # fmt: skip
MAGIC = b"GGUF"


def is_gguf(spec: str | None) -> bool:
    return bool(spec) and (str(spec).endswith(".gguf") or str(spec).startswith("pkg:"))


def locate(spec: str, field: str) -> Path:
    """The file a model field names: a path, or `pkg:<package>/<file>` inside an installed package."""
    if spec.startswith("pkg:"):
        from importlib.util import find_spec

        package, _, name = spec.removeprefix("pkg:").partition("/")
        found = find_spec(package) if package and name else None
        if found is None or not found.submodule_search_locations:
            raise DistillError(
                f"{field}: {spec}: no installed Python package {package!r} (expected pkg:<package>/<file>)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise DistillError(f"{field}: model file does not exist: {path}")
    return path


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    name: str
    layers: int
    tensor_types: dict[str, int]  # GGML type name -> tensors of that type
    chat_template: bool


def inspect(path: Path, field: str) -> GgufInfo:
    """The header of a GGUF file, or one line saying why distill cannot use it (not GGUF, truncated,
    an architecture or a quantization type it cannot convert)."""
    import gguf
    import numpy as np

    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise DistillError(f"{field}: {path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails on a short file while laying out tensors or fields
        raise DistillError(
            f"{field}: {path} is truncated or damaged ({type(exc).__name__}: {exc}); download it again"
        ) from exc
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise DistillError(f"{field}: {path} is truncated: its tensors need {end} bytes, the file has {size}")

    def field_value(key: str, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    arch = field_value("general.architecture", "unknown")
    if arch not in ARCHITECTURES:
        raise DistillError(
            f"{field}: {path}: GGUF architecture {arch!r} is not supported (distill converts "
            f"{', '.join(sorted(ARCHITECTURES))})"
        )
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    for name in types:
        qtype = gguf.GGMLQuantizationType[name]
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # one zero block: the gguf package dequantizes this type or raises NotImplementedError
            gguf.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            raise DistillError(
                f"{field}: {path}: its {name} tensors cannot be dequantized (the gguf package has no "
                "dequantizer for that type); use a file with another quantization"
            ) from None
    return GgufInfo(
        path=path,
        architecture=arch,
        name=str(field_value("general.name", path.stem)),
        layers=int(field_value(f"{arch}.block_count", 0)),
        tensor_types=types,
        chat_template=reader.fields.get("tokenizer.chat_template") is not None,
    )


def _memo(path: Path, cache_dir: Path) -> Path:
    from distill.artifacts import hash_json

    st = path.resolve().stat()
    key = hash_json([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return cache_dir / "model-hashes" / f"gguf-{key}.json"


def file_hash(path: Path, cache_dir: Path, remember: bool = True) -> str | None:
    """SHA-256 of the file, remembered by path, size and mtime (a 5 GB 8B model takes a while to hash);
    with remember False, only what is remembered (None if nothing is)."""
    from distill.artifacts import atomic_write_json, read_json, sha256_file

    memo = _memo(path, cache_dir)
    if memo.exists():
        return read_json(memo)["sha256"]
    if not remember:
        return None
    digest = sha256_file(path)
    atomic_write_json(memo, {"path": str(path.resolve()), "sha256": digest})
    return digest


def converted_dir(digest: str, dtype: str, cache_dir: Path) -> Path:
    return cache_dir / "gguf" / f"{digest[:16]}-{dtype}-v{CONVERTER}"


def converted(path: Path, dtype: str, cache_dir: Path) -> Path | None:
    """The finished conversion of the GGUF file at `path` in the cache, or None; never hashes the file."""
    known = file_hash(path, cache_dir, remember=False)
    if known and (converted_dir(known, dtype, cache_dir) / "distill-gguf.json").is_file():
        return converted_dir(known, dtype, cache_dir)
    return None


def convert(spec: str, field: str, dtype: str, cache_dir: Path, log=print) -> Path:
    """The Hugging Face directory of a GGUF model, converted now if it is not in the cache yet (a file
    distill cannot use is refused before anything is written)."""
    path = locate(spec, field)
    if done := converted(path, dtype, cache_dir):
        return done
    info = inspect(path, field)
    out = converted_dir(file_hash(path, cache_dir), dtype, cache_dir)
    log(f"{field}: converting {path.name} ({info.architecture}, {info.layers} layers) into {out}")
    from distill.artifacts import atomic_directory, atomic_write_json, remove_stale_temps

    remove_stale_temps(out.parent)
    with atomic_directory(out) as tmp:
        _write_hf_dir(info, dtype, tmp)
        atomic_write_json(
            tmp / "distill-gguf.json",
            {"source": str(path.resolve()), "spec": spec, "sha256": file_hash(path, cache_dir),
             "dtype": dtype, "converter": CONVERTER, "tensor_types": info.tensor_types},
        )  # fmt: skip
    return out


def _write_hf_dir(info: GgufInfo, dtype: str, out: Path) -> None:
    """Dequantize with transformers, then save a plain model: transformers keeps a `quantization_config`
    on a GGUF-loaded model and refuses to save it, so the weights move into a model built from the
    config without that field."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(info.path.parent), info.path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=getattr(torch, dtype))
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    cls = getattr(transformers, ARCHITECTURES[info.architecture])
    settings["architectures"] = [cls.__name__]
    config = type(loaded.config).from_dict(settings)
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
