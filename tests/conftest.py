"""Shared fixtures: a session cache (corpus + tokenizer built once) and micro recipes for fast tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"

# A micro teacher/student: seconds per training run on 2 cores. Head dim 64 so vLLM's CPU kernels take it.
MICRO = [
    "teacher.tiny.hidden_size=128",
    "teacher.tiny.num_layers=2",
    "teacher.tiny.num_heads=2",
    "teacher.tiny.num_kv_heads=2",
    "teacher.tiny.intermediate_size=256",
    "teacher.tiny.max_position_embeddings=256",
    "student.tiny.hidden_size=128",
    "student.tiny.num_layers=1",
    "student.tiny.num_heads=2",
    "student.tiny.num_kv_heads=2",
    "student.tiny.intermediate_size=256",
    "data.seq_len=64",
    "tracking.wandb=disabled",
]
# The micro teacher most tests share: 40 steps, pretrained once per session (cached by content hash).
TEACHER = [
    "pretrain.max_steps=40",
    "pretrain.batch_size=16",
    "pretrain.save_every=4",
    "pretrain.eval_every=10",
    "pretrain.log_every=1",
    "pretrain.warmup_steps=4",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's cache. pytest-xdist workers keep their own, except for the pretrained teachers:
    they share one `teachers/`, where pretrain's lock lets one worker train a teacher the other waits for."""
    path = tmp_path_factory.mktemp("distill-cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "shared-teachers"
        shared.mkdir(exist_ok=True)
        (path / "teachers").symlink_to(shared, target_is_directory=True)
    os.environ["DISTILL_CACHE_DIR"] = str(path)  # subprocesses (the CLI) share it
    return path


@pytest.fixture
def micro(cache_dir, tmp_path):
    """micro(*overrides) -> RecipeConfig for tiny.yaml shrunk to seconds, runs under tmp_path."""
    from distill.config import load_recipe

    def make(*overrides: str):
        return load_recipe(
            TINY, [*MICRO, f"runs_dir={tmp_path / 'runs'}", f"cache_dir={cache_dir}", *overrides]
        )

    return make


@pytest.fixture(scope="session")
def prepared(cache_dir):
    """The embedded corpus, its tokenizer and token arrays (built once per session)."""
    from distill.config import load_recipe
    from distill.stages.prepare import prepare

    recipe = load_recipe(TINY, [*MICRO, f"runs_dir={cache_dir / 'runs'}", f"cache_dir={cache_dir}"])
    return prepare(recipe)


@pytest.fixture(scope="session")
def teacher_server(cache_dir, tmp_path_factory):
    """The micro teacher (MICRO + TEACHER) alone behind `vllm serve`, started once for the session with
    the engine arguments `distill bench serve` gives its `teacher` setup (serve.max_model_len=256): the
    serving benchmark's teacher setup and eval's local-completions teacher (serve.bench.servers,
    eval.servers) are this one server. Its log: `server.log_path`.

    pytest-xdist workers share it: the first to ask starts it, the other uses it, and the one that started
    it stops it once no worker that uses it is left (see `_shared_server`)."""
    from distill.config import load_recipe
    from distill.vllm.engine import serving_engine_args
    from distill.vllm.server import VllmServer

    root = tmp_path_factory.mktemp("teacher-server")
    overrides = [*MICRO, *TEACHER, f"runs_dir={root}", f"cache_dir={cache_dir}", "serve.max_model_len=256"]
    recipe = load_recipe(TINY, overrides)
    args = serving_engine_args(recipe, "teacher", None, teacher_of(recipe))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        with VllmServer(args, root / "server.log") as server:
            yield server
        return
    shared = tmp_path_factory.getbasetemp().parent / "shared-teacher-server"
    yield from _shared_server(shared, lambda: VllmServer(args, root / "server.log"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _shared_server(shared: Path, make, patience: float = 3600.0):
    """A server shared by the test workers through `shared/state.json` (its URL, log, starter and users),
    read and written under a lock. A user that dies is no longer waited for (its PID is gone)."""
    import json
    import time
    from types import SimpleNamespace

    from distill.artifacts import exclusive
    from distill.vllm.server import healthy

    state, lock, me = shared / "state.json", shared / ".lock", os.getpid()
    started = None
    with exclusive(lock):
        running = json.loads(state.read_text()) if state.exists() else None
        if running and _alive(running["owner"]) and healthy(running["url"]):
            running["users"].append(me)
            state.write_text(json.dumps(running))
            server = SimpleNamespace(url=running["url"], log_path=Path(running["log"]))
        else:
            started = server = make().__enter__()
            info = {"owner": me, "url": server.url, "log": str(server.log_path), "users": [me]}
            state.write_text(json.dumps(info))
    try:
        yield server
    finally:
        deadline = time.time() + patience
        while True:
            with exclusive(lock):
                running = json.loads(state.read_text())
                running["users"] = [u for u in running["users"] if u != me and _alive(u)]
                if started is None or not running["users"] or time.time() > deadline:
                    if started is None:
                        state.write_text(json.dumps(running))
                    else:
                        state.unlink()
                    break
            time.sleep(1)
        if started is not None:
            started.__exit__(None, None, None)


def pytest_configure(config):
    """pytest-xdist workers, and every process they start (CLI runs, launched ranks, vLLM engines), run
    one compute thread each, and vLLM engines run in the process that creates them.

    - Threads: by default each process sizes its OpenMP pool to every core, and a vLLM engine binds its
      threads to them. Two workers on two cores then run two pools of spinning threads against each
      other, several times slower than one thread per process (bench/threads.py; docs/tests.md).
      `nobind` leaves a vLLM engine's threads to OMP_NUM_THREADS.
    - In-process engines (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): vLLM's CPU platform starts its engine
      core and its worker in fresh `spawn` processes, each importing vLLM again. In-process, `vllm.LLM`
      skips both (bench/threads.py measures the start both ways) and `vllm serve` (whose engine core has
      its own process) skips the worker process. vLLM's own setting, for the tests' speed only: distill
      keeps vLLM's default, and the tests of engine processes ask for it (test_generate's SIGTERM)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """In `make test`'s pytest-xdist workers (`--dist loadscope --no-loadscope-reorder`) each module is
    one unit of work, so its module-scoped engines and servers start once; the modules are ordered by
    their count of slow tests, the longest first, so the last to start are short. (`loadgroup` could
    put two modules in one unit, but pytest-xdist 3.8 cannot rename pytest 9.2's node ids: its groups
    are silently ignored.) Tests marked `gpu` need CUDA; on machines without it they are reported as
    skipped, never passed."""
    if hasattr(config, "workerinput"):  # an xdist worker

        def module(item):
            return item.module.__name__

        slow = {}
        for item in items:
            slow[module(item)] = slow.get(module(item), 0) + ("slow" in item.keywords)
        items.sort(key=lambda item: -slow[module(item)])  # stable: a module's own order is kept
    _skip_gpu_tests(items)


def _skip_gpu_tests(items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it (launched ranks, vLLM engine cores), as `kill -9`
    of a whole job would: a lone SIGKILL of the parent leaves a vLLM EngineCore running."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def started_for_port(port: int | str) -> list[psutil.Process]:
    """Running processes whose command line names `port` as an argument (`--port N`, `serve.port=N`):
    a vLLM server and the `distill serve` above it. Exact arguments, not substrings: the other test worker's
    servers have long numbers (seeds, hashes, paths) on their command lines too."""
    port = str(port)
    found = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        named = ("--port", port) in itertools.pairwise(args) or f"serve.port={port}" in args
        with contextlib.suppress(psutil.NoSuchProcess):
            if named and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def teacher_of(recipe):
    """The recipe's teacher model directory (the embedded teacher pretrained now, or reused)."""
    from distill.pipeline import open_run

    return open_run(recipe).teacher


def train_run(recipe, **kwargs):
    """Stage train on `recipe`'s run, its inputs resolved as `distill train` resolves them."""
    from distill.pipeline import open_run
    from distill.stages.train import train, train_teacher

    return train(open_run(recipe, train_teacher(recipe), progress=False), **kwargs)


def greedy_gaps(model, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
    """For each completion token, how far below transformers' most likely token (at that position, on the
    same prefix) its log-probability is: 0 where an engine's greedy choice is transformers' argmax."""
    import torch

    gaps = []
    for prompt, tokens in zip(prompts, completions, strict=True):
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt + tokens])).logits[0].double().log_softmax(-1)
        rows = logprobs[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        gaps += (rows.max(-1).values - rows[torch.arange(len(tokens)), torch.tensor(tokens)]).tolist()
    return gaps


def token_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """transformers' log-probability of each of `tokens` after `prompt` and the tokens before it."""
    import torch

    with torch.no_grad():
        logprobs = model(torch.tensor([prompt + tokens])).logits[0].double().log_softmax(-1)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`distill ARGV` through the CLI's own `main`, in this process: the same parsing, checks, one-line
    errors and exit status as the real command, without a new interpreter importing torch and lm-eval
    again. For input the CLI refuses; tests about processes (signals, launches, servers) spawn one."""
    import io
    import sys

    from distill import processes
    from distill.cli import main

    saved = {signum: signal.getsignal(signum) for signum in processes.HANDLED}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    sys.stdout.flush()
    return subprocess.CompletedProcess(["distill", *map(str, argv)], code, out.getvalue(), err.getvalue())
