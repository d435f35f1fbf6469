"""Every process distill starts dies with it, even by SIGKILL. (`distill serve` killed outright, and a port
already in use: test_serve, on the server its tests share; SIGTERM of the in-process engine: test_generate.)"""

import os
import subprocess
import sys

import psutil

from distill.processes import spawn


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
