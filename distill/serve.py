"""The serve stage: vLLM's OpenAI-compatible server for the student
alone, or for the teacher with the student as its speculative-decoding draft.

`vllm serve` runs in its own process group; this process waits until it answers, prints the URL and the
served model, and on SIGTERM/SIGINT stops the whole group (no orphan engine processes). The API key is
passed in the environment (VLLM_API_KEY), never on the command line where `ps` shows it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    if not (path / "config.json").exists():
        what = (
            "run `distill train` first" if quant is None else f"run `distill quantize --scheme {quant}` first"
        )
        raise DistillError(f"no model to serve at {path} ({what})")
    problem = serving_problem(scheme_of(path))
    if problem:
        raise DistillError(problem)
    return path


def served_models(url: str, key: str | None) -> list[str]:
    request = urllib.request.Request(f"{url}/v1/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def run_server(recipe: RecipeConfig, mode: str, student: Path, dry_run: bool = False, log=print) -> int:
    from distill.teacher_server import _healthy, serve_command

    cfg = recipe.serve
    name = "student" if mode == "student" else "teacher"
    args = serve_engine_args(recipe, mode, student, gpu=True if dry_run else None)
    cmd = serve_command(args, cfg.port, host=cfg.host, served_name=name)
    if dry_run:
        log(shlex.join(cmd))
        return 0
    key = os.environ.get(cfg.api_key_env)
    env = dict(os.environ)
    if key:
        env["VLLM_API_KEY"] = key
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    stopping: list[int] = []

    def stop(signum, frame):  # only signal here: the main loop below waits for the group to go
        stopping.append(signum)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = f"http://{cfg.host}:{cfg.port}"
    while not _healthy(url):
        if stopping:
            proc.wait()
            return 0
        if proc.poll() is not None:
            raise DistillError(f"vllm serve exited with status {proc.returncode} while starting")
        time.sleep(0.5)
    log(
        f"serving: {url}/v1 models {', '.join(served_models(url, key))}"
        + (" (API key required)" if key else "")
    )
    return proc.wait()
