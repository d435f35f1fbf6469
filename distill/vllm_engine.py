"""Arguments for vLLM's engine, with the CPU accommodations kept behind device detection.

On GPUs vLLM's defaults stand (plus whatever the recipe passes through). On CPU-only machines the vLLM
CPU build needs a bounded KV cache, a RAM share instead of GPU memory, eager mode (starts in ~30 s
instead of ~85 s), fp32 (bf16 runs at half speed on AVX2 CPUs without bf16 hardware) and no chunked
prefill (see cpu_defaults).
"""

from __future__ import annotations

import os
from typing import Any


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


def engine_kwargs(model: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` serving `model` on this machine; overrides win."""
    kwargs: dict[str, Any] = {"model": str(model), "seed": 0}
    if not has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        kwargs.update(cpu_defaults())
    kwargs.update(overrides)
    return kwargs


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now, while the interpreter is whole.

    Left to interpreter exit, vLLM's engine-core monitor thread races the teardown; on the CPU build that
    race occasionally ends the process with SIGABRT ("terminate called without an active exception")
    after all the work is written.
    """
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
