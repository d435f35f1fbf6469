"""The environment `make setup` builds: what ENVIRONMENT.md says breaks by default must work here."""

import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def test_vllm_reports_its_version():
    version = metadata.version("vllm")
    assert version.startswith("0.32.0")
    if not _cuda():
        assert version.endswith("+cpu")  # the suffix vLLM uses to pick its CPU platform


def test_torchvision_is_absent_or_imports():
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError):
            import torchvision  # noqa: F401
    else:
        subprocess.run([sys.executable, "-c", "import torchvision"], check=True)


def test_stage_engines_are_installed():
    for name in ("lm-eval", "accelerate", "deepspeed", "peft", "datasets", "wandb", "vllm", "torch"):
        assert metadata.version(name)


@pytest.mark.slow  # imports all of vLLM's CLI (about 25 s); every served test runs `vllm serve`
def test_vllm_serve_command_works():
    out = subprocess.run(
        [str(VENV_BIN / "vllm"), "serve", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: vllm serve" in out.stdout


def test_quant_environment_has_llmcompressor_apart_from_vllm():
    quant_python = ROOT / ".venv-quant" / "bin" / "python"
    assert quant_python.exists(), "make setup creates .venv-quant"
    code = (
        "import importlib.metadata as m, importlib.util as u;"
        "print(m.version('llmcompressor'), u.find_spec('vllm') is None)"
    )
    out = subprocess.run([str(quant_python), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.14.0.1", "True"]


def test_setup_is_idempotent_and_fast_when_up_to_date():
    out = subprocess.run(
        ["bash", "packaging/setup.sh", "all"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert ".venv is up to date" in out.stdout and ".venv-quant is up to date" in out.stdout


def test_pins_cover_what_is_installed():
    """Two fresh setups resolve the same versions: every installed distribution is pinned."""
    if _cuda():
        pytest.skip("the pins are for machines without CUDA")
    pins = {}
    for line in (ROOT / "packaging" / "constraints-cpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    # what is installed in this environment's site-packages: setuptools, once imported (torch's extension
    # builder, DeepSpeed), puts its own vendored distributions on sys.path too, and those are not installed
    import sysconfig

    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(path=site):
        name = _norm(dist.metadata["Name"])
        if name in {"distill", "vllm", "pip", "setuptools", "wheel"}:
            continue
        assert pins.get(name) == dist.version, f"{name} {dist.version} is not pinned in constraints-cpu.txt"


KERNELS_IN_USE = """
import json
from vllm.platforms import current_platform

current_platform.import_kernels()  # vLLM's own choice of kernel library, as a server makes it
with open("/proc/self/maps") as fh:
    print(json.dumps(sorted({line.split()[-1] for line in fh if "/vllm/_C" in line})))
"""


def test_cpu_isa_and_the_vllm_kernels_in_use(record_property, capsys):
    """Which machine this ran on: the CPU's instruction sets (from /proc/cpuinfo) and the vLLM CPU kernel
    build they select, printed into the test log and recorded as properties (junit XML). The build
    predicted from the flags is torch's CPUID answer too, and the library vLLM itself then loads."""
    from distill.vllm.kernels import cpu_flags, cpu_isa, cpu_library, isa_from_flags

    if platform.machine() != "x86_64":
        pytest.skip("vLLM's kernel builds per instruction set are x86-64 only")
    flags = cpu_flags()
    isa_flags = sorted(f for f in flags if re.fullmatch(r"sse4_2|avx\w*|fma|f16c|amx\w*", f))
    predicted = isa_from_flags(flags)
    names = re.findall(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    model = names[0] if names else "unknown CPU"
    lib = cpu_library(predicted).name if not _cuda() else "CUDA build"
    line = f"CPU: {model}; ISA flags: {' '.join(isa_flags)}; vLLM CPU kernels: {predicted} ({lib})"
    record_property("cpu_isa_flags", " ".join(isa_flags))
    record_property("vllm_cpu_kernels", predicted)
    print(line)
    with capsys.disabled():  # visible in `pytest -q` output without -s
        print(f"\n[environment] {line}")
    assert "avx2" in flags and "fma" in flags  # the least vLLM's x86 CPU build needs
    assert cpu_isa() == predicted, (cpu_isa(), predicted)  # torch (CPUID) and the kernel's flags agree
    if _cuda():
        return
    out = subprocess.run([sys.executable, "-c", KERNELS_IN_USE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [Path(p).name for p in json.loads(out.stdout.splitlines()[-1])] == [lib]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _cuda() -> bool:
    return os.path.exists("/dev/nvidia0")
