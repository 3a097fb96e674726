"""The native compose kernel (``FusedCompose``) against FBGEMM's own path: the same module with the kernel off
(``TORCHREC_QR_COMPOSE_KERNEL=0``) looks up through the split TBE, composes with the reference code and lets
FBGEMM's fused backward apply the optimizer. Outputs, weights and optimizer state must agree over several
steps, for every combine op, pooling, weighting, composition mode and fused optimizer the kernel serves."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchrec
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import batch, reference, shard
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    FusedCompositionalEmbeddingBagCollection,
    MixedRadix,
    PathFunction,
    QuotientRemainder,
    compress,
)
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.ops.build import ENV_SWITCH

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.3}),
    "rowwise_adagrad": (torchrec.optim.RowWiseAdagrad, {"lr": 0.3, "eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.3, "eps": 1e-8}),
}


def _tables(combine: str, pooling: PoolingType, composition: str) -> list[EmbeddingBagConfig]:
    """A shared two-feature table (k=2), a k=3 table, and a plain table."""
    plain = [
        EmbeddingBagConfig(name="big", num_embeddings=997, embedding_dim=8, feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="wide", num_embeddings=500, embedding_dim=12, feature_names=["c"], pooling=pooling),
        EmbeddingBagConfig(name="small", num_embeddings=7, embedding_dim=4, feature_names=["d"], pooling=pooling),
    ]
    sub_dims = {"sub_dims": [4, 4, 4]} if combine == "concat" else {}
    big = compress(plain[:1], QuotientRemainder(collisions=10), combine=combine, composition=composition)
    wide = compress(plain[1:2], MixedRadix((8, 8, 8)), combine=combine, composition=composition)
    if sub_dims:
        wide = [replace(w, **sub_dims) for w in wide]
    return big + wide + plain[2:]


def _batch(weighted: bool, seed: int, batch_size: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, rows = ["a", "b", "c", "d"], [997, 997, 500, 7]
    lengths = torch.randint(0, 5, (len(keys) * batch_size,), generator=g)
    per_key = lengths.view(len(keys), batch_size).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,), generator=g) for r, n in zip(rows, per_key)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def _module(tables, optimizer: str, weighted: bool, kernel: bool, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "1" if kernel else "0")
    cls, kwargs = OPTIMIZERS[optimizer]
    torch.manual_seed(0)
    module = FusedCompositionalEmbeddingBagCollection(tables, cls, kwargs, is_weighted=weighted, validate_ids=False)
    assert (module._fused_compose is not None) == kernel
    return module


def _optimizer_state(module: FusedCompositionalEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    state = module.fused_optimizer().state_dict()["state"]
    return {f"{param}.{name}": value for param, states in state.items() for name, value in states.items()}


def _train_both(kernel_module, reference_module, weighted: bool, steps: int = 3, make_batch=_batch) -> None:
    reference_module.load_state_dict(kernel_module.state_dict())
    for step in range(steps):
        kjt = make_batch(weighted, step)
        out_k, out_r = kernel_module(kjt).values(), reference_module(kjt).values()
        torch.testing.assert_close(out_k, out_r, rtol=0, atol=1e-6)
        target = torch.randn(out_k.shape, generator=torch.Generator().manual_seed(100 + step))
        (out_k * target).sum().backward()
        (out_r * target).sum().backward()
    _assert_same_weights(kernel_module, reference_module)
    state_k, state_r = _optimizer_state(kernel_module), _optimizer_state(reference_module)
    assert state_k.keys() == state_r.keys()
    for key, value in state_r.items():
        torch.testing.assert_close(state_k[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _step_both(kernel_module, reference_module, kjt: KeyedJaggedTensor) -> None:
    """Equal outputs, then one training step of each on the same loss."""
    out_k, out_r = kernel_module(kjt).values(), reference_module(kjt).values()
    torch.testing.assert_close(out_k, out_r, rtol=0, atol=1e-6)
    out_k.pow(2).sum().backward()
    out_r.pow(2).sum().backward()


def _assert_same_weights(kernel_module, reference_module) -> None:
    for key, value in reference_module.state_dict().items():
        torch.testing.assert_close(kernel_module.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "combine,composition", [("mult", "per_id"), ("mult", "pooled"), ("add", "per_id"), ("concat", "per_id")]
)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_kernel_equals_fbgemm_path(
    combine: str, composition: str, pooling: PoolingType, weighted: bool, optimizer: str, monkeypatch
) -> None:
    tables = _tables(combine, pooling, composition)
    kernel = _module(tables, optimizer, weighted, True, monkeypatch)
    ref = _module(tables, optimizer, weighted, False, monkeypatch)
    _train_both(kernel, ref, weighted)


@pytest.mark.parametrize(
    "combine,composition,collisions,sub_dims,max_ids,dim",
    [
        ("mult", "per_id", 10, None, 4, 64),  # widths of 16 to 128: each bag's sum kept in registers
        ("add", "per_id", 10, None, 4, 32),
        ("mult", "per_id", 10, None, 4, 128),
        ("mult", "pooled", 10, None, 1, 16),  # bags of at most one id: per-id products, folded
        ("mult", "pooled", 10, None, 3, 16),  # pooled products of longer bags: folded from the forward's pools
        ("mult", "pooled", 50, None, 3, 16),  # the second part larger: folded unweighted, not weighted
        ("mult", "per_id", 50, None, 4, 16),  # the remainder sub-table (50 rows) is the larger part
        ("add", "per_id", 50, None, 4, 16),
        ("concat", "per_id", 10, [12, 4], 4, 16),  # parts of different widths
    ],
)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_two_part_tables_fold_exactly(
    combine: str,
    composition: str,
    collisions: int,
    sub_dims,
    max_ids: int,
    dim: int,
    pooling: PoolingType,
    monkeypatch,
) -> None:
    """Two-part tables take the folded backward (ids sorted by the larger part's row): it must match FBGEMM's
    path whichever part is larger, for every combine, and with a second table's features in the batch."""
    plain = [
        EmbeddingBagConfig(name="t", num_embeddings=997, embedding_dim=dim, feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="u", num_embeddings=300, embedding_dim=dim, feature_names=["c"], pooling=pooling),
    ]
    tables = compress(plain, QuotientRemainder(collisions=collisions), combine=combine, composition=composition)
    if sub_dims:
        tables = [replace(t, sub_dims=sub_dims) for t in tables]

    def make_batch(weighted: bool, seed: int) -> KeyedJaggedTensor:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, max_ids + 1, (3 * 16,), generator=g)
        rows = torch.tensor([997, 997, 300]).repeat_interleave(16).repeat_interleave(lengths)
        values = (torch.rand(int(lengths.sum()), generator=g) * rows).long()
        weights = torch.rand(values.numel(), generator=g) if weighted else None
        return KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], values, lengths, weights=weights)

    for weighted in (False, True):
        kernel = _module(tables, "rowwise_adagrad", weighted, True, monkeypatch)
        ref = _module(tables, "rowwise_adagrad", weighted, False, monkeypatch)
        _train_both(kernel, ref, weighted, make_batch=make_batch)


def test_tables_much_larger_than_the_batch(monkeypatch) -> None:
    """Tables far larger than a batch's reads: a two-part one (ids sorted by row) and a plain one (a row map),
    both exact, repeated rows included."""
    tables = compress(
        [EmbeddingBagConfig(name="huge", num_embeddings=400_000, embedding_dim=8, feature_names=["a"])],
        QuotientRemainder(collisions=2),
        combine="mult",
    ) + [EmbeddingBagConfig(name="plain", num_embeddings=300_000, embedding_dim=4, feature_names=["b"])]
    kernel = _module(tables, "rowwise_adagrad", False, True, monkeypatch)
    ref = _module(tables, "rowwise_adagrad", False, False, monkeypatch)
    ref.load_state_dict(kernel.state_dict())
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["a", "b"],
            torch.cat([torch.randint(0, 400_000, (7,), generator=g), torch.tensor([5, 5, 299_999, 5])]),
            torch.tensor([2, 0, 5, 1, 3, 0]),
        )
        _step_both(kernel, ref, kjt)
    _assert_same_weights(kernel, ref)


def test_per_sample_weights_with_gradients_take_the_reference_path(monkeypatch) -> None:
    """The kernel gives per-id weights no gradient; a batch whose weights need one is composed by the
    reference path, so feature processors still learn."""
    tables = _tables("mult", PoolingType.SUM, "per_id")
    kernel = _module(tables, "sgd", True, True, monkeypatch)
    ref = _module(tables, "sgd", True, False, monkeypatch)
    ref.load_state_dict(kernel.state_dict())
    kjt = _batch(True, 4)
    grads = []
    for module in (kernel, ref):
        weights = kjt.weights().clone().requires_grad_()
        features = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)
        module(features).values().pow(2).sum().backward()
        grads.append(weights.grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_pooled_outputs_of_long_bags_take_fbgemm_pooled_lookups(monkeypatch) -> None:
    """Without per-id products, bags of many ids go through FBGEMM's pooled lookups (faster there); bags of
    one id through the kernel; both exact."""
    tables = _tables("add", PoolingType.SUM, "per_id")
    module = _module(tables, "sgd", False, True, monkeypatch)
    ref = _module(tables, "sgd", False, False, monkeypatch)
    ref.load_state_dict(module.state_dict())
    one_id = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c", "d"], torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int64)
    )
    long_bags = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c", "d"], torch.arange(16) % 7, torch.full((4,), 4, dtype=torch.int64)
    )
    for kjt, kernel in ((one_id, True), (long_bags, False)):
        assert module._fused_compose.serves(module._composer.inputs(kjt)) == kernel
        out, expected = module(kjt).values(), ref(kjt).values()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        out.sum().backward()
        expected.sum().backward()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("combine,composition", [("add", "per_id"), ("concat", "per_id"), ("mult", "pooled")])
def test_two_part_outputs_serve_bags_of_any_length(combine: str, composition: str, monkeypatch) -> None:
    """Two-part add, concat and pooled mult stay on the kernel for long bags (faster there than FBGEMM's pooled
    lookups), exactly; a module that also holds a one-part output (a plain table) sends them to FBGEMM."""
    two_part = compress(
        [EmbeddingBagConfig(name="t", num_embeddings=997, embedding_dim=16, feature_names=["a", "b"])],
        QuotientRemainder(collisions=10),
        combine=combine,
        composition=composition,
    )
    plain = [EmbeddingBagConfig(name="p", num_embeddings=7, embedding_dim=4, feature_names=["c"])]
    for tables, keys, kernel in ((two_part, ["a", "b"], True), (two_part + plain, ["a", "b", "c"], False)):
        module = _module(tables, "rowwise_adagrad", False, True, monkeypatch)
        ref = _module(tables, "rowwise_adagrad", False, False, monkeypatch)
        ref.load_state_dict(module.state_dict())
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys, torch.arange(8 * len(keys)) * 5 % 7, torch.full((2 * len(keys),), 4, dtype=torch.int64)
        )
        assert module._fused_compose.serves(module._composer.inputs(kjt)) == kernel
        _step_both(module, ref, kjt)
        _assert_same_weights(module, ref)


def test_learning_rate_changes_reach_the_kernel(monkeypatch) -> None:
    tables = _tables("mult", PoolingType.SUM, "per_id")
    kernel = _module(tables, "rowwise_adagrad", False, True, monkeypatch)
    ref = _module(tables, "rowwise_adagrad", False, False, monkeypatch)
    for module in (kernel, ref):
        for group in module.fused_optimizer().param_groups:
            group["lr"] = 0.01
        module.fused_optimizer().step()  # a fused optimizer's step only pushes the learning rate to FBGEMM
    _train_both(kernel, ref, False, steps=2)
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    for group in kernel.fused_optimizer().param_groups:
        group["lr"] = 0.0
    kernel.fused_optimizer().step()
    kernel(_batch(False, 9)).values().sum().backward()
    for key, value in kernel.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_out_of_range_ids_fail_clearly_without_validation(monkeypatch) -> None:
    tables = _tables("mult", PoolingType.SUM, "per_id")
    module = _module(tables, "sgd", False, True, monkeypatch)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a", "b", "c", "d"], torch.tensor([5000, 1, 2, 3]), torch.tensor([1, 1, 1, 1])
    )
    with pytest.raises(RuntimeError, match="out of range"):
        module(kjt)


def test_path_tables_keep_the_reference_path(monkeypatch) -> None:
    monkeypatch.setenv(ENV_SWITCH, "1")
    (table,) = compress(
        [EmbeddingBagConfig(name="p", num_embeddings=100, embedding_dim=8, feature_names=["a"])],
        QuotientRemainder(collisions=10),
        combine="path",
        path=PathFunction(),
    )
    module = FusedCompositionalEmbeddingBagCollection([table], torch.optim.SGD, {"lr": 0.1})
    assert module._fused_compose is None
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([3, 99]), torch.tensor([1, 1]))
    assert module(kjt).values().shape == (2, 8)


LR = 0.2


def _sharded_kernel_vs_reference(rank: int, world_size: int, sharding: str) -> dict:
    """The same sharded model trained with the kernel on and off; returns output and weight differences and
    whether each lookup used the kernel."""
    import os

    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": LR, "eps": 1e-8}
    runs = {}
    for kernel in (True, False):
        os.environ[ENV_SWITCH] = "1" if kernel else "0"
        sharder = CompositionalEmbeddingBagCollectionSharder(fused_params=fused)
        dmp = shard(reference(False), sharder, sharding, world_size)
        outs = []
        for step in range(3):
            out = dmp(batch(step * world_size + rank, False))
            outs.append(out.detach().clone())
            out.pow(2).sum().backward()
        lookups = dmp.module.ebc._lookups
        runs[kernel] = (outs, dmp.state_dict(), [lk._fused_compose is not None for lk in lookups])
    (outs_k, state_k, used_k), (outs_r, state_r, used_r) = runs[True], runs[False]
    out_diff = max((a - b).abs().max().item() for a, b in zip(outs_k, outs_r))
    weight_diff = 0.0
    for key, value in state_r.items():
        local_k = state_k[key].local_shards() if hasattr(value, "local_shards") else None
        if local_k is None:
            weight_diff = max(weight_diff, (state_k[key] - value).abs().max().item())
            continue
        for a, b in zip(local_k, value.local_shards()):
            weight_diff = max(weight_diff, (a.tensor - b.tensor).abs().max().item())
    return {"out": out_diff, "weights": weight_diff, "kernel": used_k, "reference": used_r}


@pytest.mark.parametrize("sharding", ["tw", "cw"])
def test_sharded_kernel_equals_fbgemm_path(sharding: str) -> None:
    for report in run_ranks(_sharded_kernel_vs_reference, 2, sharding):
        assert any(report["kernel"]) and not any(report["reference"]), report
        assert report["out"] < 1e-5 and report["weights"] < 1e-5, report
