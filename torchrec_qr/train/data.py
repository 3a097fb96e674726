"""Data for training: table sizes, the splits prepared once per node, and the batches of each rank.

Training batches are *global* batches of ``global_batch_size`` consecutive rows of a (seed, epoch)
permutation, each rank taking its own equal slice; evaluation reads contiguous per-rank shards. Both come
from ``torchrec_qr.data.dataloader.CriteoBatchIterator``. Unlike contiguous shards, the global batches do
not depend on the world size, so a run resumed at another world size continues with exactly the batches
the original run would have seen next.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.data.criteo import CriteoArrays, load_criteo_splits
from torchrec_qr.data.dataloader import CriteoBatchIterator
from torchrec_qr.data.synthetic import write_synthetic_criteo
from torchrec_qr.train.config import CRITEO_NUM_SPARSE, ConfigError, TrainingConfig

__all__ = [
    "GlobalBatchIterator",
    "HashIds",
    "Splits",
    "eval_batches",
    "local_batch_size",
    "num_embeddings",
    "prepare_splits",
    "train_batches",
]

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


def num_embeddings(cfg: TrainingConfig) -> list[int]:
    """Each categorical feature's table size, from the config alone (no data read): the generator's
    cardinalities, or the Criteo sizes ids are taken modulo (``data.num_embeddings_per_feature``, else
    ``data.max_ind_range`` for every feature)."""
    d = cfg.data
    if d.source == "synthetic":
        return list(d.synthetic.cardinalities)
    if d.num_embeddings_per_feature:
        return list(d.num_embeddings_per_feature)
    if d.max_ind_range:
        return [d.max_ind_range] * CRITEO_NUM_SPARSE
    raise ConfigError("data.num_embeddings_per_feature: Criteo table sizes are needed to plan (or data.max_ind_range)")


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
        cardinalities, cache_dir = None, source / "cache"
    else:
        assert d.criteo_path is not None
        source = Path(d.criteo_path)
        cardinalities = d.num_embeddings_per_feature
        cache_dir = Path(d.cache_dir).expanduser() / "criteo"

    def load() -> dict[str, CriteoArrays]:
        if d.source == "synthetic":
            write_synthetic_criteo(source, d.synthetic)
        return load_criteo_splits(
            source,
            cache_dir=cache_dir,
            max_ind_range=d.max_ind_range,
            cardinalities=cardinalities,
            skip_malformed=d.skip_malformed,
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
        num_embeddings=num_embeddings(cfg),
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
        per_value = torch.repeat_interleave(
            moduli, torch.tensor(kjt.length_per_key()), output_size=kjt.values().numel()
        )
        return KeyedJaggedTensor(
            keys=kjt.keys(),
            values=torch.remainder(kjt.values().to(torch.int64), per_value).to(kjt.values().dtype),
            lengths=kjt.lengths(),
            weights=kjt.weights_or_none(),
            stride=kjt.stride(),
        )

    def __call__(self, batch: Batch) -> Batch:
        return replace(batch, sparse_features=self.kjt(batch.sparse_features))


class GlobalBatchIterator(CriteoBatchIterator):
    """Deprecated: ``CriteoBatchIterator(arrays, global_batch_size // world_size, ..., global_batches=True)``.

    Kept so existing callers keep working; ``start_step`` is the iterator's ``start_batch``.
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
        warnings.warn(
            "GlobalBatchIterator is deprecated: use torchrec_qr.data.dataloader.CriteoBatchIterator with the "
            "per-rank batch size and global_batches=True",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(
            arrays,
            local_batch_size(global_batch_size, world_size),
            rank,
            world_size,
            shuffle,
            seed,
            epoch,
            start_step,
            global_batches=True,
            transform=transform,
        )


def local_batch_size(global_batch_size: int, world_size: int) -> int:
    """Each rank's share of a global batch, which must split evenly (``validate`` checks it in the config)."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} does not split over {world_size} ranks")
    return global_batch_size // world_size


def train_batches(
    cfg: TrainingConfig,
    arrays: CriteoArrays,
    rank: int,
    world_size: int,
    epoch: int,
    start_step: int,
    transform: Callable[[Batch], Batch] | None,
) -> CriteoBatchIterator:
    """This rank's slices of the epoch's global batches from ``start_step`` on (see ``CriteoBatchIterator``)."""
    d = cfg.data
    return CriteoBatchIterator(
        arrays,
        local_batch_size(d.global_batch_size, world_size),
        rank,
        world_size,
        d.shuffle,
        cfg.run.seed,
        epoch,
        start_step,
        global_batches=True,
        transform=transform,
    )


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
    batches = CriteoBatchIterator(arrays, per_rank, rank=rank, world_size=world_size, transform=transform)
    return itertools.islice(batches, max_batches)
