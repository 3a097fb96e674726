"""Build and load the compose kernel (``compose_*.cpp``, ``torch.ops.torchrec_qr.*``) with torch's C++
extension builder.

The kernel is compiled for this machine (OpenMP, AVX2/FMA where the CPU has them) into torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), once per source and flag set;
concurrent ranks wait on the builder's lock. Without a C++ compiler the modules fall back to the reference
composition (the same function, slower); ``python -m torchrec_qr.ops`` fails with what to install.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

__all__ = ["ENV_SWITCH", "compose_ops_available", "load_compose_ops"]

logger = logging.getLogger(__name__)

SOURCES = sorted(str(p) for p in Path(__file__).parent.glob("compose_*.cpp"))  # with compose_*.h
# "0" turns the fused compose kernel off (the modules then compose with the reference path).
ENV_SWITCH = "TORCHREC_QR_COMPOSE_KERNEL"


def _cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if {"avx512f", "avx512dq"} <= flags:
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq"]
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def load_compose_ops() -> None:
    """Compile (if needed) and load the kernel; raises ``RuntimeError`` naming what is missing."""
    error = _load_error()
    if error is not None:
        raise RuntimeError(error)


@functools.cache
def _load_error() -> str | None:
    """None once the kernel is loaded, else why not. Cached either way: a failed build is not retried by every
    module that asks (and is logged once)."""
    try:
        _load()
    except (RuntimeError, OSError) as e:
        logger.warning("fused compose kernel unavailable, composing with the reference path: %s", e)
        return str(e)
    return None


def _load() -> None:
    if hasattr(torch.ops.torchrec_qr, "compose_forward"):
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"the compose kernel needs a C++ compiler ({compiler!r} not found): install g++ (e.g. "
            "`apt-get install build-essential`) or set CXX; until then the reference composition is used"
        )
    from torch.utils import cpp_extension

    march = _cpu_flags()
    # The builder re-versions on changed sources and flags, not headers: the headers' hash goes into the flags.
    headers = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("compose_*.h")))
    header = hashlib.sha256(headers).hexdigest()[:16]
    cpp_extension.load(
        name="torchrec_qr_compose" + {0: "", 2: "_avx2", 4: "_avx512"}[len(march)],
        sources=SOURCES,
        extra_cflags=["-O3", "-fopenmp", *march, f"-DTORCHREC_QR_HEADER={header}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def compose_ops_available() -> bool:
    """Whether the fused compose kernel is enabled (``TORCHREC_QR_COMPOSE_KERNEL`` is not ``0``) and loads;
    a failed build is logged once and the reference composition is used."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _load_error() is None
