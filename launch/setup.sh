#!/usr/bin/env bash
# Idempotent set-up: a .venv with the torch / fbgemm / torchrec triple that loads together, then this
# project in editable mode with its test extras. Safe to run again; does nothing when already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.torchrec_qr-setup-v1"
PY="${PYTHON:-python3}"

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

"${PIP[@]}" --upgrade pip wheel setuptools
# torch 2.13.0: on these machines the CPU wheel is found locally; elsewhere the registry's build.
"${PIP[@]}" "torch==2.13.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" "fbgemm-gpu==1.8.0"
else
  "${PIP[@]}" "fbgemm-gpu-cpu==1.8.0"
fi
# torchrec 1.8.0 pins the CUDA fbgemm-gpu wheel: install it without deps, then its real dependencies.
"${PIP[@]}" --no-deps "torchrec==1.8.0"
"${PIP[@]}" tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
"${PIP[@]}" -e "$ROOT[test]"

"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401  (fails loudly if the triple does not load together)
PY
# The native compose kernel (C++/OpenMP): fails here, saying what to install, when no compiler is found.
"$VENV/bin/python" -m torchrec_qr.ops
touch "$STAMP"
