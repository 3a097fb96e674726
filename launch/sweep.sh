#!/usr/bin/env bash
# The embedding-method comparison: set up the venv if needed, then run the default experiment grid
# (full / hashing / QR mult, add, concat, path / mixed radix / Chinese remainder / thresholds, 3 seeds) through
# the training app and write docs/results/results_default.{csv,md} and pareto_default.png.
#
#   launch/sweep.sh [--quick] [--seeds N] [--data criteo --criteo-dir D] [--nproc N] [key=value ...]
#
# Finished runs under runs/experiments/<grid>/ are reused, so an interrupted sweep continues where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" "$ROOT/experiments/grid.py" "$@"
