"""The serving path (``ScriptedComposition``): ``torch.jit.script``, fx + TorchScript, save/load and
``torch.export`` give the eager module's outputs, and both match a per-bag reference built from
``embedding_rows`` and the sub-table weights (independent of either composition path).

No ``from __future__ import annotations``: fx copies ``forward`` annotations into the code TorchScript compiles.
"""

import random

import pytest
import torch
import torchrec
from conftest import make_kjt, permuted_qr, random_bags, random_weights
from torch.export import Dim
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    MixedRadix,
    QuotientRemainder,
)
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.modules.fused_compositional_embedding_modules import FusedCompositionalEmbeddingBagCollection
from torchrec_qr.modules.partitions import Partition
from torchrec_qr.modules.path_functions import PathFunction

DIM = 8
# Features and their id ranges: f_c feeds two tables (outputs f_c@t_qr, f_c@t_mr) unless t_mr reads f_m
# (DLRM takes no shared features), so ids fit the smaller table.
ID_RANGE = {"f_a": 7, "f_b": 50, "f_c": 40, "f_d": 30, "f_e": 24, "f_m": 40}
SHARED_KEYS = ["f_a", "f_b", "f_c@t_qr", "f_c@t_mr", "f_d", "f_e"]


def _tables(combine: str, composition: str, pooling: str, shared: bool = True) -> list[EmbeddingBagConfig]:
    """A plain table and one compositional table per partition scheme; ``pooling="mixed"`` alternates
    SUM and MEAN (two storage kernels)."""
    kinds = [PoolingType.SUM, PoolingType.MEAN] if pooling == "mixed" else [PoolingType[pooling]] * 2
    schemes = [
        ("t_qr", 50, ["f_b", "f_c"], QuotientRemainder(collisions=7)),
        ("t_mr", 40, ["f_c" if shared else "f_m"], MixedRadix((3, 4, 4))),
        ("t_crt", 30, ["f_d"], ChineseRemainder((5, 7))),
        ("t_exp", 24, ["f_e"], permuted_qr(24, 5)),
    ]
    tables: list[EmbeddingBagConfig] = [
        EmbeddingBagConfig(name="t_plain", num_embeddings=7, embedding_dim=DIM, feature_names=["f_a"], pooling=kinds[0])
    ]
    for i, (name, rows, features, scheme) in enumerate(schemes):
        tables.append(
            CompositionalEmbeddingBagConfig(
                name=name,
                num_embeddings=rows,
                embedding_dim=DIM,
                feature_names=features,
                pooling=kinds[(i + 1) % 2],
                partition=scheme,
                combine=combine,
                composition=composition,
            )
        )
    return tables


def _batch(seed: int, batch: int, weighted: bool) -> KeyedJaggedTensor:
    rng = random.Random(seed)
    bags = random_bags(rng, ID_RANGE, batch)  # multi-id bags, about one in five empty
    return make_kjt(bags, random_weights(rng, bags) if weighted else None)


def _reference(module: CompositionalEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    """Each output key's ``[B, D]`` bag by bag: ``sum_i w_i x_i`` (``/ L`` for MEAN) with ``x_i`` the
    composed row; pooled-mode ``mult``: the product of each sub-table's pool, weights in the first only."""
    jts = kjt.to_dict()
    sub_weights = module._embedding_bag_collection.table_weights()
    names = iter(module._embedding_names)
    out: dict[str, torch.Tensor] = {}
    for t in module.embedding_bag_configs():
        pooled_mult = isinstance(t, CompositionalEmbeddingBagConfig) and t.combine == "mult" and not t.per_id
        for f in t.feature_names:
            jt, rows = jts[f], []
            for ids, w in zip(jt.to_dense(), jt.to_dense_weights() or [None] * len(jt.lengths())):
                w = torch.ones(len(ids)) if w is None else w
                if pooled_mult:
                    classes = t.partition.indices(ids)
                    parts = [
                        (sub_weights[sub.name][classes[j]] * (w if j == 0 else torch.ones_like(w))[:, None]).sum(0)
                        for j, sub in enumerate(t.sub_table_configs())
                    ]
                    if t.pooling == PoolingType.MEAN:
                        parts = [p / max(len(ids), 1) for p in parts]
                    bag = torch.stack(parts).prod(0)
                else:
                    bag = (module.embedding_rows(t.name, ids) * w[:, None]).sum(0)
                    if t.pooling == PoolingType.MEAN:
                        bag = bag / max(len(ids), 1)
                rows.append(bag)
            out[next(names)] = torch.stack(rows)
    return out


def _dlrm(module: torch.nn.Module) -> DLRM:
    return DLRM(module, dense_in_features=3, dense_arch_layer_sizes=[DIM], over_arch_layer_sizes=[4, 1])


class _Model(torch.nn.Module):
    """A model holding the collection and reading its output by key (as DLRM does, shared features too)."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.top = torch.nn.Linear(len(SHARED_KEYS) * DIM, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt)
        return self.top(torch.cat([kt[k] for k in SHARED_KEYS], dim=1))


CONFIGS = [
    pytest.param(
        combine, composition, pooling, weighted, id=f"{combine}-{composition}-{pooling}-{'w' if weighted else 'u'}"
    )
    for combine, composition in [("mult", "per_id"), ("mult", "pooled"), ("add", "per_id"), ("concat", "per_id")]
    for pooling, weighted in [("SUM", False), ("MEAN", False), ("MEAN", True), ("mixed", True)]
]


@pytest.mark.parametrize("combine,composition,pooling,weighted", CONFIGS)
def test_script_fx_and_save_load_equal_eager(
    combine: str, composition: str, pooling: str, weighted: bool, tmp_path
) -> None:
    module = CompositionalEmbeddingBagCollection(_tables(combine, composition, pooling), is_weighted=weighted)
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    model = _Model(module)
    traced = torch.jit.script(torchrec.fx.symbolic_trace(model))
    for seed, batch in [(0, 6), (1, 3)]:  # one compiled module serves every batch size
        kjt = _batch(seed, batch, weighted)
        eager = module(kjt)
        assert eager.keys() == SHARED_KEYS
        for key, expected in _reference(module, kjt).items():
            torch.testing.assert_close(eager[key], expected, rtol=1e-5, atol=1e-6)
        for served in (scripted(kjt), loaded(kjt)):
            assert served.keys() == eager.keys() and served.length_per_key() == eager.length_per_key()
            torch.testing.assert_close(served.values(), eager.values(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traced(kjt), model(kjt), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "combine,composition,pooling,weighted",
    [
        ("mult", "per_id", "mixed", True),
        ("mult", "pooled", "MEAN", True),
        ("concat", "per_id", "SUM", False),
    ],
)
def test_export_with_dynamic_batch_equals_eager(combine: str, composition: str, pooling: str, weighted: bool) -> None:
    module = CompositionalEmbeddingBagCollection(
        _tables(combine, composition, pooling, shared=False), is_weighted=weighted
    )
    model = _dlrm(module)
    example = (torch.randn(4, 3), _batch(0, 4, weighted))
    # KJT leaves: values, weights, lengths, offsets, stride_per_key_per_rank, inverse_indices.
    kjt_shapes = [{0: Dim.AUTO}, {0: Dim.AUTO} if weighted else None, {0: Dim.AUTO}, None, None, None]
    exported = torch.export.export(model, example, dynamic_shapes=({0: Dim.AUTO}, kjt_shapes), strict=False)
    for seed, batch in [(1, 4), (2, 7), (3, 2)]:
        dense, kjt = torch.randn(batch, 3), _batch(seed, batch, weighted)
        torch.testing.assert_close(exported.module()(dense, kjt), model(dense, kjt), rtol=1e-6, atol=1e-6)


def test_indexers_match_indices() -> None:
    ids = torch.cat([torch.arange(200), torch.randint(0, 2**40, (100,))])
    for scheme in [
        QuotientRemainder(collisions=7),
        MixedRadix((3, 4, 4)),
        ChineseRemainder((5, 7, 11)),
        QuotientRemainder(collisions=2**20),
        MixedRadix((2**15, 2**15, 2**15)),
    ]:
        indexer = torch.jit.script(scheme.indexer())
        torch.testing.assert_close(indexer(ids), scheme.indices(ids), rtol=0, atol=0)
    explicit = permuted_qr(300, 7)
    small = torch.randint(0, 300, (50,))
    torch.testing.assert_close(torch.jit.script(explicit.indexer())(small), explicit.indices(small), rtol=0, atol=0)


def test_fused_storage_scripts() -> None:
    tables = _tables("mult", "per_id", "mixed")
    module = FusedCompositionalEmbeddingBagCollection(tables, torch.optim.SGD, {"lr": 0.1})
    kjt = _batch(0, 5, False)
    torch.testing.assert_close(torch.jit.script(module)(kjt).values(), module(kjt).values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling,weighted", [("SUM", False), ("MEAN", True)])
def test_path_tables_serve(pooling: str, weighted: bool, tmp_path) -> None:
    kind = PoolingType[pooling]
    tables = [
        EmbeddingBagConfig(name="t_plain", num_embeddings=7, embedding_dim=DIM, feature_names=["f_a"], pooling=kind),
        CompositionalEmbeddingBagConfig(
            name="t_lin",
            num_embeddings=50,
            embedding_dim=DIM,
            feature_names=["f_b", "f_c"],
            pooling=kind,
            partition=QuotientRemainder(7),
            combine="path",
        ),
        CompositionalEmbeddingBagConfig(
            name="t_mlp",
            num_embeddings=30,
            embedding_dim=DIM,
            feature_names=["f_d"],
            pooling=kind,
            partition=MixedRadix((3, 3, 4)),
            combine="path",
            path=PathFunction.mlp((5,), activation="tanh"),
        ),
        CompositionalEmbeddingBagConfig(
            name="t_qr",
            num_embeddings=24,
            embedding_dim=DIM,
            feature_names=["f_e"],
            pooling=kind,
            partition=QuotientRemainder(5),
            combine="mult",
        ),
    ]
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    model = _dlrm(module)
    traced = torch.jit.script(torchrec.fx.symbolic_trace(model))
    kjt_shapes = [{0: Dim.AUTO}, {0: Dim.AUTO} if weighted else None, {0: Dim.AUTO}, None, None, None]
    exported = torch.export.export(
        model, (torch.randn(4, 3), _batch(0, 4, weighted)), dynamic_shapes=({0: Dim.AUTO}, kjt_shapes), strict=False
    )
    for seed, batch in [(1, 6), (2, 3)]:
        kjt, dense = _batch(seed, batch, weighted), torch.randn(batch, 3)
        eager = module(kjt)
        for key, expected in _reference(module, kjt).items():
            torch.testing.assert_close(eager[key], expected, rtol=1e-5, atol=1e-6)
        for served in (scripted(kjt), loaded(kjt)):
            torch.testing.assert_close(served.values(), eager.values(), rtol=1e-6, atol=1e-6)
        for served_model in (traced, exported.module()):
            torch.testing.assert_close(served_model(dense, kjt), model(dense, kjt), rtol=1e-6, atol=1e-6)


class _Reversed(Partition):
    """QR of ``N - 1 - id``: a scheme with no scriptable indexer."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def num_partitions(self) -> int:
        return 2

    def sizes(self, num_embeddings: int) -> list[int]:
        return [-(-num_embeddings // 4), 4]

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        return QuotientRemainder(4).indices(self.n - 1 - ids)


def test_scheme_without_indexer_serves_eager_and_rejects_scripting() -> None:
    tables = [
        CompositionalEmbeddingBagConfig(
            name="t", num_embeddings=20, embedding_dim=DIM, feature_names=["f"], partition=_Reversed(20)
        )
    ]
    module = CompositionalEmbeddingBagCollection(tables)
    assert module(make_kjt({"f": [[1, 19], [0]]})).values().shape == (2, DIM)
    with pytest.raises(TypeError, match=r"_Reversed has no scriptable indexer: implement _Reversed.indexer\(\)"):
        torch.jit.script(module)


def test_scripted_rejects_variable_batch_and_missing_weights() -> None:
    module = torch.jit.script(CompositionalEmbeddingBagCollection(_tables("mult", "per_id", "SUM"), is_weighted=True))
    with pytest.raises(torch.jit.Error, match="no weights"):
        module(_batch(0, 3, False))
    keys = list(ID_RANGE)  # the first feature has two bags, the others one
    vbe = KeyedJaggedTensor(
        keys=keys,
        values=torch.arange(len(keys) + 1),
        lengths=torch.ones(len(keys) + 1, dtype=torch.int64),
        weights=torch.ones(len(keys) + 1),
        stride_per_key_per_rank=[[2]] + [[1]] * (len(keys) - 1),
        inverse_indices=(keys, torch.tensor([[0, 1]] + [[0, 0]] * (len(keys) - 1))),
    )
    with pytest.raises(torch.jit.Error, match="variable-batch"):
        module(vbe)


def test_serving_path_adds_no_state() -> None:
    """The indexers' buffers (explicit class maps) stay out of the state dict: checkpoints are unchanged."""
    module = CompositionalEmbeddingBagCollection(_tables("mult", "per_id", "SUM"))
    assert module._scripted.indexers[-1].class_maps.shape == (2, 24)
    keys = set(module.state_dict())
    assert keys == {
        f"_embedding_bag_collection.embedding_bags.{name}.weight"
        for name in module._embedding_bag_collection.table_weights()
    }


def test_empty_features_and_fp16_tables_script() -> None:
    """A feature with only empty bags (and a batch with none at all) composes to zeros; FP16 sub-tables serve."""
    tables = _tables("mult", "per_id", "mixed")
    for t in tables:
        t.data_type = DataType.FP16
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=True)
    scripted = torch.jit.script(module)
    rng = random.Random(0)
    bags = random_bags(rng, ID_RANGE, 4)
    bags["f_b"] = [[], [], [], []]
    for kjt in (
        make_kjt(bags, random_weights(rng, bags)),
        make_kjt({f: [[]] * 3 for f in ID_RANGE}, {f: [[]] * 3 for f in ID_RANGE}),
    ):
        eager = module(kjt)
        torch.testing.assert_close(scripted(kjt).values(), eager.values(), rtol=1e-6, atol=1e-6)
        assert not eager["f_b"].any()
