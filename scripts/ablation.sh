#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs the main job on the embedded default: the tiny conversion
# ablation (recipes/tiny-ablation.yaml), no download needed. Prints the results table; tables and plots are written
# to runs/tiny-ablation. Extra arguments are recipe overrides, e.g. results_dir=runs/other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gqa-eval ablation recipes/tiny-ablation.yaml "$@"
