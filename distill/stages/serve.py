"""The serve stage: vLLM's OpenAI-compatible server for the student
alone, or for the teacher with the student as its speculative-decoding draft.

`vllm serve` runs as a child tied to this process (distill.vllm.server): this process waits until it
answers, prints the URL and the served models, and on SIGTERM/SIGINT stops it and its engine; if this
process is killed outright, the kernel stops the server (no orphan engine keeps the port). The API key
is passed in the environment (VLLM_API_KEY), never on the command line where `ps` shows it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from distill.errors import DistillError
from distill.run import Run


def student_model(run: Run, quant: str | None, check: bool = True) -> Path:
    """The run's student (or its quant/<scheme>), refused with the reason when this machine's vLLM
    cannot run it (rather than starting a server that dies at the first request)."""
    from distill.vllm.kernels import scheme_of, serving_problem

    path = run.student if quant is None else run.quantized(quant)
    if not check:
        return path
    if quant is None and not (path / "config.json").exists():
        raise DistillError(f"no model to serve at {path} (run `distill train` first)")
    if quant is not None and path not in run.quantized_students():
        have = ", ".join(p.name for p in run.quantized_students()) or "none"
        raise DistillError(
            f"no quantized student at {path} (run `distill quantize --scheme {quant}` first; quantized: {have})"
        )
    problem = serving_problem(scheme_of(path))
    if problem:
        raise DistillError(problem)
    return path


def serve(run: Run, mode: str, student: Path, dry_run: bool = False, log=print) -> int:
    """Serve the student (mode `student`) or the run's teacher drafting with it (`draft`) until vLLM exits
    or SIGTERM/SIGINT arrives (then the server is stopped and this returns 0). A dry run prints the
    GPU command: the teacher may be a path that exists only on the GPU host."""
    from distill.processes import Terminated
    from distill.vllm.engine import serving_engine_args
    from distill.vllm.server import VllmServer, serve_command, served_models

    recipe = run.recipe
    cfg = recipe.serve
    name = "student" if mode == "student" else "teacher"
    teacher = None if mode == "student" else (run.teacher if run.has_teacher else recipe.teacher.model)
    args = serving_engine_args(recipe, mode, student, teacher, gpu=True if dry_run else None)
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
