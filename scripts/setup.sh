#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment with the toolkit installed in editable mode, every dependency at
# the exact version in a constraints file, so a new upstream release cannot change what runs here.
# torch is installed first with an exact pin so pip takes the CPU build that lies on disk rather than resolving
# a bare "torch" requirement to a multi-GB CUDA build. Override with GQA_TORCH="torch==X.Y" on a GPU machine.
#   GQA_VENV          the environment's folder [.venv]
#   GQA_CONSTRAINTS   the pinned versions [constraints/newest.txt: the newest releases tested; constraints/oldest.txt
#                     holds the declared lower bounds]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GQA_VENV:-.venv}
CONSTRAINTS=${GQA_CONSTRAINTS:-constraints/newest.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install --quiet "${GQA_TORCH:-torch==2.13.0}"
"$VENV/bin/pip" install --quiet --constraint "$CONSTRAINTS" -e '.[test,tasks]'
