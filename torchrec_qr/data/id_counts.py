"""How often each id of each categorical feature occurs in a split: one pass, cached beside the data cache.

Frequency-aware tables (``HotIds``) keep the most frequent training ids in rows of their own; choosing them
needs every id's count on the training split. Counting is one ``bincount`` per feature over the memory-mapped
``[rows, 26]`` id array, in chunks; the result is cached as ``id_counts.<key>.npz`` in the data cache
directory, keyed by the table sizes, the row count and a fingerprint of the ids, so a changed split is
counted again. Writes are atomic (temporary file, then rename), so ranks that count at the same time all
end with the same complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["cached_id_counts", "count_ids"]

logger = logging.getLogger(__name__)

_VERSION = 1
_CHUNK_ROWS = 1 << 20


def count_ids(sparse: np.ndarray, num_embeddings: Sequence[int]) -> list[np.ndarray]:
    """``counts[f][i]``: how many rows have id ``i`` in feature (column) ``f``; int64, length ``num_embeddings[f]``.

    Raises ``ValueError`` naming the feature if an id falls outside ``[0, num_embeddings[f])``.
    """
    if sparse.ndim != 2 or sparse.shape[1] != len(num_embeddings):
        raise ValueError(f"expected ids of shape [rows, {len(num_embeddings)}], got {sparse.shape}")
    counts = [np.zeros(n, dtype=np.int64) for n in num_embeddings]
    for start in range(0, len(sparse), _CHUNK_ROWS):
        chunk = np.asarray(sparse[start : start + _CHUNK_ROWS])
        for f, n in enumerate(num_embeddings):
            ids = chunk[:, f]
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"feature {f}: ids must be in [0, {n}), found {int(ids.min())}..{int(ids.max())}")
            counts[f] += np.bincount(ids, minlength=n)
    return counts


def _fingerprint(sparse: np.ndarray, num_embeddings: Sequence[int]) -> str:
    """Sizes, row count and ~8k rows spread over the split (reading them all would cost a count)."""
    h = hashlib.sha1(json.dumps({"v": _VERSION, "rows": len(sparse), "n": [int(n) for n in num_embeddings]}).encode())
    h.update(np.ascontiguousarray(sparse[:: max(1, len(sparse) // 4096)]).tobytes())
    h.update(np.ascontiguousarray(sparse[-4096:]).tobytes())
    return h.hexdigest()[:12]


def cached_id_counts(
    sparse: np.ndarray, num_embeddings: Sequence[int], cache_dir: str | os.PathLike
) -> list[np.ndarray]:
    """``count_ids`` of a split, read from ``cache_dir`` when counted before (see the module docstring)."""
    path = Path(cache_dir) / f"id_counts.{_fingerprint(sparse, num_embeddings)}.npz"
    if path.exists():
        with np.load(path) as saved:
            logger.info("using cached id counts %s", path)
            return [saved[f"f{f}"] for f in range(len(num_embeddings))]
    counts = count_ids(sparse, num_embeddings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **{f"f{f}": c for f, c in enumerate(counts)})
    os.replace(tmp, path)
    logger.info("counted ids of %d rows into %s", len(sparse), path)
    return counts
