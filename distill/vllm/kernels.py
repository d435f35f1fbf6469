"""Which quantized schemes this machine's vLLM can serve, answered without starting vLLM: on CUDA the
device's compute capability; on CPUs whether the kernel library vLLM loads (picked by the CPU's
instruction sets) has the scheme's kernel, read from the library's ELF symbols and never executed; and
which of them that library serves slower than fp32 (W8A8 on the AVX2 build)."""

from __future__ import annotations

import functools
import re
import struct
from pathlib import Path

from distill.artifacts import QUANT_RECORD, read_json

# vLLM's CPU build: which kernel each scheme's linear layers need, in the kernel library vLLM loads; the
# library of each x86 build (vLLM picks one by the CPU's instruction sets; `native`: not x86, one library)
CPU_KERNELS = {"w8a8": "onednn_scaled_mm", "w4a16": "cpu_gemm_wna16", "fp8": None}
CPU_LIBRARIES = {"avx512_bf16": "_C", "avx512": "_C_AVX512", "avx2": "_C_AVX2", "native": "_C"}
# schemes a CPU build serves, but slower than the fp32 model (measured by bench/quant_serving.py, whose
# profile times the build's int8 and fp32 matrix kernels at the real student's shapes: docs/quantization.md)
SLOWER_THAN_FP32 = {"avx2": ("w8a8",)}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU (the first processor's `flags` line)."""
    with open(cpuinfo) as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    return frozenset()


def isa_from_flags(flags: set[str] | frozenset[str]) -> str:
    """The kernel build vLLM loads on an x86 CPU with these /proc/cpuinfo flags: its rule (vllm/platforms/
    cpu.py, `import_kernels`) is torch's `_is_avx512_supported` (AVX-512 F, VL, BW and DQ) and then
    `_is_avx512_bf16_supported`, else the AVX2 build."""
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= set(flags):
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2"


def cpu_isa() -> str:
    """The kernel build vLLM's CPU platform loads here: its own choice, from torch's CPU checks (which
    read CPUID; they agree with `isa_from_flags(cpu_flags())`, tested). Not x86: vLLM loads `_C`."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "native"
    if torch.cpu._is_avx512_supported():
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2"


def cpu_library(isa: str) -> Path:
    """vLLM's kernel library for `isa` (one of CPU_LIBRARIES)."""
    import importlib.util

    return Path(importlib.util.find_spec("vllm").origin).parent / f"{CPU_LIBRARIES[isa]}.abi3.so"


def _elf_sections(fh) -> list[tuple[str, int, int, int, int]]:
    """[(name, type, offset, size, link)] of a little-endian ELF64 file's sections, from its headers."""
    ident = _read(fh, 0, 64)
    if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise ValueError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", ident, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
    table = _read(fh, shoff, shentsize * shnum)
    headers = [struct.unpack_from("<IIQQQQII", table, i * shentsize) for i in range(shnum)]
    names = _read(fh, headers[shstrndx][4], headers[shstrndx][5])
    return [
        (_cstring(names, name), kind, offset, size, link)
        for name, kind, _flags, _addr, offset, size, link, _info in headers
    ]


def _read(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def _cstring(table: bytes, start: int) -> str:
    return table[start : table.index(b"\0", start)].decode(errors="replace")


def library_kernels(lib: Path) -> frozenset[str]:
    """The torch ops a kernel library registers (`torch.ops._C.<name>` once vLLM loads it), read from the
    file and never executed (it may be built for an instruction set this CPU lacks: loading it dies
    with SIGILL): the functions it exports (`.dynsym`; C++ names reduced to the identifier,
    `_Z14cpu_gemm_wna16R...` -> `cpu_gemm_wna16`) whose op schema (`cpu_gemm_wna16(Tensor input, ...`,
    the string it hands torch's registration) is in its read-only data. An op whose implementation has
    another name is missed (a false "absent", never a false "present"); tests check the schemes' kernels
    against a real load of the library this CPU runs."""
    stat = Path(lib).stat()
    return _library_kernels(str(lib), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _library_kernels(lib: str, size: int, mtime_ns: int) -> frozenset[str]:
    with open(lib, "rb") as fh:
        sections = _elf_sections(fh)
        dynsym = next(s for s in sections if s[1] == 11)  # SHT_DYNSYM
        symbols = _read(fh, dynsym[2], dynsym[3])
        strings = _read(fh, sections[dynsym[4]][2], sections[dynsym[4]][3])
        rodata = b"".join(_read(fh, s[2], s[3]) for s in sections if s[0].startswith(".rodata"))
    functions = set()
    for i in range(0, len(symbols) - 23, 24):  # Elf64_Sym: name, info, other, section, value, size
        name, info, _other, section, _value, _size = struct.unpack_from("<IBBHQQ", symbols, i)
        if section == 0 or info & 0xF != 2:  # undefined, or not a function
            continue
        symbol = _cstring(strings, name)
        match = re.match(r"_Z(\d+)", symbol)
        functions.add(symbol[match.end() : match.end() + int(match[1])] if match else symbol)
    schemas = {m.decode() for m in re.findall(rb"\0([A-Za-z_]\w*)\(", rodata)}
    return frozenset(functions & schemas)


def scheme_of(model_dir: Path) -> str | None:
    """w8a8 / w4a16 / fp8 for a compressed-tensors directory distill wrote, None for a plain model."""
    record = Path(model_dir) / QUANT_RECORD
    return read_json(record)["scheme"] if record.exists() else None


def serving_problem(scheme: str | None, isa: str | None = None) -> str | None:
    """Why this machine's vLLM cannot serve `scheme`, or None if it can. On CPUs the question is whether
    the kernel library vLLM loads has the scheme's kernel (vLLM would start and fail at the first
    request otherwise); it is answered by reading that library's ELF symbols and op schemas, never by
    loading it. `isa` picks another CPU build's library (what an AVX2 or an AVX-512 machine would do),
    which is safe on any CPU for the same reason."""
    from distill.vllm.engine import has_cuda

    if scheme is None:
        return None
    if has_cuda():
        import torch

        major, minor = torch.cuda.get_device_capability()
        need = {"w8a8": (7, 5), "w4a16": (8, 0), "fp8": (8, 0)}[scheme]
        if (major, minor) < need:
            return f"{scheme} needs CUDA compute capability {need[0]}.{need[1]}; this GPU has {major}.{minor}"
        return None
    isa = isa or cpu_isa()
    kernel = CPU_KERNELS[scheme]
    if kernel is None:
        return None
    lib = cpu_library(isa)
    try:
        kernels = library_kernels(lib)
    except (OSError, ValueError, IndexError, StopIteration, struct.error) as e:
        return f"could not inspect vLLM's CPU kernels ({lib.name}: {type(e).__name__}: {e})"
    if kernel in kernels:
        return None
    return (
        f"{scheme} cannot be served on this CPU: vLLM's {isa.upper()} kernels ({lib.name}) have no "
        f"{kernel}, so a server would start and fail at its first request; serve another scheme "
        f"(w8a8 or fp8), the unquantized student, or use a GPU (or an AVX-512 CPU) for {scheme}"
    )


def serving_note(scheme: str | None, isa: str | None = None) -> str | None:
    """Why `scheme` is a poor choice on this machine although its vLLM serves it, or None. On vLLM's AVX2
    CPU build the int8 matrix kernel W8A8 runs on is several times slower than the fp32 one, so a W8A8
    student serves slower than its fp32 form there (it pays off on AVX-512 CPUs and GPUs)."""
    from distill.vllm.engine import has_cuda

    if scheme is None or has_cuda():
        return None
    isa = isa or cpu_isa()
    if scheme not in SLOWER_THAN_FP32.get(isa, ()):
        return None
    return (
        f"{scheme} serves slower than the fp32 student on this CPU: vLLM's {isa.upper()} kernels "
        f"({cpu_library(isa).name}) run int8 matrix products slower than fp32 ones (measured: "
        f"docs/quantization.md, speed on CPU); serve the fp32 student here, or {scheme} on an AVX-512 CPU "
        "or a GPU"
    )
