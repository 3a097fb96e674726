"""``python -m torchrec_qr.ops``: build the native kernel now (``launch/setup.sh`` runs this)."""

import sys

from torchrec_qr.ops.build import load_compose_ops

try:
    load_compose_ops()
except (RuntimeError, OSError) as e:
    sys.exit(f"torchrec_qr: could not build the compose kernel: {e}")
print("torchrec_qr: compose kernel built and loaded")
