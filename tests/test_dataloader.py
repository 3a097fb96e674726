"""Batch iterator: disjoint covering rank shards, global batches independent of the world size, KJT layout,
deterministic order, exact resume."""

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES

from torchrec_qr.data.criteo import CriteoArrays
from torchrec_qr.data.dataloader import CriteoBatchIterator
from torchrec_qr.train.data import GlobalBatchIterator, HashIds


def make_arrays(n: int) -> CriteoArrays:
    """Rows whose label is their index, so batches tell which rows they hold."""
    rng = np.random.default_rng(0)
    return CriteoArrays(
        dense=rng.random((n, 13), dtype=np.float32),
        sparse=rng.integers(0, 1000, (n, 26)),
        labels=np.arange(n, dtype=np.float32),
    )


def rows_of(iterator) -> list[np.ndarray]:
    return [batch.labels.numpy().astype(np.int64) for batch in iterator]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_shards_are_disjoint_and_cover(world_size, shuffle):
    n, batch_size = 1003, 64
    arrays = make_arrays(n)
    per_rank = [
        rows_of(CriteoBatchIterator(arrays, batch_size, r, world_size, shuffle=shuffle, seed=5))
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank yields as many batches
    assert len({tuple(len(b) for b in batches) for batches in per_rank}) == 1
    seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert len(seen) == len(set(seen.tolist())) == world_size * (n // world_size)
    if not shuffle:
        np.testing.assert_array_equal(np.sort(seen), np.arange(len(seen)))
        np.testing.assert_array_equal(
            np.concatenate(per_rank[-1]), np.arange(n - n % world_size - n // world_size, n - n % world_size)
        )


def test_batch_layout():
    arrays = make_arrays(100)
    batches = list(CriteoBatchIterator(arrays, 32))
    assert [b.labels.shape[0] for b in batches] == [32, 32, 32, 4]
    batch = batches[1]
    rows = batch.labels.numpy().astype(np.int64)
    kjt = batch.sparse_features
    assert kjt.keys() == list(DEFAULT_CAT_NAMES)
    assert kjt.stride() == 32 and kjt.values().shape == (26 * 32,) and kjt.values().dtype == torch.int64
    assert torch.all(kjt.lengths() == 1)
    np.testing.assert_array_equal(kjt.values().numpy(), arrays.sparse[rows].T.reshape(-1))  # feature-major
    np.testing.assert_array_equal(kjt["cat_7"].values().numpy(), arrays.sparse[rows, 7])
    assert batch.dense_features.shape == (32, 13) and batch.dense_features.dtype == torch.float32
    np.testing.assert_array_equal(batch.dense_features.numpy(), arrays.dense[rows])


def test_drop_last_and_len():
    arrays = make_arrays(100)
    assert len(CriteoBatchIterator(arrays, 32)) == 4
    it = CriteoBatchIterator(arrays, 32, global_batches=True)  # global batches drop a final partial one
    assert len(it) == 3 and len(list(it)) == 3
    assert len(CriteoBatchIterator(arrays, 32, start_batch=3)) == 1
    with pytest.raises(ValueError):
        CriteoBatchIterator(arrays, 32, start_batch=5)
    with pytest.raises(ValueError):
        CriteoBatchIterator(arrays, 32, rank=2, world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_start_batch_resumes_exactly(shuffle):
    arrays = make_arrays(777)
    kw = dict(batch_size=50, rank=1, world_size=2, shuffle=shuffle, seed=9, epoch=2)
    full = list(CriteoBatchIterator(arrays, **kw))
    for start in (0, 3, len(full) - 1, len(full)):
        resumed = list(CriteoBatchIterator(arrays, start_batch=start, **kw))
        assert len(resumed) == len(full) - start
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a.labels, b.labels)
            assert torch.equal(a.dense_features, b.dense_features)
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())


def test_shuffle_is_seeded_per_epoch():
    arrays = make_arrays(500)
    order = lambda **kw: np.concatenate(rows_of(CriteoBatchIterator(arrays, 64, shuffle=True, **kw)))
    np.testing.assert_array_equal(order(seed=1, epoch=0), order(seed=1, epoch=0))
    assert not np.array_equal(order(seed=1, epoch=0), order(seed=1, epoch=1))
    assert not np.array_equal(order(seed=1, epoch=0), order(seed=2, epoch=0))
    np.testing.assert_array_equal(np.sort(order(seed=1, epoch=1)), np.arange(500))


def test_memory_mapped_arrays(tmp_path):
    arrays = make_arrays(40)
    for name in ("dense", "sparse", "labels"):
        np.save(tmp_path / f"{name}.npy", getattr(arrays, name))
    mapped = CriteoArrays(*(np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("dense", "sparse", "labels")))
    batch = next(iter(CriteoBatchIterator(mapped, 16, shuffle=True)))
    batch.dense_features.add_(1.0)  # tensors own writable memory, not the read-only map
    assert batch.sparse_features.values().shape == (26 * 16,)


def _arrays(n: int) -> CriteoArrays:
    rows = np.arange(n)
    return CriteoArrays(
        dense=np.repeat(rows[:, None], 13, axis=1).astype(np.float32),
        sparse=np.repeat(rows[:, None], 26, axis=1).astype(np.int64),
        labels=(rows % 2).astype(np.float32),
    )


def _rows(batch) -> list[int]:
    return batch.dense_features[:, 0].long().tolist()


def _global(arrays, global_batch_size, rank, world_size, shuffle, **kw):
    """The training layout: each rank's slice of global batches of ``global_batch_size`` rows."""
    return CriteoBatchIterator(
        arrays, global_batch_size // world_size, rank, world_size, shuffle, global_batches=True, **kw
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_do_not_depend_on_world_size(shuffle: bool) -> None:
    arrays = _arrays(1000)
    one = [_rows(b) for b in _global(arrays, 96, 0, 1, shuffle, seed=3, epoch=1)]
    per_rank = [[_rows(b) for b in _global(arrays, 96, r, 4, shuffle, seed=3, epoch=1)] for r in range(4)]
    assert len(one) == 1000 // 96 and all(len(p) == len(one) for p in per_rank)
    for k, rows in enumerate(one):
        assert sorted(sum((per_rank[r][k] for r in range(4)), [])) == sorted(rows)
    resumed = [_rows(b) for b in _global(arrays, 96, 1, 2, shuffle, seed=3, epoch=1, start_batch=4)]
    full = [_rows(b) for b in _global(arrays, 96, 1, 2, shuffle, seed=3, epoch=1)]
    assert resumed == full[4:]
    batch = next(iter(_global(arrays, 96, 0, 2, False, seed=0, epoch=0, transform=HashIds({"cat_0": 7}))))
    assert batch.sparse_features["cat_0"].values().tolist() == [i % 7 for i in range(48)]
    other_epoch = [_rows(b) for b in _global(arrays, 96, 0, 1, shuffle, seed=3, epoch=2)]
    assert (other_epoch != one) == shuffle


def test_global_batch_iterator_is_a_deprecated_alias() -> None:
    """The training app's former iterator warns and yields the same global batches."""
    arrays = _arrays(200)
    with pytest.warns(DeprecationWarning, match="global_batches=True"):
        old = [_rows(b) for b in GlobalBatchIterator(arrays, 48, 1, 2, True, seed=3, epoch=1, start_step=1)]
    assert old == [_rows(b) for b in _global(arrays, 48, 1, 2, True, seed=3, epoch=1, start_batch=1)]
    assert len(old) == 3
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        GlobalBatchIterator(arrays, 47, 0, 2, False, 0, 0)
