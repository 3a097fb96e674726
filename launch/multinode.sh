#!/usr/bin/env bash
# One node of a multi-node run (torchrun, c10d rendezvous). Run it on every node with the same arguments
# except NODE_RANK; node 0 hosts the rendezvous store at HOST:PORT (c10d assigns the ranks).
#
#   launch/multinode.sh NNODES NODE_RANK HOST:PORT [config.yaml] [--resume] [key=value ...]
#
# Environment: NPROC (processes per node; default one per GPU, else 2), MAX_RESTARTS (default 3: a failed
# worker restarts the whole job, which resumes from the latest checkpoint), RDZV_ID (default: the config
# name; must match on all nodes). All nodes must see the same run directory (shared file system), since
# checkpoints are written by every rank. run.name defaults to the config's name, the same on every node.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
NNODES="$1"; NODE_RANK="$2"; ENDPOINT="$3"; shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONFIG=configs/synthetic_qr_mult.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then CONFIG="$1"; shift; fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
  NPROC="${NPROC:-2}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source "$ROOT/launch/cpu_allocator.sh"
IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)

exec "$ROOT/.venv/bin/torchrun" \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="${RDZV_ID:-$(basename "$CONFIG" .yaml)}" \
  --rdzv-conf="is_host=$IS_HOST" --max-restarts="${MAX_RESTARTS:-3}" \
  -m torchrec_qr.train --config "$CONFIG" "$@"
