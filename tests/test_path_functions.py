"""Path-based compositional tables (``combine="path"``) against a per-id loop written here.

The reference composes every id on its own from the state dict and the schemes' Python-int definitions:
``x = W[p_1(i)]``, then for each further partition j every layer of class ``p_j(i)``'s function, then pools
(``sum_i w_i x_i``, divided by the bag length for MEAN). Gradients are checked against autograd through
that loop.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_kjt, permuted_qr, random_bags, random_weights, reference_classes, table_grads
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    ExplicitPartitions,
    MixedRadix,
    PathFunction,
    QuotientRemainder,
    compress,
)
from torchrec_qr.modules.path_functions import ClassLayout

D = 8
TABLES = "_embedding_bag_collection.embedding_bags."
PATHS = "_path_functions."
SCHEMES = {
    "qr": lambda n: QuotientRemainder(4),
    "mixed_radix3": lambda n: MixedRadix.balanced(n, 3),
    "crt": lambda n: ChineseRemainder.balanced(n, 2),
    "explicit": lambda n: permuted_qr(n, 5, seed=n),
}
FUNCTIONS = {
    "linear": PathFunction.linear(),
    "linear_bias": PathFunction.linear(bias=True),
    "mlp_relu": PathFunction.mlp((16,)),
    "mlp_tanh2": PathFunction.mlp((12, 6), activation="tanh"),
}
ACT = {"relu": torch.relu, "tanh": torch.tanh}


def path_table(name, n, features, scheme, function, pooling=PoolingType.SUM, dim=D):
    return CompositionalEmbeddingBagConfig(
        name=name,
        num_embeddings=n,
        embedding_dim=dim,
        feature_names=features,
        pooling=pooling,
        partition=SCHEMES[scheme](n),
        combine="path",
        path=FUNCTIONS[function],
    )


def mixed_tables(scheme, function, pooling=PoolingType.SUM):
    """Two path tables (one with two features) around a plain table and an operation-based table."""
    return [
        path_table("big", 60, ["f0", "f1"], scheme, function, pooling),
        EmbeddingBagConfig(name="small", num_embeddings=13, embedding_dim=4, feature_names=["g"]),
        CompositionalEmbeddingBagConfig(
            name="ops",
            num_embeddings=30,
            embedding_dim=D,
            feature_names=["m"],
            partition=QuotientRemainder(6),
            combine="mult",
            pooling=pooling,
        ),
        path_table("mid", 37, ["h"], scheme, function, pooling),
    ]


def feature_sizes(tables):
    return {f: t.num_embeddings for t in tables for f in t.feature_names}


def reference_row(params, table, i):
    """One id's embedding, composed on its own: ``params`` maps state-dict keys to tensors."""
    if not isinstance(table, CompositionalEmbeddingBagConfig):
        return params[f"{TABLES}{table.name}.weight"][i]
    classes = reference_classes(table.partition, i)
    if table.combine == "mult":
        out = params[f"{TABLES}{table.name}__p0.weight"][classes[0]]
        for j in range(1, table.num_partitions):
            out = out * params[f"{TABLES}{table.name}__p{j}.weight"][classes[j]]
        return out
    x = params[f"{TABLES}{table.name}__p0.weight"][classes[0]]
    layers = len(table.path.hidden) + 1
    for j in range(1, table.num_partitions):
        for layer in range(layers):
            x = x @ params[f"{PATHS}{table.name}.p{j}.weights.{layer}"][classes[j]]
            if table.path.bias:
                x = x + params[f"{PATHS}{table.name}.p{j}.biases.{layer}"][classes[j]]
            if layer < layers - 1:
                x = ACT[table.path.activation](x)
    return x


def reference_forward(params, tables, bags, weights):
    cols = []
    for t in tables:
        for f in t.feature_names:
            rows = []
            for b, bag in enumerate(bags[f]):
                acc = torch.zeros(t.embedding_dim)
                for i, x in enumerate(bag):
                    acc = acc + (weights[f][b][i] if weights else 1.0) * reference_row(params, t, x)
                rows.append(acc / len(bag) if t.pooling == PoolingType.MEAN and bag else acc)
            cols.append(torch.stack(rows))
    return torch.cat(cols, dim=1)


# --- the oracle ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling, weighted", [(PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, True)]
)
@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_per_id_loop(scheme, function, pooling, weighted):
    tables = mixed_tables(scheme, function, pooling)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    sd = module.state_dict()
    rng = random.Random(hash((scheme, function, pooling.value, weighted)) % 2**32)
    for batch in (1, 6):
        bags = random_bags(rng, feature_sizes(tables), batch)
        bags["f0"][0] = []  # always an empty bag
        weights = random_weights(rng, bags) if weighted else None
        out = module(make_kjt(bags, weights))
        assert out.keys() == ["f0", "f1", "g", "m", "h"] and out.length_per_key() == [D, D, 4, D, D]
        torch.testing.assert_close(out.values(), reference_forward(sd, tables, bags, weights), atol=1e-6, rtol=1e-5)
    t = tables[0]
    ids = torch.arange(t.num_embeddings)
    expected = torch.stack([reference_row(sd, t, i) for i in range(t.num_embeddings)])
    torch.testing.assert_close(module.embedding_rows("big", ids).detach(), expected, atol=1e-6, rtol=1e-5)


def test_many_classes_few_ids():
    """More classes than ids in the batch (tiles of one row) and classes absent from the batch."""
    t = CompositionalEmbeddingBagConfig(
        name="t",
        num_embeddings=5000,
        embedding_dim=D,
        feature_names=["f"],
        partition=QuotientRemainder(1000),
        combine="path",
        path=PathFunction.mlp((8,)),
    )
    module = CompositionalEmbeddingBagCollection([t])
    bags = {"f": [[4999, 3, 1003], [], [7]]}
    expected = reference_forward(module.state_dict(), [t], bags, None)
    torch.testing.assert_close(module(make_kjt(bags)).values(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_classes, classes", [(3, [2, 0, 2, 2, 1, 2, 2]), (5, [4, 4]), (4, []), (2, [1] * 9)])
def test_class_layout_groups_rows_by_class(num_classes, classes):
    c = torch.tensor(classes, dtype=torch.int64)
    layout = ClassLayout.of(c, num_classes)
    n = len(classes)
    assert layout.length == max(1, -(-n // num_classes))
    assert len(set(layout.positions.tolist())) == n  # every row has its own slot
    tile_of = layout.positions // layout.length
    assert torch.equal(layout.tile_class[tile_of], c)  # in a tile of its class
    assert layout.tile_class.numel() <= n // layout.length + num_classes
    assert torch.equal(layout.tile_class, layout.tile_class.sort().values)


# --- gradients ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("function", ["linear_bias", "mlp_relu", "mlp_tanh2"])
@pytest.mark.parametrize("scheme", ["qr", "mixed_radix3", "explicit"])
def test_gradients_match_autograd_reference(scheme, function, weighted):
    tables = mixed_tables(scheme, function, PoolingType.MEAN)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    leaves = {k: v.clone().requires_grad_(True) for k, v in module.state_dict().items()}
    rng = random.Random(11)
    bags = random_bags(rng, feature_sizes(tables), 8)
    weights = random_weights(rng, bags) if weighted else None
    out = module(make_kjt(bags, weights)).values()
    target = torch.randn(out.shape)
    (out * target).sum().backward()
    expected = reference_forward(leaves, tables, bags, weights)
    torch.testing.assert_close(out.detach(), expected.detach(), atol=1e-6, rtol=1e-5)
    (expected * target).sum().backward()

    got = {f"{TABLES}{name}.weight": g for name, g in table_grads(module).items()}
    got.update({name: p.grad for name, p in module.named_parameters() if name.startswith(PATHS)})
    assert set(got) == set(leaves)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name  # every parameter is used
        torch.testing.assert_close(got[name], leaf.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# --- uniqueness, parameter count, initialization ------------------------------------------------------------


@pytest.mark.parametrize("function", ["linear", "mlp_relu", "mlp_tanh2"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_composed_rows_are_distinct(scheme, function):
    n = 400
    module = CompositionalEmbeddingBagCollection([path_table("t", n, ["f"], scheme, function)])
    rows = module.embedding_rows("t", torch.arange(n))
    assert rows.shape == (n, D)
    assert torch.unique(rows, dim=0).shape[0] == n
    # The table alone is shared: its rows repeat, the functions tell the ids apart.
    stored = module.state_dict()[f"{TABLES}t__p0.weight"]
    assert stored.shape[0] < n


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_count(scheme, function):
    t = path_table("t", 5000, ["f"], scheme, function)
    module = CompositionalEmbeddingBagCollection([t])
    sizes = t.partition.sizes(t.num_embeddings)
    dims = [D, *t.path.hidden, D]
    per_function = sum(i * o + (o if t.path.bias else 0) for i, o in zip(dims[:-1], dims[1:]))
    assert t.path_parameters() == sum(sizes[1:]) * per_function
    assert t.num_parameters() == sizes[0] * D + t.path_parameters()
    assert sum(p.numel() for p in module.parameters()) == t.num_parameters()
    assert [c.name for c in t.sub_table_configs()] == ["t__p0"]  # only partition 1 has a sub-table


@pytest.mark.parametrize("function", ["linear", "linear_bias", "mlp_relu", "mlp_tanh2"])
@pytest.mark.parametrize("scheme", ["qr", "mixed_radix3"])
def test_initialization_matches_torchrec_scale(scheme, function):
    n, dim = 20000, 16
    torch.manual_seed(1)
    module = CompositionalEmbeddingBagCollection([path_table("t", n, ["f"], scheme, function, dim=dim)])
    composed = module.embedding_rows("t", torch.arange(n)).detach()
    plain = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"])]
    )
    plain_std = plain.embedding_bags["t"].weight.detach().std().item()
    assert plain_std == pytest.approx(math.sqrt(1 / n) / math.sqrt(3), rel=0.02)  # U(-s, s)
    assert composed.std().item() == pytest.approx(plain_std, rel=0.3)
    assert abs(composed.mean().item()) < 0.3 * plain_std


# --- configs, state dict, compress, sharding types ------------------------------------------------------------


def _path(**kw):
    kw.setdefault("partition", QuotientRemainder(4))
    return CompositionalEmbeddingBagConfig(
        name="t", num_embeddings=40, embedding_dim=D, feature_names=["f"], combine="path", **kw
    )


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: _path(partition=MixedRadix((40,))), ValueError, "needs k >= 2 partitions"),
        (lambda: _path(partition=ExplicitPartitions((torch.arange(40),))), ValueError, "needs k >= 2"),
        (lambda: _path(composition="pooled"), ValueError, "composition='per_id'"),
        (lambda: _path(sub_dims=[4, 4]), ValueError, "drop sub_dims"),
        (lambda: _path(path="mlp"), TypeError, "path must be a PathFunction"),
        (
            lambda: CompositionalEmbeddingBagConfig(
                name="t",
                num_embeddings=40,
                embedding_dim=D,
                feature_names=["f"],
                partition=QuotientRemainder(4),
                path=PathFunction.linear(),
            ),
            ValueError,
            "only applies to combine='path'",
        ),
        (lambda: PathFunction(kind="conv"), ValueError, r"kind must be one of \('linear', 'mlp'\)"),
        (lambda: PathFunction(kind="linear", hidden=(8,)), ValueError, "use kind='mlp'"),
        (lambda: PathFunction(kind="mlp"), ValueError, "needs hidden sizes"),
        (lambda: PathFunction.mlp((8, 0)), ValueError, "positive ints"),
        (
            lambda: PathFunction.mlp((8,), activation="sigmoid"),
            ValueError,
            r"activation must be one of \('relu', 'tanh'\)",
        ),
    ],
)
def test_bad_configs_say_what_to_do(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_default_function_is_linear_and_hidden_lists_are_accepted():
    assert _path().path == PathFunction(kind="linear", hidden=(), bias=False)
    assert PathFunction(kind="mlp", hidden=[32, 16]).hidden == (32, 16)  # as YAML gives it


def test_state_dict_round_trip():
    tables = mixed_tables("mixed_radix3", "mlp_relu")
    a = CompositionalEmbeddingBagCollection(tables)
    b = CompositionalEmbeddingBagCollection(mixed_tables("mixed_radix3", "mlp_relu"))
    kjt = make_kjt(random_bags(random.Random(5), feature_sizes(tables), 6))
    assert not torch.allclose(a(kjt).values(), b(kjt).values())
    sd = a.state_dict()
    assert {k for k in sd if k.startswith(PATHS)} == {
        f"{PATHS}{t}.p{j}.{kind}.{layer}"
        for t in ("big", "mid")
        for j in (1, 2)
        for kind in ("weights", "biases")
        for layer in (0, 1)
    }
    b.load_state_dict(sd)
    torch.testing.assert_close(a(kjt).values(), b(kjt).values(), atol=0, rtol=0)


def test_reset_parameters_and_meta_device():
    tables = mixed_tables("qr", "mlp_relu")
    module = CompositionalEmbeddingBagCollection(tables)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(7.0)
    module.reset_parameters()
    bounds = FUNCTIONS["mlp_relu"].init_bounds(D)
    for name, p in module.named_parameters():
        if name.startswith(PATHS):
            layer = int(name.rsplit(".", 1)[1])
            limit = 0.0 if ".biases." in name else bounds[layer]
            assert p.abs().max() <= limit, name
    meta = CompositionalEmbeddingBagCollection(mixed_tables("qr", "mlp_relu"), device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_compress_builds_path_tables():
    configs = [
        EmbeddingBagConfig(name=f"t{n}", num_embeddings=n, embedding_dim=D, feature_names=[f"f{n}"]) for n in (10, 5000)
    ]
    out = compress(configs, QuotientRemainder(50), combine="path", threshold=100, path=PathFunction.mlp((16,)))
    assert out[0] == configs[0]
    assert out[1].combine == "path" and out[1].path == PathFunction.mlp((16,))
    assert out[1].num_parameters() == 100 * D + 50 * (D * 16 + 16 + 16 * D + D)
    module = CompositionalEmbeddingBagCollection(out)
    assert module(make_kjt({"f10": [[9]], "f5000": [[4999, 0]]}))["f5000"].shape == (1, D)
    with pytest.raises(ValueError, match="only applies to combine='path'"):
        compress(configs, QuotientRemainder(50), combine="mult", path=PathFunction.linear())
