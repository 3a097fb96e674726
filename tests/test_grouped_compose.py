"""One id per bag (the DLRM/Criteo input): the vectorized fast path against directly gathered rows.

Every bag holding exactly one id takes a separate code path (rows are already the pooled output; only
weights apply). The reference gathers each id's composed row with ``embedding_rows``, which does not go
through the composition code, and multiplies by its weight; gradients are compared the same way.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    MixedRadix,
    QuotientRemainder,
)

B = 6


def _tables(combine: str, pooling: PoolingType) -> list[EmbeddingBagConfig]:
    return [
        CompositionalEmbeddingBagConfig(
            name="a",
            num_embeddings=90,
            embedding_dim=8,
            feature_names=["fa", "fb"],
            partition=QuotientRemainder(7),
            combine=combine,
            pooling=pooling,
        ),
        EmbeddingBagConfig(name="plain", num_embeddings=20, embedding_dim=8, feature_names=["fp"], pooling=pooling),
        CompositionalEmbeddingBagConfig(
            name="b",
            num_embeddings=60,
            embedding_dim=8,
            feature_names=["fc"],
            partition=MixedRadix((4, 4, 4)),
            combine=combine,
            pooling=PoolingType.SUM,
        ),
        CompositionalEmbeddingBagConfig(
            name="c",
            num_embeddings=30,
            embedding_dim=8,
            feature_names=["fd"],
            partition=ChineseRemainder((5, 7)),
            combine=combine,
            pooling=pooling,
        ),
    ]


@pytest.mark.parametrize(
    "combine,pooling,weighted",
    list(itertools.product(["mult", "add", "concat"], [PoolingType.SUM, PoolingType.MEAN], [False, True])),
)
def test_one_id_per_bag_matches_gathered_rows(combine: str, pooling: PoolingType, weighted: bool) -> None:
    torch.manual_seed(0)
    tables = _tables(combine, pooling)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    g = torch.Generator().manual_seed(1)
    feature_table = [(f, t) for t in tables for f in t.feature_names]
    ids = {f: torch.randint(0, t.num_embeddings, (B,), generator=g) for f, t in feature_table}
    weights = {f: torch.rand(B, generator=g) for f, _ in feature_table}
    kjt = KeyedJaggedTensor(
        keys=[f for f, _ in feature_table],
        values=torch.cat([ids[f] for f, _ in feature_table]),
        lengths=torch.ones(B * len(feature_table), dtype=torch.int64),
        weights=torch.cat([weights[f] for f, _ in feature_table]) if weighted else None,
    )
    out = module(kjt)
    target = torch.randn(B, sum(t.embedding_dim for _, t in feature_table), generator=g)
    (out.values() * target).sum().backward()
    grad = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()

    expected = []
    for f, t in feature_table:
        rows = module.embedding_rows(t.name, ids[f])  # one id per bag: MEAN divides by 1
        expected.append(rows * weights[f].unsqueeze(1) if weighted else rows)
    expected_out = torch.cat(expected, dim=1)
    torch.testing.assert_close(out.values(), expected_out, atol=1e-6, rtol=1e-5)
    (expected_out * target).sum().backward()
    for got, want in zip(grad, [p.grad for p in module.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
