#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the toolkit installed in editable mode.
# torch is installed first with an exact pin so pip takes the CPU build that lies on disk rather than resolving
# a bare "torch" requirement to a multi-GB CUDA build. Override with GQA_TORCH="torch==X.Y" on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "${GQA_TORCH:-torch==2.13.0}"
.venv/bin/pip install --quiet -e '.[test]'
