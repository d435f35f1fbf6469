#!/usr/bin/env bash
# Creates .venv-bench, the environment of the peer that bench/train_step.py measures distill against:
# TRL (its GKDTrainer) on the same torch, transformers, accelerate, datasets and safetensors as .venv.
# TRL stays out of .venv on purpose: distill must never import it, and its own pins must not move ours.
# Idempotent like packaging/setup.sh: a stamp holds the hash of the pins and of this script, so a second
# run with nothing changed returns at once. It never touches .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv-bench
# NOTE: TRL 1.16.0 declares transformers>=4.56.2 and runs on our transformers 5.19.0 (bench/train_step.py
# trains with it). Its GKDTrainer now lives in trl.experimental.gkd; the promoted DistillationTrainer is
# on-policy only (it always samples completions), so GKD with lmbda=0 is the off-policy peer of `distill train`.
TRL_VERSION=1.16.0

stamp="trl-$TRL_VERSION-$(cat packaging/constraints-cpu.txt packaging/setup-bench.sh | sha256sum | cut -c1-16)"
if [ -f "$VENV/.distill-stamp" ] && [ "$(cat "$VENV/.distill-stamp")" = "$stamp" ]; then
    echo "setup-bench: $VENV is up to date (trl $TRL_VERSION)"
    exit 0
fi
echo "setup-bench: building $VENV (trl $TRL_VERSION); takes a minute or two on a fresh machine"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
# The constraints hold torch==2.13.0+cpu (pip takes it from the machine's local wheels), transformers,
# accelerate, datasets, safetensors and every shared dependency at the versions .venv runs.
"$VENV/bin/python" -m pip install --quiet -c packaging/constraints-cpu.txt \
    torch transformers accelerate datasets safetensors "trl==$TRL_VERSION"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import importlib.util

print("setup-bench:", ", ".join(f"{p} {m.version(p)}" for p in ("trl", "transformers", "torch", "accelerate")))
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # noqa: F401  (must import cleanly beside the CPU torch if present at all)
from trl.experimental.gkd import GKDTrainer  # noqa: F401
PY
echo "$stamp" > "$VENV/.distill-stamp"
