"""The quantized-kernel probe (distill/vllm/kernels.py): which schemes this machine's vLLM can serve, read
from vLLM's kernel libraries and never executed."""

import json
import subprocess
import sys

import pytest
import torch

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="vLLM's CUDA build has no CPU kernel libraries"
)


@cpu_only
def test_the_serving_check_reads_the_kernels_vllm_loads(monkeypatch):
    """The answer for every CPU build comes from reading its kernel library, never from running it (the
    AVX-512 builds die with SIGILL on AVX2-only CPUs), so it is the same on AVX2 and AVX-512 machines."""
    import ctypes

    import distill.vllm.kernels as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the serving check must not execute a kernel library")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(torch.ops, "load_library", refuse)
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    kernels._library_kernels.cache_clear()

    # the AVX2 build (what vLLM loads on AVX2-only CPUs) has no W4A16 kernel; W8A8 and FP8 need none it lacks
    message = kernels.serving_problem("w4a16", isa="avx2")
    assert message.startswith(
        "w4a16 cannot be served on this CPU: vLLM's AVX2 kernels (_C_AVX2.abi3.so) have no cpu_gemm_wna16"
    )
    assert kernels.serving_problem("w8a8", isa="avx2") is None
    assert kernels.serving_problem("fp8", isa="avx2") is None
    for isa in ("avx512", "avx512_bf16"):  # both AVX-512 builds have both kernels
        assert kernels.serving_problem("w4a16", isa=isa) is None, isa
        assert kernels.serving_problem("w8a8", isa=isa) is None, isa
    assert kernels.serving_problem(None) is None  # an unquantized model

    # this machine: the build its /proc/cpuinfo flags select, so W4A16 serves exactly on AVX-512 CPUs
    isa = kernels.isa_from_flags(kernels.cpu_flags())
    assert kernels.cpu_isa() == isa
    assert (kernels.serving_problem("w4a16") is None) == (isa != "avx2"), isa
    assert kernels.serving_problem("w8a8") is None


def test_the_isa_rule_is_vllms():
    """vLLM loads _C (AVX-512 with BF16), _C_AVX512 (AVX-512 F/VL/BW/DQ) or _C_AVX2 (anything less)."""
    from distill.vllm.kernels import CPU_LIBRARIES, isa_from_flags

    avx2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd"}
    assert isa_from_flags(avx2) == "avx2"
    assert isa_from_flags(avx2 | {"avx512f", "avx512cd", "avx512er", "avx512pf"}) == "avx2"  # no VL/BW/DQ
    assert isa_from_flags(avx512) == "avx512"
    assert isa_from_flags(avx512 | {"avx512_vnni"}) == "avx512"
    assert isa_from_flags(avx512 | {"avx512_bf16", "amx_tile"}) == "avx512_bf16"
    assert isa_from_flags(avx2 | {"avx512_bf16"}) == "avx2"
    assert [CPU_LIBRARIES[isa] for isa in ("avx2", "avx512", "avx512_bf16")] == ["_C_AVX2", "_C_AVX512", "_C"]


@cpu_only
def test_the_kernel_reader_agrees_with_loading_this_cpus_library():
    """The library vLLM loads on this CPU (and only that one: it runs here) is loaded into torch in a fresh
    process: the kernels the ELF reader finds are registered ops, and the schemes' kernels agree."""
    from distill.vllm.kernels import CPU_KERNELS, cpu_isa, cpu_library, library_kernels

    lib = cpu_library(cpu_isa())
    probe = (
        "import json, sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "names = {n.split('::')[1].split('.')[0] for n in torch._C._dispatch_get_all_op_names()"
        " if n.startswith('_C::')}\n"
        "print(json.dumps(sorted(names)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(lib)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    registered = set(json.loads(out.stdout))
    found = library_kernels(lib)
    assert len(found) >= 20 and found <= registered, sorted(found - registered)
    for kernel in filter(None, CPU_KERNELS.values()):
        assert (kernel in found) == (kernel in registered), kernel


@cpu_only
def test_an_unreadable_kernel_library_is_reported_not_run(monkeypatch, tmp_path):
    import distill.vllm.kernels as kernels

    fake = tmp_path / "_C_AVX2.abi3.so"
    fake.write_text("not an ELF file\n")
    monkeypatch.setattr(kernels, "cpu_library", lambda isa: fake)
    assert kernels.serving_problem("w4a16", isa="avx2") == (
        "could not inspect vLLM's CPU kernels (_C_AVX2.abi3.so: ValueError: not a little-endian 64-bit ELF file)"
    )
    assert kernels.serving_problem("fp8", isa="avx2") is None  # needs no kernel of its own


@cpu_only
def test_w8a8_on_the_avx2_build_is_served_with_a_note_that_fp32_is_faster(monkeypatch):
    """vLLM's AVX2 build runs int8 matrix products several times slower than fp32 ones (the profile of
    bench/quant_serving.py), so a W8A8 student served there is slower than its fp32 form: distill says so
    (it is still served). The AVX-512 builds, other schemes and unquantized models get no note."""
    import distill.vllm.kernels as kernels

    note = kernels.serving_note("w8a8", isa="avx2")
    assert note.startswith(
        "w8a8 serves slower than the fp32 student on this CPU: vLLM's AVX2 kernels (_C_AVX2"
    )
    assert note.endswith("serve the fp32 student here, or w8a8 on an AVX-512 CPU or a GPU")
    assert kernels.serving_problem("w8a8", isa="avx2") is None  # a note, not a refusal
    for isa in ("avx512", "avx512_bf16"):
        assert kernels.serving_note("w8a8", isa=isa) is None, isa
    for scheme in ("fp8", "w4a16", None):
        assert kernels.serving_note(scheme, isa="avx2") is None, scheme
    monkeypatch.setattr(kernels, "cpu_isa", lambda: "avx2")
    assert kernels.serving_note("w8a8") == note  # this machine's build, when none is named


def test_w8a8_runs_in_bf16_on_amx_cpus_and_fp32_elsewhere(tmp_path, monkeypatch):
    """vLLM CPU's AMX int8 kernel takes bf16/fp16 activations only (fp32 kills the engine), so a W8A8
    model's engine is bf16 on AMX CPUs; other models, and any model on AVX2/AVX-512 CPUs, stay fp32."""
    from distill.artifacts import QUANT_RECORD
    from distill.vllm import engine

    plain, w8a8, w4a16 = tmp_path / "plain", tmp_path / "w8a8", tmp_path / "w4a16"
    for path in (plain, w8a8, w4a16):
        path.mkdir()
    (w8a8 / QUANT_RECORD).write_text(json.dumps({"scheme": "w8a8"}))
    (w4a16 / QUANT_RECORD).write_text(json.dumps({"scheme": "w4a16"}))
    assert engine.cpu_dtype(w8a8, amx=True) == "bfloat16"
    assert engine.cpu_dtype(w8a8, amx=False) == "float32"
    assert engine.cpu_dtype(plain, amx=True) == engine.cpu_dtype(w4a16, amx=True) == "float32"
    # the engine arguments follow this CPU, and an explicit dtype still wins
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    here = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
    assert engine.engine_kwargs(str(w8a8))["dtype"] == here
    assert engine.engine_kwargs(str(plain))["dtype"] == "float32"
    assert engine.engine_kwargs(str(w8a8), dtype="float16")["dtype"] == "float16"
    assert "dtype" not in engine.engine_kwargs(str(w8a8), gpu=True)


def test_small_cpu_machines_reserve_no_core_for_vllms_scheduler(monkeypatch):
    """vLLM CPU binds the model's threads to all cores but one per worker; on a 2-core machine that is
    half of it, so on at most 4 cores distill asks for none held back, unless the user set it."""
    from distill.vllm import engine

    name = "VLLM_CPU_NUM_OF_RESERVED_CPU"
    monkeypatch.setenv(name, "")  # so that the process's own value comes back afterwards
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    for cores, expected in ((2, "0"), (4, "0"), (16, None)):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(engine.os, "cpu_count", lambda cores=cores: cores)
        engine.engine_kwargs("m")
        assert engine.os.environ.get(name) == expected, cores
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    engine.engine_kwargs("m", gpu=True)  # a GPU machine's arguments: vLLM's own defaults
    assert name not in engine.os.environ
    monkeypatch.setenv(name, "1")
    engine.engine_kwargs("m")
    assert engine.os.environ[name] == "1"  # the user's setting wins
