"""Arguments for vLLM's engine, with the CPU accommodations kept behind device detection.

On GPUs vLLM's defaults stand (plus whatever the recipe passes through). On CPU-only machines the vLLM
CPU build needs a bounded KV cache, a RAM share instead of GPU memory, eager mode (starts in ~30 s
instead of ~85 s), fp32 (bf16 runs at half speed on AVX2 CPUs without bf16 hardware; a W8A8 model on an
AMX CPU is the exception, see cpu_dtype), no chunked prefill (see cpu_defaults) and, on machines of a
few cores, no core held back for vLLM's scheduler (see engine_kwargs).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.config import RecipeConfig


# why a student with its own tokenizer is never the teacher's draft (serve, bench and eval say it)
NOT_A_DRAFT = (
    "it cannot be the teacher's speculative-decoding draft, because vLLM needs the draft and the target to "
    "share one vocabulary (the draft proposes token ids the target verifies)"
)
SMALL_CPU = 4  # at most this many cores: vLLM CPU reserves none of them for its scheduler


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cpu_defaults() -> dict[str, Any]:
    # NOTE: on the CPU build gpu_memory_utilization is the share of RAM vLLM may take.
    # NOTE: when a prefill is chunked, vLLM 0.32 rewinds a seeded request's generator with
    # `set_offset`, which CPU generators lack: the engine dies ("CPU Generator does not use offset")
    # as soon as enough seeded prompts arrive together. Unchunked prefill never rewinds.
    return {
        "dtype": "float32",
        "enforce_eager": True,
        "gpu_memory_utilization": 0.3,
        "enable_chunked_prefill": False,
    }


def cpu_dtype(model: str | Path, amx: bool | None = None) -> str:
    """The activation dtype vLLM CPU runs `model` in: float32, except a W8A8 model on a CPU with AMX.

    There vLLM runs the int8 linear layers on its AMX kernel (`int8_scaled_mm_with_quant`, picked when the
    activations are symmetric and the weight's shape fits AMX tiles), which takes bf16 or fp16
    activations only: in fp32 the engine dies at its first forward pass ("expect A to be bfloat16 or
    half"). AMX CPUs have bf16 hardware, so bf16 costs no speed there. Elsewhere (AVX2, AVX-512 without
    AMX) vLLM's oneDNN int8 kernel takes fp32. `amx` stands in for this CPU's answer (tests)."""
    from distill.vllm.kernels import scheme_of

    if scheme_of(Path(model)) != "w8a8":
        return "float32"
    if amx is None:
        import torch

        amx = torch.cpu._is_amx_tile_supported()
    return "bfloat16" if amx else "float32"


def engine_kwargs(model: str, gpu: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` (or `vllm serve`) serving `model` on this machine, or on a
    GPU machine when `gpu` says so (a dry run printing a GPU command); overrides win."""
    kwargs: dict[str, Any] = {"model": str(model), "seed": 0}
    if not (has_cuda() if gpu is None else gpu):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        if (os.cpu_count() or 1) <= SMALL_CPU:
            # NOTE: vLLM CPU keeps one core per worker for its scheduler and binds the model's threads to
            # the rest: on 2 cores, half the machine. Measured here (SmolLM2-135M, 48 x 64 sampled tokens,
            # top-32): 164 tok/s with no core reserved against 110-125 with one.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        kwargs.update(cpu_defaults(), dtype=cpu_dtype(model))
    kwargs.update(overrides)
    return kwargs


def teacher_engine_args(recipe: RecipeConfig, model: Path) -> dict[str, Any]:
    """The teacher's engine: generate.engine passed through, logprobs room for generate.top_k, the
    teacher's dtype and the generation seed."""
    from distill.config import logprobs_problem
    from distill.errors import DistillError

    k, extra = recipe.generate.top_k, dict(recipe.generate.engine)
    problem = logprobs_problem(k, extra)  # the recipe's validation refuses it first: recipes built in code
    if problem:
        raise DistillError(problem)
    extra.setdefault("max_logprobs", k)
    if recipe.teacher.dtype != "auto":
        extra.setdefault("dtype", recipe.teacher.dtype)
    extra.setdefault("seed", recipe.generate.seed)
    extra.setdefault("trust_remote_code", recipe.teacher.trust_remote_code)
    return engine_kwargs(str(model), **extra)


def serving_engine_args(
    recipe: RecipeConfig,
    mode: str,
    student: Path | None,
    teacher: Path | str | None = None,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """Engine arguments of a served setup (recipe section `serve`): the student (`mode=student`), the
    teacher drafting with the student (`draft`), or the teacher alone (`teacher`, the serving
    benchmark's baseline). `gpu` forces the GPU form (a dry run for a GPU host)."""
    cfg = recipe.serve
    model = student if mode == "student" else teacher
    if model is None:
        raise ValueError(
            f"serving mode {mode!r} needs {'the student' if mode == 'student' else 'the teacher'}"
        )
    args = engine_kwargs(str(model), gpu=gpu)
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    if mode == "draft":
        check_draft_vocabulary(student, teacher)
        args["speculative_config"] = {
            "method": "draft_model",
            "model": str(student),
            "num_speculative_tokens": cfg.num_speculative_tokens,
        }
    trust = recipe.student.trust_remote_code if mode == "student" else recipe.teacher.trust_remote_code
    args["trust_remote_code"] = bool(trust)  # never on unless the recipe says so
    args.update(cfg.engine)
    return args


def draft_problem(student: Path | str | None, teacher: Path | str | None) -> str | None:
    """Why `student` cannot be `teacher`'s vLLM draft (a cross-tokenizer student: speculative decoding
    passes token ids between the two models), or None. Paths that are not here (a GPU host's) pass."""
    from distill.tokenizer import other_vocabulary

    if student is not None and teacher is not None and other_vocabulary(student, teacher):
        return f"the student at {student} has another tokenizer than the teacher's ({teacher}): {NOT_A_DRAFT}"
    return None


def check_draft_vocabulary(student: Path | None, teacher: Path | str | None) -> None:
    from distill.errors import DistillError

    problem = draft_problem(student, teacher)
    if problem:
        raise DistillError(f"{problem}; serve the student alone")


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now, while the interpreter is whole.

    Left to interpreter exit, vLLM's engine-core monitor thread races the teardown; on the CPU build that
    race occasionally ends the process with SIGABRT ("terminate called without an active exception")
    after all the work is written.
    """
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


# --------------------------------------------------------------------------- engines kept between uses

_kept: dict[str, Any] = {"depth": 0, "key": None, "llm": None}


@contextmanager
def kept_engines():
    """Within this block, a `vllm.LLM` a caller is done with stays up, and the next one asked for with the
    same arguments is that engine (its prefix cache emptied, so it computes as a fresh one would). One is
    kept at a time; the last is shut down when the outermost block ends. `distill run` keeps the
    teacher's engine across the training store and the held-out store (one start instead of two); tests
    keep one across the commands of a module."""
    _kept["depth"] += 1
    try:
        yield
    finally:
        _kept["depth"] -= 1
        if _kept["depth"] == 0:
            _release_kept()


def engine_key(engine_args: dict[str, Any]) -> str:
    """What identifies an engine among kept ones: its arguments, in a canonical spelling."""
    return json.dumps(engine_args, sort_keys=True, default=str)


def engine_kept(engine_args: dict[str, Any]) -> bool:
    """Whether start_engine(engine_args) would get the kept engine (no start)."""
    return _kept["llm"] is not None and _kept["key"] == engine_key(engine_args)


def start_engine(engine_args: dict[str, Any]):
    """A `vllm.LLM` with these arguments: the kept one if it matches (see kept_engines), else a new one."""
    from vllm import LLM

    if engine_kept(engine_args):
        llm, _kept["llm"], _kept["key"] = _kept["llm"], None, None
        llm.reset_prefix_cache()
        return llm
    _release_kept()  # one engine at a time: memory (GPU memory on GPUs) is what bounds them
    return LLM(**engine_args)


def finish_engine(llm, engine_args: dict[str, Any]) -> None:
    """A caller is done with `llm`: kept for the next use inside kept_engines, shut down otherwise."""
    if _kept["depth"] > 0:
        _release_kept()
        _kept["llm"], _kept["key"] = llm, engine_key(engine_args)
    else:
        shutdown_engine(llm)


def _release_kept() -> None:
    llm, _kept["llm"], _kept["key"] = _kept["llm"], None, None
    if llm is not None:
        shutdown_engine(llm)
