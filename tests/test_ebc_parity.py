"""Drop-in parity: the behaviours TorchRec's own EmbeddingBagCollection tests assert, run against TorchRec's
EBC and against ours (every table compressed, QR c=2, ``mult``) by one parametrized suite, so drift shows.

Where values are compared, ours is checked against a plain EBC holding its materialized tables.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchrec
from conftest import plain_configs
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import CompositionalEmbeddingBagCollection, QuotientRemainder, compress

Factory = Callable[..., torch.nn.Module]


def _torchrec(tables: list[EmbeddingBagConfig], **kwargs) -> torch.nn.Module:
    return EmbeddingBagCollection(tables, **kwargs)


def _ours(tables: list[EmbeddingBagConfig], **kwargs) -> torch.nn.Module:
    return CompositionalEmbeddingBagCollection(
        compress(tables, QuotientRemainder(collisions=2), combine="mult"), **kwargs
    )


IMPLS = [pytest.param(_torchrec, id="torchrec"), pytest.param(_ours, id="torchrec_qr")]


def _tables(dim: int = 8, **kwargs) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t1", num_embeddings=20, embedding_dim=dim, feature_names=["f1", "f3"], **kwargs),
        EmbeddingBagConfig(name="t2", num_embeddings=11, embedding_dim=dim * 2, feature_names=["f2"], **kwargs),
    ]


def _kjt(weighted: bool = False, device: str = "cpu") -> KeyedJaggedTensor:
    # f1: [0, 1], [2]; f2: [10], []; f3: [3, 4, 19], [5]
    values = torch.tensor([0, 1, 2, 10, 3, 4, 19, 5], device=device)
    lengths = torch.tensor([2, 1, 1, 0, 3, 1], device=device)
    weights = torch.linspace(0.5, 2.0, 8, device=device) if weighted else None
    return KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=values, lengths=lengths, weights=weights)


def _materialized(module: torch.nn.Module, weighted: bool) -> EmbeddingBagCollection:
    """A plain EBC holding the module's logical tables, row for row (our composed rows materialized)."""
    configs = module.embedding_bag_configs()
    plain = plain_configs(configs)
    ref = EmbeddingBagCollection(plain, is_weighted=weighted)
    with torch.no_grad():
        for t in configs:
            rows = (
                module.embedding_rows(t.name, torch.arange(t.num_embeddings))
                if isinstance(module, CompositionalEmbeddingBagCollection)
                else module.embedding_bags[t.name].weight
            )
            ref.embedding_bags[t.name].weight.copy_(rows)
    return ref


@pytest.mark.parametrize("make", IMPLS)
@pytest.mark.parametrize("weighted", [False, True])
def test_keys_shapes_offsets_and_values(make: Factory, weighted: bool) -> None:
    module = make(_tables(), is_weighted=weighted)
    kt = module(_kjt(weighted))
    assert kt.keys() == ["f1", "f3", "f2"]
    assert kt.length_per_key() == [8, 8, 16]
    assert kt.offset_per_key() == [0, 8, 16, 32]
    assert kt.values().shape == (2, 32)
    expected = _materialized(module, weighted)(_kjt(weighted))
    for key in kt.keys():
        torch.testing.assert_close(kt[key], expected[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", IMPLS)
def test_forward_on_meta(make: Factory) -> None:
    module = make(_tables(), device=torch.device("meta"))
    kt = module(_kjt(device="meta"))
    assert kt.values().device.type == "meta" and kt.values().shape == (2, 32)


@pytest.mark.parametrize("make", IMPLS)
def test_device_from_context_manager(make: Factory) -> None:
    with torch.device("meta"):
        module = make(_tables())
    assert all(p.device.type == "meta" for p in module.parameters())
    assert module.device.type == "meta"


@pytest.mark.parametrize("make", IMPLS)
def test_duplicate_table_names_rejected(make: Factory) -> None:
    tables = _tables()
    tables[1].name = "t1"
    with pytest.raises(ValueError, match="[Dd]uplicate table name"):
        make(tables)


@pytest.mark.parametrize("make", IMPLS)
def test_fp16_tables_are_stored_in_fp16(make: Factory) -> None:
    module = make(_tables(data_type=DataType.FP16))
    weights = [v for k, v in module.state_dict().items() if k.endswith(".weight")]
    assert weights and all(w.dtype == torch.float16 for w in weights)
    assert module(_kjt()).values().dtype == torch.float32


@pytest.mark.parametrize("make", IMPLS)
def test_fx_symbolic_trace_of_dlrm(make: Factory) -> None:
    tables = _tables(dim=8)
    tables[1].embedding_dim = 8
    torch.manual_seed(0)
    model = DLRM(make(tables), dense_in_features=3, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    dense = torch.randn(2, 3)
    traced = torchrec.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(dense, _kjt()), model(dense, _kjt()), rtol=0, atol=0)
    traced(dense, _kjt()).sum().backward()
    assert all(p.grad is not None for p in model.over_arch.parameters())


@pytest.mark.parametrize("make", IMPLS)
def test_fx_trace_then_torchscript(make: Factory) -> None:
    module = make(_tables())
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(module))
    torch.testing.assert_close(scripted(_kjt()).values(), module(_kjt()).values())


@pytest.mark.parametrize("make", IMPLS)
def test_shared_feature_across_tables(make: Factory) -> None:
    tables = [
        EmbeddingBagConfig(name="t1", num_embeddings=20, embedding_dim=8, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", num_embeddings=20, embedding_dim=4, feature_names=["f1"]),
    ]
    module = make(tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
    kt = module(kjt)
    assert kt.keys() == ["f1@t1", "f1@t2"]
    expected = _materialized(module, False)(kjt)
    for key in kt.keys():
        torch.testing.assert_close(kt[key], expected[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", IMPLS)
def test_variable_batch_per_feature(make: Factory) -> None:
    tables = [
        EmbeddingBagConfig(name="t1", num_embeddings=20, embedding_dim=4, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", num_embeddings=20, embedding_dim=4, feature_names=["f2"]),
    ]
    module = make(tables, is_weighted=True)
    # f1: 2 bags [1, 2], [3]; f2: 3 bags [4], [], [5, 6, 19]; samples take f1's bags 1, 0, 1.
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 19]),
        lengths=torch.tensor([2, 1, 1, 0, 3]),
        weights=torch.linspace(0.5, 2.0, 7),
        stride_per_key_per_rank=[[2], [3]],
        inverse_indices=(["f1", "f2"], torch.tensor([[1, 0, 1], [0, 1, 2]])),
    )
    kt = module(kjt)
    assert kt.values().shape == (3, 8)
    expected = _materialized(module, True)(kjt)
    torch.testing.assert_close(kt.values(), expected.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", IMPLS)
@pytest.mark.parametrize("one_hot", [True, False])
def test_per_sample_weight_gradients(make: Factory, one_hot: bool) -> None:
    """Feature processors learn per-id weights: their gradient flows through the collection."""
    module = make(_tables(), is_weighted=True)
    kjt = _kjt(weighted=True)
    if one_hot:
        kjt = KeyedJaggedTensor(
            keys=kjt.keys(),
            values=torch.tensor([0, 2, 10, 10, 3, 5]),
            lengths=torch.ones(6, dtype=torch.int64),
            weights=torch.linspace(0.5, 2.0, 6),
        )
    grads = []
    for m in (module, _materialized(module, True)):
        weights = kjt.weights().clone().requires_grad_()
        features = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)
        kt = m(features)
        sum((kt[k] * (i + 1)).sum() for i, k in enumerate(sorted(kt.keys()))).backward()
        grads.append(weights.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
