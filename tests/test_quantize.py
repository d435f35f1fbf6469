"""`distill quantize` for real: llm-compressor in .venv-quant turns a micro student into W8A8, FP8 and
W4A16 compressed-tensors models that transformers and vLLM load (the serving check: test_kernels.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distill.run import RunDir

from .conftest import MICRO, TEACHER, TINY, teacher_of

QUANT = [
    "quantize.calibration_samples=16",
    "quantize.calibration_seq_len=64",
    "quantize.schemes=[w8a8,fp8,w4a16]",
    "quantize.lm_head=[w8a8]",  # W8A8 quantizes the output layer too; the others leave it in fp32
]


def distill(*args, runs, env=None):
    cmd = [
        sys.executable,
        "-m",
        "distill",
        *args[0].split(),  # "quantize", "bench serve"
        str(TINY),
        *MICRO,
        *TEACHER,
        f"runs_dir={runs}",
        *QUANT,
        *args[1:],
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def quantized(cache_dir, tmp_path_factory):
    """A run whose student is the (trained) micro teacher, quantized with all three schemes."""
    from distill.config import load_recipe

    runs = tmp_path_factory.mktemp("quant")
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={runs}", f"cache_dir={cache_dir}"])
    shutil.copytree(teacher_of(recipe), runs / "tiny" / "student" / "final")
    out = distill("quantize", runs=runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs, out.stdout


# what each scheme stores for a quantized linear layer, and how far its weights may be from the student's
# (relative Frobenius error; measured: w8a8 0.7-0.9%, fp8 2.5-2.6%, w4a16 11-15%)
STORED = {
    "w8a8": ("weight", torch.int8),
    "fp8": ("weight", torch.float8_e4m3fn),
    "w4a16": ("weight_packed", torch.int32),
}
WEIGHT_ERROR = {"w8a8": (1e-3, 0.03), "fp8": (5e-3, 0.1), "w4a16": (0.03, 0.4)}
KL_BOUND = {"w8a8": 0.05, "fp8": 0.05, "w4a16": 0.5}
IDS = [1, 50, 60, 70, 80, 90, 100, 110]
# SmoothQuant (w8a8) moves a per-channel factor from each RMSNorm into the linear layers it feeds: the
# product weight * norm is what the model computes, and the quantization error is measured on it
FED_BY = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


def effective_weight(state: dict, name: str) -> torch.Tensor:
    """`name` (a `*_proj.weight`) times the norm weight that scales its input, if any."""
    layer, _, linear = name.removesuffix(".weight").partition(".layers.")[2].partition(".")
    norm = FED_BY.get(linear)
    weight = state[name].float()
    return weight * state[f"model.layers.{layer}.{norm}.weight"] if norm else weight


def logprobs(model, dtype=torch.float32) -> torch.Tensor:
    """Next-token log-probabilities at each position of IDS, computed in `dtype`, returned in float64
    (float32 rounding of a KL of 1e-7 over 4096 words is larger than the KL itself)."""
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].to(dtype).double().log_softmax(-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) for log-probability rows, in float64."""
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.slow
def test_each_scheme_is_a_compressed_tensors_model_that_transformers_loads(quantized):
    """Each scheme stores quantized linear weights with their scales; transformers loads them dequantized
    into plain float linear layers (weights only: it runs no activation quantization, so W8A8 is weight-
    only there); those weights, and so the outputs, differ from the student's by quantization error,
    far above float32 rounding and far below a different model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    runs, stdout = quantized
    root = runs / "tiny"
    student = AutoModelForCausalLM.from_pretrained(root / "student" / "final", dtype=torch.float32)
    original = load_file(root / "student" / "final" / "model.safetensors")
    want = logprobs(student)
    floor = (want - logprobs(student.double(), torch.float64)).abs().max().item()  # float32 rounding
    assert floor < 1e-4, floor
    formats = {"w8a8": "int-quantized", "fp8": "float-quantized", "w4a16": "pack-quantized"}
    projections = sorted(name for name in original if name.endswith("_proj.weight"))
    assert len(projections) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for scheme in ("w8a8", "fp8", "w4a16"):
        path = root / "quant" / scheme
        config = json.loads((path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == formats[scheme]
        head = scheme == "w8a8"  # quantize.lm_head
        assert config["ignore"] == ([] if head else ["lm_head"])
        record = json.loads((path / "distill-quant.json").read_text())
        assert record["scheme"] == scheme and record["calibration"]["source"] == "corpus train blocks"
        assert record["lm_head"] is head
        assert record["calibration"]["sequences"] == 16
        (group,) = config["config_groups"].values()
        # vLLM matches its output layer (ParallelLMHead) by name, not by the class name "Linear"
        assert group["targets"] == (["Linear", "re:.*lm_head$"] if head else ["Linear"])
        if scheme == "w8a8":  # what vLLM applies: int8 per-channel weights, int8 per-token activations
            assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
            assert group["input_activations"]["num_bits"] == 8 and group["input_activations"]["type"] == "int"
            assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"

        # stored: every linear layer quantized (the output layer too under W8A8 here), with a float32
        # scale; the embeddings (and elsewhere the output layer) in full precision
        stored = load_file(path / "model.safetensors")
        field, dtype = STORED[scheme]
        linears = [*projections, "lm_head.weight"] if head else projections
        for name in linears:
            prefix = name.removesuffix(".weight")
            assert stored[f"{prefix}.{field}"].dtype == dtype, (scheme, name)
            scale = stored[f"{prefix}.weight_scale"]
            assert scale.dtype == torch.float32 and scale.shape[0] == original[name].shape[0], (scheme, name)
            assert (scale > 0).all(), (scheme, name)
        if scheme == "w8a8":
            # a real 8-bit grid (measured: 255-256 levels used, largest |q| 127), not a few values
            for name in linears:
                q = stored[name]
                assert q.unique().numel() > 200 and q.abs().max() >= 120, (name, q.unique().numel())
        for name in ["model.embed_tokens.weight"] + ([] if head else ["lm_head.weight"]):
            assert stored[name].dtype == torch.float32 and torch.equal(stored[name], original[name])

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        loaded = model.state_dict()
        for name in linears:
            module = model.get_submodule(name.removesuffix(".weight"))
            assert type(module) is torch.nn.Linear and not module._forward_pre_hooks, (scheme, name)
            if scheme != "w4a16":  # the loaded weight is exactly the stored one times its scale
                prefix = name.removesuffix(".weight")
                exact = stored[name].float() * stored[f"{prefix}.weight_scale"]
                assert torch.equal(loaded[name], exact), (scheme, name)
            want_w, got_w = effective_weight(original, name), effective_weight(loaded, name)
            error = ((got_w - want_w).norm() / want_w.norm()).item()
            low, high = WEIGHT_ERROR[scheme]
            assert low < error < high, (scheme, name, error)

        # outputs: changed by the quantization (>> float32 rounding) yet the same model (small KL)
        got = logprobs(model)
        change, divergence = (got - want).abs().max().item(), kl(want, got)
        assert change > 100 * floor, (scheme, change, floor)
        assert 0 < divergence < KL_BOUND[scheme], (scheme, divergence)

    # the linear layers shrink; fp8 and w8a8 store 8 bits per decoder weight, and w8a8's output layer in
    # 8 bits too makes it the smaller (embeddings stay in full precision, as usual)
    size = {
        name: (root / name / "model.safetensors").stat().st_size
        for name in ("student/final", "quant/w8a8", "quant/fp8", "quant/w4a16")
    }
    assert size["quant/w8a8"] < size["quant/fp8"] < size["student/final"]
    assert size["quant/w4a16"] < size["student/final"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["stages"]["quantize"]["outputs"]) == {"w8a8", "fp8", "w4a16"}
    # which schemes this machine's vLLM serves, and, on the AVX2 build, that W8A8 serves slower than fp32
    from distill.vllm.kernels import cpu_isa

    w8a8 = next(line for line in stdout.splitlines() if line.startswith("w8a8: "))
    if cpu_isa() == "avx2":
        assert w8a8.endswith(
            "(vLLM can serve it here; note: w8a8 serves slower than the fp32 student on this CPU: vLLM's AVX2 "
            "kernels (_C_AVX2.abi3.so) run int8 matrix products slower than fp32 ones (measured: "
            "docs/quantization.md, speed on CPU); serve the fp32 student here, or w8a8 on an AVX-512 CPU or a GPU)"
        ), w8a8
    else:
        assert w8a8.endswith("(vLLM can serve it here)"), w8a8

    # unchanged student and calibration: reused, not redone
    again = distill("quantize", "--scheme", "w8a8", runs=runs)
    assert (
        again.returncode == 0
        and "w8a8: " in again.stdout
        and "(reused: same student and calibration)" in again.stdout
    )


@pytest.fixture(scope="module")
def w8a8_server(quantized, cache_dir):
    """The W8A8 student behind `vllm serve` with the engine arguments `distill bench serve` gives its
    student-w8a8 setup: scored here, then benched as that setup (serve.bench.servers)."""
    from distill.config import load_recipe
    from distill.vllm.engine import serving_engine_args
    from distill.vllm.server import VllmServer

    runs, _ = quantized
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={runs}", f"cache_dir={cache_dir}"])
    args = serving_engine_args(recipe, "student", runs / "tiny" / "quant" / "w8a8")
    with VllmServer(args, runs / "w8a8-server.log", served_name="student") as server:
        yield server


def prompt_logprobs(url: str, ids: list[int], k: int) -> list[dict[int, float]]:
    """The server's top-k (plus actual-token) log-probabilities at each position after the first."""
    import urllib.request

    body = {"model": "student", "prompt": ids, "max_tokens": 1, "prompt_logprobs": k}
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        (choice,) = json.loads(resp.read())["choices"]
    return [{int(t): v["logprob"] for t, v in entry.items()} for entry in choice["prompt_logprobs"][1:]]


@pytest.mark.slow
def test_vllm_runs_w8a8_with_int8_weights_and_activations(quantized, w8a8_server):
    """vLLM's W8A8 (int8 GEMM on per-token int8 activations; the output layer quantized too, as
    `quantize.lm_head` asks, which vLLM loads only because it is named) gives next-token log-probabilities that
    differ from the float student's and also from transformers' weight-only dequantized model (so vLLM
    quantizes the activations too), while staying close to both. On AVX2 CPUs without VNNI the int8
    GEMM's pairwise int16 sums saturate (measured 0.0175 largest log-probability change against 0.003
    weight-only, KL 6e-6): the bounds hold there and where the arithmetic is exact."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    runs, _ = quantized
    root = runs / "tiny"
    path = root / "quant" / "w8a8"
    rows = prompt_logprobs(w8a8_server.url, IDS, 20)
    assert len(rows) == len(IDS) - 1 and all(len(row) >= 20 for row in rows)
    student = AutoModelForCausalLM.from_pretrained(root / "student" / "final", dtype=torch.float32)
    weights_only = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    want, dequantized = logprobs(student)[:-1], logprobs(weights_only)[:-1]
    floor = (want - logprobs(student.double(), torch.float64)[:-1]).abs().max().item()
    tokens = [torch.tensor(list(row)) for row in rows]
    got = [torch.tensor(list(row.values()), dtype=torch.float64) for row in rows]

    def change(reference: torch.Tensor) -> float:
        return max(
            (g - reference[i, t]).abs().max().item() for i, (t, g) in enumerate(zip(tokens, got, strict=True))
        )

    assert 100 * floor < change(want) < 0.5, (change(want), floor)
    assert 100 * floor < change(dequantized) < 0.5, (change(dequantized), floor)


@pytest.mark.slow
def test_w8a8_and_fp8_students_serve_in_vllm(quantized, w8a8_server):
    """vLLM's server loads both compressed-tensors students and answers a parallel workload in full (the
    W8A8 one is the server the test above scored on, benched as its setup; bench starts the FP8 one)."""
    runs, _ = quantized
    out = distill(
        "bench serve",
        "serve.bench.setups=[student-w8a8,student-fp8]",
        "serve.bench.requests=24",
        "serve.bench.concurrency=[4]",
        "serve.bench.max_tokens=8",
        f"serve.bench.servers.student-w8a8={w8a8_server.url}",
        runs=runs,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "bench: student-w8a8: the running server at " in out.stdout
    setups = json.loads((runs / "tiny" / "serve" / "bench.json").read_text())["setups"]
    assert set(setups) == {"student-w8a8", "student-fp8"}
    for scheme, row in setups.items():
        assert row["model"] == str(runs / "tiny" / "quant" / scheme.removeprefix("student-"))
        level = row["levels"]["4"]
        assert level["errors"] == 0 and level["output_tokens"] == 24 * 8 and row["healthy_after"], scheme


@pytest.mark.slow
def test_serving_the_w8a8_student_says_so_where_fp32_is_faster(quantized):
    """`distill serve --quant w8a8` notes, before it starts vLLM, when this CPU's vLLM build serves W8A8
    slower than fp32 (the AVX2 build); here the port is taken, so it stops right after with one line."""
    import socket

    from distill.vllm.kernels import cpu_isa, serving_note

    runs, _ = quantized
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = distill("serve --student --quant w8a8", f"serve.port={port}", runs=runs)
    assert out.returncode == 1 and out.stderr.startswith(
        f"distill: error: port {port} on 127.0.0.1 is in use"
    )
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: ")]
    assert notes == ([f"note: {serving_note('w8a8')}"] if cpu_isa() == "avx2" else [])


@pytest.mark.slow
def test_a_failed_quantization_leaves_nothing_half_written(quantized, tmp_path):
    runs, _ = quantized
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'RuntimeError: calibration blew up' >&2\nexit 7\n")
    fake.chmod(0o755)
    shutil.rmtree(runs / "tiny" / "quant" / "fp8")
    env = {**os.environ, "DISTILL_QUANT_PYTHON": str(fake)}
    out = distill("quantize", "--scheme", "fp8", runs=runs, env=env)
    assert out.returncode == 1
    assert (
        "distill: error: quantize: fp8: llm-compressor exited with status 7: RuntimeError: calibration blew up"
        in out.stderr
    )
    assert not (runs / "tiny" / "quant" / "fp8").exists()
    assert (runs / "tiny" / "quant" / "w8a8" / "config.json").exists()  # earlier results intact
    # what the failed (or a killed) quantization left is never a student, and the next run removes it
    (runs / "tiny" / "quant" / ".w4a16.tmp-4194304").mkdir()  # a killed writer's (no such pid)
    (runs / "tiny" / "quant" / ".w4a16.tmp-4194304" / "config.json").write_text("{}")
    left = sorted(p.name for p in (runs / "tiny" / "quant").iterdir() if ".tmp-" in p.name)
    assert len(left) == 2 and ".fp8.tmp-" in left[0]  # the failed fp8 output, and the planted one
    assert [p.name for p in RunDir(runs / "tiny").quantized_students()] == ["w4a16", "w8a8"]
    out = distill("quantize", "--scheme", "w8a8", runs=runs)
    assert out.returncode == 0 and "(reused: same student and calibration)" in out.stdout, out.stderr
    assert not [p for p in (runs / "tiny" / "quant").iterdir() if ".tmp-" in p.name]
    env["DISTILL_QUANT_PYTHON"] = str(tmp_path / "missing")
    out = distill("quantize", runs=runs, env=env)
    assert out.returncode == 1 and "llm-compressor's environment is missing" in out.stderr


@pytest.mark.slow
def test_quantize_lm_head_also_quantizes_a_tied_output_layer_and_keeps_the_input_embedding(
    quantized, tmp_path
):
    """`quantize.lm_head: [w8a8]`: the output layer is quantized like the other linear layers (int8 weight with
    its per-row scale under W8A8), a tied input embedding is untied and stays the student's, and the model
    still computes nearly the student's distribution. Changing the option redoes the output."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    runs, _ = quantized
    final = tmp_path / "tiny" / "student" / "final"
    student = AutoModelForCausalLM.from_pretrained(runs / "tiny" / "student" / "final", dtype=torch.float32)
    student.config.tie_word_embeddings = True  # as SmolLM2's: one matrix for input and output
    student.lm_head.weight = student.model.embed_tokens.weight
    student.save_pretrained(final)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (runs / "tiny" / "student" / "final" / name).exists():
            shutil.copy(runs / "tiny" / "student" / "final" / name, final / name)
    embedding = student.model.embed_tokens.weight.detach().clone()

    out = distill("quantize", "--scheme", "w8a8", runs=tmp_path)  # QUANT: quantize.lm_head=[w8a8]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = tmp_path / "tiny" / "quant" / "w8a8"
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" not in config["quantization_config"]["ignore"]
    assert json.loads((path / "distill-quant.json").read_text())["lm_head"] is True
    stored = load_file(path / "model.safetensors")
    head, scale = stored["lm_head.weight"], stored["lm_head.weight_scale"]
    assert head.dtype == torch.int8 and head.shape == embedding.shape and head.unique().numel() > 200
    assert scale.dtype == torch.float32 and scale.shape == (embedding.shape[0], 1)
    assert torch.equal(stored["model.embed_tokens.weight"], embedding)  # untied, full precision
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert torch.equal(model.lm_head.weight, head.float() * scale)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    error = ((model.lm_head.weight - embedding).norm() / embedding.norm()).item()
    assert 1e-3 < error < 0.03, error
    assert 0 < kl(logprobs(student), logprobs(model)) < KL_BOUND["w8a8"]

    again = distill("quantize", "--scheme", "w8a8", "quantize.lm_head=[]", runs=tmp_path)  # redone
    assert again.returncode == 0 and "(reused" not in again.stdout, again.stdout
    stored = load_file(path / "model.safetensors")
    assert "lm_head.weight_scale" not in stored and torch.equal(
        stored["model.embed_tokens.weight"], embedding
    )
    assert all(t.dtype == torch.float32 for n, t in stored.items() if n.startswith("lm_head"))
