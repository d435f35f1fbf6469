"""Every process distill starts dies with it: `distill serve` killed outright takes its vLLM server along,
and a port already in use is one line naming it. (SIGTERM of the in-process engine: test_generate.)"""

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from distill.processes import spawn
from distill.vllm.server import free_port, require_free_port

from .conftest import MICRO, TINY, teacher_of
from .test_pretrain import TEACHER


def test_a_child_dies_with_its_parent_even_by_sigkill(tmp_path):
    """The kernel's parent-death signal, not distill's own cleanup: the parent gets no chance to run any."""
    script = "import sys, time; from distill.processes import spawn; print(spawn(['sleep', '600']).pid, flush=True); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert child.ppid() == parent.pid and child.is_running()
    parent.kill()
    parent.wait()
    child.wait(timeout=30)  # psutil.TimeoutExpired if it outlived its parent


def test_spawned_children_stay_in_distills_process_group():
    child = spawn(["sleep", "600"])
    try:
        assert os.getpgid(child.pid) == os.getpgrp()  # a `kill -9` of distill's group reaches it
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_killed_distill_serve_leaves_no_server_and_a_taken_port_is_one_line(cache_dir, tmp_path):
    from distill.config import load_recipe

    overrides = [*MICRO, *TEACHER, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}"]
    shutil.copytree(teacher_of(load_recipe(TINY, overrides)), tmp_path / "tiny" / "student" / "final")
    port = free_port()
    cmd = [sys.executable, "-m", "distill", "serve", str(TINY), *overrides, "--student", f"serve.port={port}",
           "serve.max_model_len=256"]  # fmt: skip
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 600
        line = ""
        while not line.startswith("serving: "):
            assert serve.poll() is None and time.time() < deadline, "the server did not start"
            line = serve.stdout.readline()
        server = psutil.Process(serve.pid).children(recursive=True)
        assert any("vllm" in " ".join(p.cmdline()) and "serve" in p.cmdline() for p in server)

        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr[-2000:]
        assert second.stderr.startswith(f"distill: error: port {port} on 127.0.0.1 is in use (")

        serve.kill()  # SIGKILL of distill alone: no handler runs, the kernel tells its children
        serve.wait()
        _, alive = psutil.wait_procs(server, timeout=90)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        require_free_port("127.0.0.1", port)  # the port is free again
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
