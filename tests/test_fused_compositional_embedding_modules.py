"""FusedCompositionalEmbeddingBagCollection: the same function as the dense module, and one fused step
equal to the dense module's gradient step with the same optimizer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchrec
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    CompositionalEmbeddingBagCollection,
    FusedCompositionalEmbeddingBagCollection,
    MixedRadix,
    QuotientRemainder,
    compress,
)


def _tables(combine: str, pooling: PoolingType) -> list[EmbeddingBagConfig]:
    plain = [
        EmbeddingBagConfig(name="big", num_embeddings=997, embedding_dim=8, feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="wide", num_embeddings=500, embedding_dim=8, feature_names=["c"], pooling=pooling),
        EmbeddingBagConfig(name="small", num_embeddings=7, embedding_dim=8, feature_names=["d"], pooling=pooling),
    ]
    tables = compress(plain[:1], QuotientRemainder(collisions=10), combine=combine)
    (wide,) = compress(plain[1:2], MixedRadix((8, 8, 8)), combine=combine)
    if combine == "concat":  # fused kernels need sub-table widths divisible by 4
        wide = replace(wide, embedding_dim=12, sub_dims=[4, 4, 4])
    return tables + [wide] + plain[2:]


def _batch(weighted: bool, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, rows, batch = ["a", "b", "c", "d"], [997, 997, 500, 7], 5
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    per_key = lengths.view(len(keys), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,), generator=g) for r, n in zip(rows, per_key)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def _pair(combine: str, pooling: PoolingType, weighted: bool, optimizer: type, kwargs: dict):
    tables = _tables(combine, pooling)
    fused = FusedCompositionalEmbeddingBagCollection(tables, optimizer, kwargs, is_weighted=weighted)
    dense = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    dense.load_state_dict(fused.state_dict())
    return fused, dense


@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_sgd_step_match_dense_module(combine: str, pooling: PoolingType, weighted: bool) -> None:
    fused, dense = _pair(combine, pooling, weighted, torch.optim.SGD, {"lr": 0.5})
    sgd = torch.optim.SGD(dense.parameters(), lr=0.5)
    width = sum(t.embedding_dim * t.num_features() for t in fused.embedding_bag_configs())
    for step in range(2):
        kjt = _batch(weighted, step)
        target = torch.randn(5, width, generator=torch.Generator().manual_seed(10 + step))
        out_f, out_d = fused(kjt).values(), dense(kjt).values()
        torch.testing.assert_close(out_f, out_d, rtol=0, atol=1e-6)
        (out_f * target).sum().backward()  # the fused update happens here
        sgd.zero_grad()
        (out_d * target).sum().backward()
        sgd.step()
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_adagrad_step_matches_torch_adagrad() -> None:
    fused, dense = _pair("mult", PoolingType.SUM, False, torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8})
    adagrad = torch.optim.Adagrad(dense.parameters(), lr=0.1, eps=1e-8)
    kjt = _batch(False, 3)
    fused(kjt).values().pow(2).sum().backward()
    dense(kjt).values().pow(2).sum().backward()
    adagrad.step()
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fused_optimizer_keys_and_learning_rate() -> None:
    fused, _ = _pair("mult", PoolingType.SUM, False, torchrec.optim.RowWiseAdagrad, {"lr": 0.1})
    optimizer = fused.fused_optimizer()
    assert set(optimizer.params) == {k for k in fused.state_dict()}
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()  # pushes the learning rate into the kernels
    fused(_batch(False, 4)).values().sum().backward()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_meta_device_and_bad_optimizer() -> None:
    tables = _tables("mult", PoolingType.SUM)
    meta = FusedCompositionalEmbeddingBagCollection(tables, torch.optim.SGD, {"lr": 0.1}, device="meta")
    assert all(v.device.type == "meta" for v in meta.state_dict().values())
    with pytest.raises(ValueError, match="cannot fuse optimizer_type=RMSprop"):
        FusedCompositionalEmbeddingBagCollection(tables, torch.optim.RMSprop, {"lr": 0.1})
