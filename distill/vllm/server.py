"""`vllm serve` as distill starts it: one class for every server (the on-policy teacher, eval's
local-completions backend, the serving benchmark, `distill serve`), and the queries made of a server.

A server is a child of distill tied to it (`distill.processes.spawn`): it stops when its `with` block
ends, when distill gets SIGTERM, and when distill dies. A port that is already taken is refused before
anything starts, in one line naming the port, and a server answers only once it is known to be ours
(it serves our model name), never a stale one left on the same port.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.processes import spawn, stop


def serve_command(
    engine_args: dict[str, Any], port: int, host: str = "127.0.0.1", served_name: str = "teacher"
) -> list[str]:
    """`vllm serve MODEL --flag value ...` from the keyword arguments `vllm.LLM` would take."""
    args = dict(engine_args)
    model = str(args.pop("model"))
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model]
    cmd += ["--host", host, "--port", str(port), "--served-model-name", served_name]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            cmd += [flag, json.dumps(value)]
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_free_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (as the server itself would bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DistillError(
                f"port {port} on {host} is in use ({exc.strerror}): another server, perhaps an earlier "
                "`distill serve`, listens there; stop it or choose another port (serve.port=N)"
            ) from exc


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def served_models(url: str, key: str | None = None) -> list[str]:
    """The model names a running OpenAI-compatible server answers to (GET /v1/models)."""
    request = urllib.request.Request(f"{url}/v1/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


class VllmServer:
    """`vllm serve` for as long as the `with` block runs.

    Args:
        engine_args: keyword arguments `vllm.LLM` would take (`model` among them).
        log_path: the server's stdout and stderr; None: this process's own.
        port: None picks a free port on loopback.
        api_key: the key the server requires (VLLM_API_KEY in its environment, never on its command line).
    """

    def __init__(
        self,
        engine_args: dict[str, Any],
        log_path: Path | None,
        start_timeout: float = 600.0,
        served_name: str = "teacher",
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
    ):
        self.engine_args, self.start_timeout, self.served_name = engine_args, start_timeout, served_name
        self.log_path = None if log_path is None else Path(log_path)
        self.env, self.host, self.port, self.api_key = env, host, port, api_key
        self.proc = None
        self.url = ""

    def __enter__(self) -> VllmServer:
        import os

        if self.port is None:
            self.port = free_port()
        else:
            require_free_port(self.host, self.port)
        self.url = f"http://{self.host}:{self.port}"
        env = dict(os.environ if self.env is None else self.env)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        cmd = serve_command(self.engine_args, self.port, host=self.host, served_name=self.served_name)
        if self.log_path is None:
            self.proc = spawn(cmd, env=env)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.proc = spawn(cmd, env=env, stdout=log, stderr=log)
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self) -> None:
        where = f"; its log: {self.log_path}" if self.log_path else ""
        deadline = time.time() + self.start_timeout
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise DistillError(
                    f"the vLLM server of {self.served_name} exited with status {self.proc.returncode} "
                    f"while starting{where}"
                )
            if time.time() > deadline:
                raise DistillError(
                    f"the vLLM server of {self.served_name} did not start in {self.start_timeout:.0f}s{where}"
                )
            time.sleep(0.5)
        if self.proc.poll() is not None or self.served_name not in served_models(self.url, self.api_key):
            raise DistillError(f"port {self.port} on {self.host} is answered by another server, not ours")

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
