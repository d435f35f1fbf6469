"""`distill serve` for real: vLLM's OpenAI-compatible server on loopback, driven by the openai client."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from .conftest import MICRO, TINY
from .test_pretrain import TEACHER

pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """Two runs on the micro teacher: one whose student is a byte copy of the teacher, one whose student
    is random weights of the same shape (same tokenizer, so both can draft)."""
    from distill.config import load_recipe
    from distill.generate import teacher_path
    from distill.models import build_tiny_llama
    from distill.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("serve")
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={root / 'copy'}", f"cache_dir={cache_dir}"])
    teacher = teacher_path(recipe)
    shutil.copytree(teacher, root / "copy" / "tiny" / "student" / "final")
    tokenizer = load_tokenizer(teacher)
    random = root / "random" / "tiny" / "student" / "final"
    build_tiny_llama(recipe.teacher.tiny, tokenizer, seed=3).save_pretrained(random)
    tokenizer.save_pretrained(random)
    return {"copy": root / "copy", "random": root / "random", "teacher": teacher}


def command(runs_dir, *args):
    return [
        sys.executable,
        "-m",
        "distill",
        "serve",
        str(TINY),
        *MICRO,
        *TEACHER,
        f"runs_dir={runs_dir}",
        *args,
    ]


class Server:
    """`distill serve` as a user runs it, until the block ends with SIGTERM."""

    def __init__(self, runs_dir, *args, key=None):
        self.port = free_port()
        env = {**os.environ}
        env.pop("DISTILL_API_KEY", None)
        if key:
            env["DISTILL_API_KEY"] = key
        cmd = command(runs_dir, *args, f"serve.port={self.port}", "serve.max_model_len=256")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        line = ""
        deadline = time.time() + 600
        while not line.startswith("serving: "):
            assert self.proc.poll() is None and time.time() < deadline, "server did not start"
            line = self.proc.stdout.readline()
        self.banner = line.strip()
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)

    def metric(self, name):
        with urllib.request.urlopen(f"{self.url}/metrics") as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


def test_dry_run_prints_the_gpu_command(runs):
    out = subprocess.run(
        command(runs["copy"], "--draft", "--dry-run"), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = out.stdout.splitlines()
    assert line.startswith(
        f"{os.path.dirname(sys.executable)}/vllm serve {runs['teacher']} --host 127.0.0.1 --port 8000 "
    )
    assert "--served-model-name teacher" in line and "--no-trust-remote-code" in line
    assert '--speculative-config \'{"method": "draft_model", "model": ' in line
    assert '"num_speculative_tokens": 4}' in line
    assert "--enforce-eager" not in line and "float32" not in line  # the GPU form, no CPU accommodations


def test_the_student_server_answers_the_openai_client_and_wants_the_key(runs):
    import openai

    with Server(runs["copy"], "--student", key="sekret") as server:
        assert server.banner == f"serving: {server.url}/v1 models student (API key required)"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret")
        reply = client.completions.create(model="student", prompt="The function", max_tokens=8, temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens == 8
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
        group = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(server.port) in " ".join(p.info["cmdline"] or [])
        ]
        children = [c for p in group for c in p.children(recursive=True)]
        assert len(group) >= 2  # distill serve and vllm serve
    assert server.proc.returncode == 0
    assert not [p for p in [*group, *children] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_distilled_draft_keeps_greedy_output_and_is_accepted_unlike_a_random_one(runs):
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["The function returns", "If the value is", "A list of", "This module provides"]
    tokenizer = AutoTokenizer.from_pretrained(runs["teacher"])
    model = AutoModelForCausalLM.from_pretrained(runs["teacher"], dtype=torch.float32)
    want = []
    for p in prompts:  # the teacher alone, greedy
        ids = tokenizer(p, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
        want.append(out[0, ids.shape[1] :].tolist())
    rates = {}
    for name in ("copy", "random"):
        with Server(runs[name], "--draft") as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
            got = []
            for p in prompts:
                reply = client.completions.create(
                    model="teacher",
                    prompt=p,
                    max_tokens=16,
                    temperature=0,
                    extra_body={"return_token_ids": True, "ignore_eos": True},
                )
                got.append(reply.choices[0].token_ids)
            drafted = server.metric("vllm:spec_decode_num_draft_tokens_total")
            accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total")
        assert got == want, name  # speculative decoding never changes greedy output
        assert drafted > 0
        rates[name] = accepted / drafted
    assert rates["copy"] > 0.9 and rates["random"] < 0.1, rates
