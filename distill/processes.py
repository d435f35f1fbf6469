"""Every process distill starts dies with it.

- SIGTERM or SIGHUP (a scheduler, a timeout, `kill PID`, a closed terminal) becomes `Terminated` in the
  main thread, so `with` blocks and `finally:` clauses stop servers and engines before distill exits
  with 128 + the signal number (143 for SIGTERM), as an unhandled SIGTERM would.
- A child started with `spawn` stays in distill's process group (a `kill -9` of the group takes it
  too), and the kernel sends it SIGTERM when distill dies in any other way (PR_SET_PDEATHSIG): even a
  lone `kill -9 PID` of distill leaves no `vllm serve` holding memory or a port.
- `stop` ends a child and everything under it (a vLLM server's engine core and workers).

vLLM's in-process engine (`vllm.LLM`) starts its engine core with multiprocessing, in distill's group;
`Terminated` unwinds through the stage's `finally:`, which shuts the engine down.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
HANDLED = (signal.SIGTERM, signal.SIGHUP)
_main_pid: int | None = None
# Looked up here, not in the child: between fork and exec only async-signal-safe work is sound.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class Terminated(BaseException):
    """A termination signal arrived; unwinding stops what distill started. Not an `Exception`, so no
    `except Exception:` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def handle_termination() -> None:
    """Turn SIGTERM and SIGHUP into `Terminated` in this (the main) process, from now on."""
    global _main_pid
    _main_pid = os.getpid()
    for signum in HANDLED:
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame) -> None:
    if os.getpid() != _main_pid:  # a forked child inherited the handler: the default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for other in HANDLED:  # one unwinding: a second signal must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


def _tie_to_parent(parent: int):
    def tie() -> None:  # runs in the child between fork and exec
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd)` in distill's process group, sent SIGTERM by the kernel if distill dies."""
    return subprocess.Popen(cmd, preexec_fn=_tie_to_parent(os.getpid()), **popen_kwargs)


def run(cmd: list[str], **popen_kwargs) -> int:
    """`spawn` and wait; a `Terminated` or Ctrl-C while waiting stops the child (and its children)."""
    proc = spawn(cmd, **popen_kwargs)
    try:
        return proc.wait()
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM `proc`, SIGKILL it after `timeout` s, then end whatever it started that outlived it."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=10)


def exit_now(code: int) -> None:
    """Exit with `code` without finalizing the interpreter: streams and logging flushed, atexit handlers
    and object destructors skipped. For processes `accelerate launch` started, once their work is done
    and written: at interpreter exit, gloo's worker threads can still hold tensors whose destruction
    aborts the process (SIGABRT, "terminate called without an active exception"; seen in CI on a
    ZeRO-3 rank after its run had finished), turning a finished run into a failed launch."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
