"""Shared test helpers: KJT builders from Python lists, reference partition classes in Python ints, and
per-table gradients of the module's flat kernel weights."""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import ChineseRemainder, ExplicitPartitions, HotIds, MixedRadix, QuotientRemainder

Bags = dict[str, list[list[int]]]


def make_kjt(bags: Bags, weights: dict[str, list[list[float]]] | None = None) -> KeyedJaggedTensor:
    """A KJT from ``{feature: [bag, ...]}`` (every feature has the same number of bags)."""
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    w = None
    if weights is not None:
        w = torch.tensor([x for k in keys for bag in weights[k] for x in bag], dtype=torch.float32)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        weights=w,
    )


def plain_configs(tables: list[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """The logical tables as plain ``EmbeddingBagConfig`` s (for a reference EBC holding materialized rows)."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=t.pooling,
        )
        for t in tables
    ]


def random_bags(rng: random.Random, sizes: dict[str, int], batch: int, max_len: int = 4) -> Bags:
    """Random multi-hot bags per feature (``sizes[f]`` is the id range), about one in five empty."""
    return {
        f: [
            [rng.randrange(n) for _ in range(0 if rng.random() < 0.2 else rng.randint(1, max_len))]
            for _ in range(batch)
        ]
        for f, n in sizes.items()
    }


def random_weights(rng: random.Random, bags: Bags) -> dict[str, list[list[float]]]:
    return {f: [[rng.uniform(0.1, 2.0) for _ in bag] for bag in fb] for f, fb in bags.items()}


def reference_classes(partition, i: int) -> tuple[int, ...]:
    """The classes of id ``i`` computed from each scheme's definition on Python ints."""
    if isinstance(partition, QuotientRemainder):
        return (i // partition.collisions, i % partition.collisions)
    if isinstance(partition, MixedRadix):
        digits = []
        for r in partition.radices:
            digits.append(i % r)
            i //= r
        return tuple(digits)
    if isinstance(partition, ChineseRemainder):
        return tuple(i % m for m in partition.moduli)
    if isinstance(partition, ExplicitPartitions):
        return tuple(int(m[i]) for m in partition.class_maps)
    if isinstance(partition, HotIds):  # hot: own class, 0 elsewhere; tail: base classes of its rank, shifted
        hot = sorted(partition.hot_ids.tolist())
        if i in hot:
            return (hot.index(i),) + (0,) * (partition.num_partitions - 1)
        base = reference_classes(partition.base, i - sum(h < i for h in hot))
        return (len(hot) + base[0],) + tuple(c + 1 for c in base[1:])
    raise TypeError(type(partition))


def permuted_qr(num_embeddings: int, collisions: int, seed: int = 0) -> ExplicitPartitions:
    """Explicit class maps that are complementary: QR classes of a random permutation of the ids."""
    perm = torch.randperm(num_embeddings, generator=torch.Generator().manual_seed(seed))
    return ExplicitPartitions((perm // collisions, perm % collisions))


def table_grads(module) -> dict[str, torch.Tensor]:
    """Each physical table's ``[rows, dim]`` gradient, cut from the ``.grad`` of the flat kernel weights."""
    params = list(module.parameters())
    out = {}
    for name, view in module._embedding_bag_collection.table_weights().items():
        owner = [p for p in params if p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()]
        assert len(owner) == 1, name
        p = owner[0]
        assert p.grad is not None, f"no gradient reached the kernel holding {name}"
        start = view.storage_offset() - p.storage_offset()
        out[name] = p.grad.reshape(-1)[start : start + view.numel()].view_as(view)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
