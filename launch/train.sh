#!/usr/bin/env bash
# Train on this machine: set up the venv if needed, then torchrun --standalone with one process per GPU,
# or 2 CPU processes (NPROC=<n> to change).
#
#   launch/train.sh [config.yaml] [--resume] [key=value ...]
#
# Default config: configs/synthetic_qr_mult.yaml (the generated Criteo-like set, written once to
# ~/.cache/torchrec_qr). Each invocation starts a fresh run in runs/<config>-<date> unless run.name=... is
# given; --resume without run.name continues the newest run of that config.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"

CONFIG=configs/synthetic_qr_mult.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then CONFIG="$1"; shift; fi
STEM="$(basename "$CONFIG" .yaml)"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
  NPROC="${NPROC:-2}"
fi
CORES="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
source "$ROOT/launch/cpu_allocator.sh"

ARGS=("$@")
if ! printf '%s\n' "$@" | grep -q '^run\.name='; then
  if printf '%s\n' "$@" | grep -qx -- '--resume'; then
    LATEST="$(ls -1dt runs/"$STEM"-* 2>/dev/null | head -n1 || true)"
    [ -n "$LATEST" ] || { echo "error: --resume: no run of $STEM under runs/; pass run.name=<name>" >&2; exit 2; }
    ARGS+=("run.name=$(basename "$LATEST")")
  else
    ARGS+=("run.name=$STEM-$(date +%Y%m%d-%H%M%S)")
  fi
fi

exec "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node="$NPROC" \
  -m torchrec_qr.train --config "$CONFIG" "${ARGS[@]}"
