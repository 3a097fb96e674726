"""Native operators: the fused compose kernel (``compose_*.cpp``), built on first use or by
``python -m torchrec_qr.ops`` (which ``launch/setup.sh`` runs)."""

from torchrec_qr.ops.build import compose_ops_available, load_compose_ops

__all__ = ["compose_ops_available", "load_compose_ops"]
