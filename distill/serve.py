"""The serve stage: vLLM's OpenAI-compatible server for the student
alone, or for the teacher with the student as its speculative-decoding draft.

`vllm serve` runs as a child tied to this process (distill.vllm_server): this process waits until it
answers, prints the URL and the served models, and on SIGTERM/SIGINT stops it and its engine; if this
process is killed outright, the kernel stops the server (no orphan engine keeps the port). The API key
is passed in the environment (VLLM_API_KEY), never on the command line where `ps` shows it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from distill.artifacts import quantized_students
from distill.config import RecipeConfig
from distill.errors import DistillError


def serve_engine_args(
    recipe: RecipeConfig, mode: str, student: Path | None, gpu: bool | None = None
) -> dict[str, Any]:
    """vLLM engine arguments: the student (`mode=student`), the teacher drafting with the student
    (`draft`), or the teacher alone (`teacher`, the baseline of the serving benchmark)."""
    from distill.generate import teacher_path
    from distill.vllm_engine import cpu_defaults, has_cuda

    cfg = recipe.serve
    if mode == "student":
        model = student
    elif gpu and recipe.teacher.model:  # a dry run for a GPU host: the path need not exist here
        model = recipe.teacher.model
    else:
        model = teacher_path(recipe)
    args: dict[str, Any] = {"model": str(model), "seed": 0}
    if not (has_cuda() if gpu is None else gpu):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args.update(cpu_defaults())
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    if mode == "draft":
        args["speculative_config"] = {
            "method": "draft_model",
            "model": str(student),
            "num_speculative_tokens": cfg.num_speculative_tokens,
        }
    trust = recipe.student.trust_remote_code if mode == "student" else recipe.teacher.trust_remote_code
    args["trust_remote_code"] = bool(trust)  # never on unless the recipe says so
    args.update(cfg.engine)
    return args


def student_model(recipe: RecipeConfig, quant: str | None, check: bool = True) -> Path:
    """The run's student (or its quant/<scheme>), refused with the reason when this machine's vLLM
    cannot run it (rather than starting a server that dies at the first request)."""
    from distill.quantize import scheme_of, serving_problem

    path = recipe.run_dir / ("student/final" if quant is None else f"quant/{quant}")
    if not check:
        return path
    if quant is None and not (path / "config.json").exists():
        raise DistillError(f"no model to serve at {path} (run `distill train` first)")
    if quant is not None and path not in quantized_students(recipe.run_dir):
        have = ", ".join(p.name for p in quantized_students(recipe.run_dir)) or "none"
        raise DistillError(
            f"no quantized student at {path} (run `distill quantize --scheme {quant}` first; quantized: {have})"
        )
    problem = serving_problem(scheme_of(path))
    if problem:
        raise DistillError(problem)
    return path


def run_server(recipe: RecipeConfig, mode: str, student: Path, dry_run: bool = False, log=print) -> int:
    """Serve until vLLM exits or SIGTERM/SIGINT arrives (then the server is stopped and this returns 0)."""
    from distill.processes import Terminated
    from distill.vllm_server import VllmServer, serve_command, served_models

    cfg = recipe.serve
    name = "student" if mode == "student" else "teacher"
    args = serve_engine_args(recipe, mode, student, gpu=True if dry_run else None)
    if dry_run:
        log(shlex.join(serve_command(args, cfg.port, host=cfg.host, served_name=name)))
        return 0
    key = os.environ.get(cfg.api_key_env)
    server = VllmServer(args, None, served_name=name, host=cfg.host, port=cfg.port, api_key=key)
    try:
        with server:
            log(
                f"serving: {server.url}/v1 models {', '.join(served_models(server.url, key))}"
                + (" (API key required)" if key else "")
            )
            status = server.wait()
    except (Terminated, KeyboardInterrupt):
        return 0
    if status != 0:
        raise DistillError(f"vllm serve exited with status {status}")
    return 0
