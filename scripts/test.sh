#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the whole test suite, slow end-to-end tests included.
# GQA_VENV and GQA_CONSTRAINTS choose the environment, as for setup.sh (.ci/run uses them for the lower bounds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${GQA_VENV:-.venv}/bin/python" -m pytest -q "$@"
