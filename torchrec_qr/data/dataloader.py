"""Batches of preprocessed Criteo rows as torchrec `Batch`es, sharded per rank and resumable.

Each rank reads an equal-sized contiguous shard of the (optionally permuted) rows, so every rank
yields the same number of batches of the same sizes: collectives in data- and model-parallel
training never wait on a rank that ran out. The order depends only on (seed, epoch), so a run
resumed at batch k with `start_batch=k` sees exactly the batches an uninterrupted run would have.
"""

import logging
from collections.abc import Iterator

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
    """Iterate over one rank's share of `arrays` in batches of `batch_size`.

    Rank r of `world_size` takes rows [r * m, (r + 1) * m) of the row order, m = len(arrays) //
    world_size (the remainder, fewer than world_size rows, is dropped). The row order is the stored
    order, or with `shuffle` a permutation seeded by (seed, epoch), the same on every rank.

    Args:
        arrays: preprocessed rows (see `torchrec_qr.data.criteo`).
        batch_size: rows per batch on this rank.
        rank: this process's rank.
        world_size: number of ranks sharing the data.
        shuffle: permute rows each epoch (seeded) instead of reading them in stored order.
        seed: seed of the permutation.
        epoch: epoch number, mixed into the permutation so epochs differ.
        start_batch: first batch to yield, to resume a run mid-epoch.
        drop_last: drop a final batch smaller than `batch_size`.

    Example::

        splits = load_criteo_splits("data/synthetic")
        batches = CriteoBatchIterator(splits["train"], batch_size=128, rank=0, world_size=2)
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
        drop_last: bool = False,
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
        self.drop_last = drop_last
        self.shard_size = len(arrays) // world_size
        full, rest = divmod(self.shard_size, batch_size)
        self.num_batches = full + (1 if rest and not drop_last else 0)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches}]")
        self.start_batch = start_batch
        if self.shard_size == 0:
            logger.warning("rank %d gets no rows: %d rows for %d ranks", rank, len(arrays), world_size)

    def __len__(self) -> int:
        """Batches this iterator yields: the epoch's batches from `start_batch` on."""
        return self.num_batches - self.start_batch

    def shard_rows(self) -> np.ndarray | slice:
        """This rank's rows in iteration order: a slice, or indices when shuffling."""
        begin = self.rank * self.shard_size
        if not self.shuffle:
            return slice(begin, begin + self.shard_size)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.arrays))
        return order[begin : begin + self.shard_size]

    def __iter__(self) -> Iterator[Batch]:
        rows = self.shard_rows()
        for b in range(self.start_batch, self.num_batches):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.shard_size)
            if isinstance(rows, slice):
                take: slice | np.ndarray = slice(rows.start + lo, rows.start + hi)
            else:
                take = np.sort(rows[lo:hi])  # sorted gathers read memory maps sequentially
            yield make_batch(self.arrays.dense[take], self.arrays.sparse[take], self.arrays.labels[take])
