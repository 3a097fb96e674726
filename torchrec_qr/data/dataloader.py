"""Batches of preprocessed Criteo rows as torchrec `Batch`es, per rank and resumable: one iterator for
training and evaluation.

Every rank yields the same number of batches of the same sizes, so collectives in data- and model-parallel
training never wait on a rank that ran out. The order depends only on (seed, epoch), so a run resumed at
batch k with `start_batch=k` sees exactly the batches an uninterrupted run would have.
"""

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.data.criteo import CriteoArrays

__all__ = ["CriteoBatchIterator", "make_batch"]

logger = logging.getLogger(__name__)


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> Batch:
    """Build a `Batch` from B rows with one id per categorical feature.

    KJT values are feature-major (all B ids of key 0, then key 1, ...), every length is 1.
    """
    keys = list(DEFAULT_CAT_NAMES) if keys is None else keys
    batch_size, num_keys = sparse.shape
    if num_keys != len(keys):
        raise ValueError(f"sparse has {num_keys} columns but {len(keys)} keys were given")
    sparse_features = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.ascontiguousarray(sparse.T, dtype=np.int64).reshape(-1)),
        lengths=torch.ones(num_keys * batch_size, dtype=torch.int32),
        stride=batch_size,
        length_per_key=[batch_size] * num_keys,
        offset_per_key=[batch_size * i for i in range(num_keys + 1)],
    )
    # np.array copies: slices of read-only memory maps cannot back a writable tensor.
    return Batch(
        dense_features=torch.from_numpy(np.array(dense, dtype=np.float32)),
        sparse_features=sparse_features,
        labels=torch.from_numpy(np.array(labels, dtype=np.float32).reshape(-1)),
    )


class CriteoBatchIterator:
    """One rank's batches of `batch_size` rows over one epoch of `arrays`.

    The epoch reads the rows in stored order, or with `shuffle` in a permutation seeded by (seed, epoch),
    the same on every rank. Ranks split it one of two ways:

    - contiguous shards (default; evaluation, where order does not matter): rank r of `world_size` reads
      positions [r * m, (r + 1) * m), m = len(arrays) // world_size (the remainder, fewer than world_size
      rows, is dropped); its last batch may be smaller.
    - `global_batches=True` (training): global batch k is positions [k * G, (k + 1) * G),
      G = batch_size * world_size, of which rank r takes the r-th `batch_size` rows; a final partial global
      batch is dropped. For a fixed G the global batches do not depend on the world size, so a run resumed
      at another world size continues with exactly the batches the original run would have seen next.

    Args:
        arrays: preprocessed rows (see `torchrec_qr.data.criteo`).
        batch_size: rows per batch on this rank.
        rank: this process's rank.
        world_size: number of ranks sharing the data.
        shuffle: permute rows each epoch (seeded) instead of reading them in stored order.
        seed: seed of the permutation.
        epoch: epoch number, mixed into the permutation so epochs differ.
        start_batch: first batch to yield, to resume a run mid-epoch.
        global_batches: split global batches over ranks instead of contiguous shards.
        transform: applied to every batch (e.g. `torchrec_qr.train.data.HashIds`).

    Example::

        splits = load_criteo_splits("data/synthetic")
        batches = CriteoBatchIterator(splits["train"], batch_size=128, rank=0, world_size=2, global_batches=True)
        for batch in batches:  # len(batches) batches of torchrec Batch
            loss = model(batch)
    """

    def __init__(
        self,
        arrays: CriteoArrays,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        *,
        global_batches: bool = False,
        transform: Callable[[Batch], Batch] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.arrays = arrays
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.global_batches = global_batches
        self.transform = transform
        self.shard_size = len(arrays) // world_size
        if global_batches:
            self.num_batches = len(arrays) // (batch_size * world_size)
        else:
            self.num_batches = -(-self.shard_size // batch_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches}]")
        self.start_batch = start_batch
        if self.num_batches == 0:
            logger.warning("rank %d gets no batches: %d rows for %d ranks", rank, len(arrays), world_size)

    def __len__(self) -> int:
        """Batches this iterator yields: the epoch's batches from `start_batch` on."""
        return self.num_batches - self.start_batch

    def positions(self, b: int) -> tuple[int, int]:
        """Batch `b` of this rank as the range [lo, hi) of positions in the epoch's row order."""
        if self.global_batches:
            lo = (b * self.world_size + self.rank) * self.batch_size
            return lo, lo + self.batch_size
        begin = self.rank * self.shard_size
        return begin + b * self.batch_size, begin + min((b + 1) * self.batch_size, self.shard_size)

    def __iter__(self) -> Iterator[Batch]:
        a = self.arrays
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(a)) if self.shuffle else None
        for b in range(self.start_batch, self.num_batches):
            lo, hi = self.positions(b)
            # Sorted gathers read memory maps sequentially.
            take: slice | np.ndarray = slice(lo, hi) if order is None else np.sort(order[lo:hi])
            batch = make_batch(a.dense[take], a.sparse[take], a.labels[take])
            yield self.transform(batch) if self.transform else batch
