"""Data for training: prepare the splits once per node, then iterate per-rank slices of global batches.

Training batches are *global* batches of ``global_batch_size`` consecutive rows of a (seed, epoch)
permutation, each rank taking its own equal slice. Unlike contiguous per-rank shards, the global batches
do not depend on the world size, so a run resumed at another world size continues with exactly the
batches the original run would have seen next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.data.criteo import CriteoArrays, load_criteo_splits
from torchrec_qr.data.dataloader import CriteoBatchIterator, make_batch
from torchrec_qr.data.synthetic import write_synthetic_criteo
from torchrec_qr.train.config import CRITEO_NUM_SPARSE, TrainingConfig

__all__ = ["GlobalBatchIterator", "HashIds", "Splits", "eval_batches", "prepare_splits"]

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """train/val/test rows, each categorical feature's id range, malformed lines skipped, the data cache."""

    train: CriteoArrays
    val: CriteoArrays
    test: CriteoArrays
    num_embeddings: list[int]
    num_malformed: int
    source_dir: Path
    cache_dir: Path


def _synthetic_dir(cfg: TrainingConfig) -> Path:
    """One cache directory per generator config, so configs with different data never overwrite each other."""
    key = hashlib.sha1(json.dumps(asdict(cfg.data.synthetic), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.data.cache_dir).expanduser() / f"synthetic-{key}"


def prepare_splits(cfg: TrainingConfig, rank: int, local_rank: int, barrier: Callable[[], None]) -> Splits:
    """Load the splits: rank 0 generates/parses first, then the first rank of every other node (a no-op on
    a shared file system), then everyone else maps the caches. No two processes write the same file.
    """
    d = cfg.data
    if d.source == "synthetic":
        source: Path = _synthetic_dir(cfg)
        num_embeddings = list(d.synthetic.cardinalities)
        cardinalities, cache_dir = None, source / "cache"
    else:
        assert d.criteo_path is not None
        source = Path(d.criteo_path)
        cardinalities = d.num_embeddings_per_feature
        num_embeddings = list(cardinalities) if cardinalities else [d.max_ind_range] * CRITEO_NUM_SPARSE
        cache_dir = Path(d.cache_dir).expanduser() / "criteo"

    def load() -> dict[str, CriteoArrays]:
        if d.source == "synthetic":
            write_synthetic_criteo(source, d.synthetic)
        return load_criteo_splits(
            source, cache_dir=cache_dir, max_ind_range=d.max_ind_range,
            cardinalities=cardinalities, skip_malformed=d.skip_malformed,
        )

    phase = 0 if rank == 0 else 1 if local_rank == 0 else 2
    for p in range(3):
        if phase == p:
            splits = load()
        barrier()
    malformed = sum(s.num_malformed for s in splits.values())
    if malformed:
        logger.warning("skipped %d malformed lines (data.skip_malformed=true)", malformed)

    def limit(a: CriteoArrays, rows: int | None) -> CriteoArrays:
        return a if rows is None else a.slice(0, min(rows, len(a)))

    return Splits(
        train=limit(splits["train"], d.limit_train_rows),
        val=limit(splits["val"], d.limit_eval_rows),
        test=limit(splits["test"], d.limit_eval_rows),
        num_embeddings=num_embeddings,
        num_malformed=malformed,
        source_dir=source,
        cache_dir=cache_dir,
    )


class HashIds:
    """The hashing trick as a batch transform: feature f's ids become ``id mod rows[f]``.

    Features not in ``rows`` pass unchanged. Applied to data before the lookup, so the model is a plain
    ``EmbeddingBagCollection`` over the shrunk tables and stays pipelinable.
    """

    def __init__(self, rows: dict[str, int]) -> None:
        if any(r < 1 for r in rows.values()):
            raise ValueError(f"hash table sizes must be positive, got {rows}")
        self.rows = dict(rows)

    def kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        moduli = torch.tensor([self.rows.get(k, 2**63 - 1) for k in kjt.keys()], dtype=torch.int64)
        per_value = torch.repeat_interleave(moduli, torch.tensor(kjt.length_per_key()), output_size=kjt.values().numel())
        return KeyedJaggedTensor(
            keys=kjt.keys(),
            values=torch.remainder(kjt.values().to(torch.int64), per_value).to(kjt.values().dtype),
            lengths=kjt.lengths(),
            weights=kjt.weights_or_none(),
            stride=kjt.stride(),
        )

    def __call__(self, batch: Batch) -> Batch:
        return replace(batch, sparse_features=self.kjt(batch.sparse_features))


class GlobalBatchIterator:
    """This rank's slices of the global batches of one epoch, from ``start_step`` on.

    Global batch k is rows ``order[k*G : (k+1)*G]`` (``order`` a (seed, epoch) permutation, or the stored
    order); rank r takes ``G / world_size`` of them at offset ``r * G / world_size``. A final partial global
    batch is dropped, so every rank yields the same number of equal batches.
    """

    def __init__(
        self,
        arrays: CriteoArrays,
        global_batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        start_step: int = 0,
        transform: Callable[[Batch], Batch] | None = None,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {world_size} ranks")
        self.arrays, self.global_batch_size = arrays, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.num_steps = len(arrays) // global_batch_size
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step {start_step} is not in [0, {self.num_steps}]")
        self.start_step = start_step
        self.transform = transform

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def __iter__(self) -> Iterator[Batch]:
        local = self.global_batch_size // self.world_size
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.arrays)) if self.shuffle else None
        a = self.arrays
        for k in range(self.start_step, self.num_steps):
            lo = k * self.global_batch_size + self.rank * local
            take: slice | np.ndarray = slice(lo, lo + local) if order is None else np.sort(order[lo : lo + local])
            batch = make_batch(a.dense[take], a.sparse[take], a.labels[take])
            yield self.transform(batch) if self.transform else batch


def eval_batches(
    arrays: CriteoArrays,
    eval_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None,
    transform: Callable[[Batch], Batch] | None,
) -> Iterator[Batch]:
    """Evaluation batches of this rank's contiguous shard (order does not matter for summed metrics)."""
    per_rank = max(1, math.ceil(eval_batch_size / world_size))
    it = CriteoBatchIterator(arrays, per_rank, rank=rank, world_size=world_size)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            return
        yield transform(batch) if transform else batch
