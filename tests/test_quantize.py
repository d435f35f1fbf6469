"""`distill quantize` for real: llm-compressor in .venv-quant turns a micro student into W8A8, FP8 and
W4A16 compressed-tensors models that transformers and vLLM load; the serving check reads vLLM's kernels."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import MICRO, TINY
from .test_pretrain import TEACHER

pytestmark = pytest.mark.slow
QUANT = [
    "quantize.calibration_samples=16",
    "quantize.calibration_seq_len=64",
    "quantize.schemes=[w8a8,fp8,w4a16]",
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
    from distill.generate import teacher_path

    runs = tmp_path_factory.mktemp("quant")
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={runs}", f"cache_dir={cache_dir}"])
    shutil.copytree(teacher_path(recipe), runs / "tiny" / "student" / "final")
    out = distill("quantize", runs=runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs, out.stdout


def test_each_scheme_is_a_compressed_tensors_model_that_transformers_loads(quantized):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    runs, stdout = quantized
    root = runs / "tiny"
    student = AutoModelForCausalLM.from_pretrained(root / "student" / "final", dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    want = student(ids).logits
    formats = {"w8a8": "int-quantized", "fp8": "float-quantized", "w4a16": "pack-quantized"}
    for scheme in ("w8a8", "fp8", "w4a16"):
        path = root / "quant" / scheme
        config = json.loads((path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == formats[scheme]
        record = json.loads((path / "distill-quant.json").read_text())
        assert record["scheme"] == scheme and record["calibration"]["source"] == "corpus train blocks"
        assert record["calibration"]["sequences"] == 16
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
        )
        got = model(ids).logits
        # quantized, so not equal; but the same model: next-token distributions close
        kl = torch.nn.functional.kl_div(
            got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        assert 0 < kl.item() < (0.05 if scheme != "w4a16" else 0.5), (scheme, kl.item())
    # the linear layers shrink (embeddings and lm_head stay in full precision, as usual)
    size = {
        name: (root / name / "model.safetensors").stat().st_size
        for name in ("student/final", "quant/w8a8", "quant/w4a16")
    }
    assert size["quant/w4a16"] < size["quant/w8a8"] < size["student/final"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["stages"]["quantize"]["outputs"]) == {"w8a8", "fp8", "w4a16"}
    assert "w8a8: " in stdout and "(vLLM can serve it here)" in stdout

    # unchanged student and calibration: reused, not redone
    again = distill("quantize", "--scheme", "w8a8", runs=runs)
    assert (
        again.returncode == 0
        and "w8a8: " in again.stdout
        and "(reused: same student and calibration)" in again.stdout
    )


def test_w8a8_and_fp8_students_serve_in_vllm(quantized):
    """vLLM's server loads both compressed-tensors students and answers a parallel workload in full."""
    runs, _ = quantized
    out = distill(
        "bench serve",
        "serve.bench.setups=[student-w8a8,student-fp8]",
        "serve.bench.requests=24",
        "serve.bench.concurrency=[4]",
        "serve.bench.max_tokens=8",
        runs=runs,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    setups = json.loads((runs / "tiny" / "serve" / "bench.json").read_text())["setups"]
    assert set(setups) == {"student-w8a8", "student-fp8"}
    for scheme, row in setups.items():
        assert row["model"] == str(runs / "tiny" / "quant" / scheme.removeprefix("student-"))
        level = row["levels"]["4"]
        assert level["errors"] == 0 and level["output_tokens"] == 24 * 8 and row["healthy_after"], scheme


def test_the_serving_check_reads_the_kernels_vllm_loads():
    from distill.quantize import serving_problem

    # the AVX2 build (what vLLM loads on AVX2-only CPUs) has no W4A16 kernel; W8A8 and FP8 need none it lacks
    message = serving_problem("w4a16", isa="avx2")
    assert message.startswith(
        "w4a16 cannot be served on this CPU: vLLM's AVX2 kernels (_C_AVX2.abi3.so) have no cpu_gemm_wna16"
    )
    assert serving_problem("w8a8", isa="avx2") is None and serving_problem("fp8", isa="avx2") is None
    assert serving_problem("w4a16", isa="avx512_bf16") is None  # the AVX-512 BF16 build has it
    assert serving_problem(None) is None  # an unquantized model


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
    env["DISTILL_QUANT_PYTHON"] = str(tmp_path / "missing")
    out = distill("quantize", runs=runs, env=env)
    assert out.returncode == 1 and "llm-compressor's environment is missing" in out.stderr
