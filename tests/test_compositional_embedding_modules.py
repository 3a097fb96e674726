"""CompositionalEmbeddingBagCollection against independent references.

The oracle: materialize each logical table (every id's composed row), load it into a plain TorchRec
``EmbeddingBagCollection`` and compare pooled outputs; the materialized rows are themselves checked against a
composition written here from the sub-tables in the state dict and the schemes' Python-int definitions.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_kjt, permuted_qr, plain_configs, random_bags, random_weights, reference_classes, table_grads
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    MixedRadix,
    QuotientRemainder,
    compress,
)

D = 8
SCHEMES = {
    "qr": lambda n: QuotientRemainder(4),
    "mixed_radix3": lambda n: MixedRadix.balanced(n, 3),
    "crt": lambda n: ChineseRemainder.balanced(n, 2),
    "explicit": lambda n: permuted_qr(n, 5, seed=n),
}
UNEVEN = {2: [3, 5], 3: [1, 2, 5]}  # concat sub_dims summing to D
COMBINES = ["mult", "add", "concat", "concat_uneven"]
PREFIX = "_embedding_bag_collection.embedding_bags."


def comp_table(name, n, features, scheme, combine, pooling=PoolingType.SUM, composition="per_id", dim=D):
    partition = SCHEMES[scheme](n)
    sub_dims = None
    if combine == "concat_uneven":
        combine, sub_dims = "concat", UNEVEN[partition.num_partitions]
    return CompositionalEmbeddingBagConfig(
        name=name,
        num_embeddings=n,
        embedding_dim=dim,
        feature_names=features,
        pooling=pooling,
        partition=partition,
        combine=combine,
        sub_dims=sub_dims,
        composition=composition,
    )


def mixed_tables(scheme, combine, pooling_big=PoolingType.SUM, pooling_mid=PoolingType.SUM, composition="per_id"):
    """Two compositional tables (one with two features) around a plain table with its own pooling."""
    return [
        comp_table("big", 60, ["f0", "f1"], scheme, combine, pooling_big, composition),
        EmbeddingBagConfig(name="small", num_embeddings=13, embedding_dim=4, feature_names=["g"]),
        comp_table("mid", 37, ["h"], scheme, combine, pooling_mid, composition),
    ]


def feature_sizes(tables):
    return {f: t.num_embeddings for t in tables for f in t.feature_names}


def combine_rows(op, parts):
    if op == "concat":
        return torch.cat(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out * p if op == "mult" else out + p
    return out


def reference_table(sd, table, leaves=None):
    """``[N, D]`` composed rows from the sub-tables (``leaves`` if given, else the state dict), Python loops."""
    src = leaves if leaves is not None else {k[len(PREFIX) : -len(".weight")]: v for k, v in sd.items()}
    if not isinstance(table, CompositionalEmbeddingBagConfig):
        return src[table.name]
    subs = [src[f"{table.name}__p{j}"] for j in range(table.num_partitions)]
    rows = []
    for i in range(table.num_embeddings):
        classes = reference_classes(table.partition, i)
        rows.append(combine_rows(table.combine, [subs[j][c] for j, c in enumerate(classes)]))
    return torch.stack(rows)


def reference_pool(rows, bags, weights, mean):
    """``[B, D]``: ``sum_i w_i x_i`` per bag, divided by the bag length for MEAN (empty bag: zeros)."""
    out = []
    for b, bag in enumerate(bags):
        acc = torch.zeros(rows.shape[1], dtype=rows.dtype)
        for i, x in enumerate(bag):
            acc = acc + (weights[b][i] if weights is not None else 1.0) * rows[x]
        out.append(acc / len(bag) if mean and bag else acc)
    return torch.stack(out)


def reference_forward(tables, full, bags, weights):
    return torch.cat(
        [
            reference_pool(full[t.name], bags[f], weights[f] if weights else None, t.pooling == PoolingType.MEAN)
            for t in tables
            for f in t.feature_names
        ],
        dim=1,
    )


def materialize(module):
    return {
        t.name: module.embedding_rows(t.name, torch.arange(t.num_embeddings)).detach()
        for t in module.embedding_bag_configs()
    }


def full_table_ebc(tables, full, weighted):
    plain = plain_configs(tables)
    ebc = EmbeddingBagCollection(plain, is_weighted=weighted)
    ebc.load_state_dict({f"embedding_bags.{name}.weight": w for name, w in full.items()})
    return ebc


# --- the oracle ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_full_table_ebc(scheme, combine, pooling, weighted):
    tables = mixed_tables(scheme, combine, pooling, pooling)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    sd = module.state_dict()
    full = materialize(module)
    for t in tables:  # embedding_rows agrees with a composition from the definitions
        torch.testing.assert_close(full[t.name], reference_table(sd, t), atol=0, rtol=0)
    use_ebc = not (weighted and pooling == PoolingType.MEAN)  # nn.EmbeddingBag has no weighted MEAN
    ebc = full_table_ebc(tables, full, weighted) if use_ebc else None
    rng = random.Random(hash((scheme, combine, pooling.value, weighted)) % 2**32)
    for batch in (1, 5, 8):
        bags = random_bags(rng, feature_sizes(tables), batch)
        bags["f0"][0] = []  # always at least one empty bag
        weights = random_weights(rng, bags) if weighted else None
        kjt = make_kjt(bags, weights)
        out = module(kjt)
        expected = reference_forward(tables, full, bags, weights)
        torch.testing.assert_close(out.values(), expected, atol=1e-6, rtol=1e-5)
        if ebc is not None:
            ref = ebc(kjt)
            assert out.keys() == ref.keys() == ["f0", "f1", "g", "h"]
            assert out.length_per_key() == ref.length_per_key() == [D, D, 4, D]
            assert out.offset_per_key() == ref.offset_per_key()
            torch.testing.assert_close(out.values(), ref.values(), atol=1e-6, rtol=1e-5)
            for key, value in ref.to_dict().items():
                torch.testing.assert_close(out[key], value, atol=1e-6, rtol=1e-5)


def test_large_ids_are_exact():
    """Ids past float32 precision get their own rows (the float-division reference collides 2**24, 2**24+1)."""
    c = 2**16
    table = CompositionalEmbeddingBagConfig(
        name="t", num_embeddings=2**32, embedding_dim=4, feature_names=["f"], partition=QuotientRemainder(c)
    )
    module = CompositionalEmbeddingBagCollection([table])
    sd = module.state_dict()
    q, r = sd[PREFIX + "t__p0.weight"], sd[PREFIX + "t__p1.weight"]
    ids = [2**24, 2**24 + 1, 2**32 - 1, 0, 3 * c + 7]
    out = module(make_kjt({"f": [[i] for i in ids]})).values()
    expected = torch.stack([q[i // c] * r[i % c] for i in ids])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not torch.equal(out[0], out[1])


# --- composition="pooled" ---------------------------------------------------------------------------------------


def pooled_reference(table, sd, bags, weights, mean):
    """prod_j pool_j: each sub-table pooled over the bag's classes, then multiplied; per-id weights weight
    the first sub-table's pool only (a one-id bag is then w * x, as per_id gives)."""
    subs = [sd[PREFIX + f"{table.name}__p{j}.weight"] for j in range(table.num_partitions)]
    out = []
    for b, bag in enumerate(bags):
        prod = torch.ones(table.embedding_dim)
        for j, sub in enumerate(subs):
            acc = torch.zeros(table.embedding_dim)
            for i, x in enumerate(bag):
                acc = (
                    acc + (weights[b][i] if weights and j == 0 else 1.0) * sub[reference_classes(table.partition, x)[j]]
                )
            prod = prod * (acc / len(bag) if mean and bag else acc)
        out.append(prod)
    return torch.stack(out)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_pooled_mult(scheme, pooling, weighted):
    pooled = CompositionalEmbeddingBagCollection(
        mixed_tables(scheme, "mult", pooling, pooling, composition="pooled"), is_weighted=weighted
    )
    per_id = CompositionalEmbeddingBagCollection(mixed_tables(scheme, "mult", pooling, pooling), is_weighted=weighted)
    sd = pooled.state_dict()
    per_id.load_state_dict(sd)
    tables = pooled.embedding_bag_configs()
    rng = random.Random(7)
    multi = {
        f: [[rng.randrange(n) for _ in range(rng.randint(2, 4))] for _ in range(6)]
        for f, n in feature_sizes(tables).items()
    }
    one = {f: [[rng.randrange(n)] if b % 3 else [] for b in range(6)] for f, n in feature_sizes(tables).items()}
    for bags, same in ((multi, False), (one, True)):
        weights = random_weights(rng, bags) if weighted else None
        kjt = make_kjt(bags, weights)
        out = pooled(kjt)
        mean = pooling == PoolingType.MEAN
        for t in tables:
            if isinstance(t, CompositionalEmbeddingBagConfig):
                for f in t.feature_names:
                    torch.testing.assert_close(
                        out[f], pooled_reference(t, sd, bags[f], weights and weights[f], mean), atol=1e-6, rtol=1e-5
                    )
        exact = per_id(kjt)
        if same:
            torch.testing.assert_close(out.values(), exact.values(), atol=1e-6, rtol=1e-5)
        else:
            for f in ("f0", "f1", "h"):
                assert not torch.allclose(out[f], exact[f], atol=1e-4), f
            torch.testing.assert_close(out["g"], exact["g"])  # the plain table is unaffected


@pytest.mark.parametrize("combine", ["add", "concat"])
def test_pooled_equals_per_id_for_linear_ops(combine):
    a = CompositionalEmbeddingBagCollection(mixed_tables("qr", combine, composition="pooled"))
    b = CompositionalEmbeddingBagCollection(mixed_tables("qr", combine))
    b.load_state_dict(a.state_dict())
    kjt = make_kjt(random_bags(random.Random(3), feature_sizes(a.embedding_bag_configs()), 8))
    torch.testing.assert_close(a(kjt).values(), b(kjt).values(), atol=1e-6, rtol=1e-5)


# --- gradients ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("combine", ["mult", "add", "concat_uneven"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradients_match_autograd_reference(scheme, combine, weighted):
    tables = mixed_tables(scheme, combine, pooling_big=PoolingType.MEAN, pooling_mid=PoolingType.SUM)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    sd = module.state_dict()
    rng = random.Random(11)
    bags = random_bags(rng, feature_sizes(tables), 8)
    weights = random_weights(rng, bags) if weighted else None
    out = module(make_kjt(bags, weights)).values()
    target = torch.randn(out.shape)
    (out * target).sum().backward()
    got = table_grads(module)

    leaves = {k[len(PREFIX) : -len(".weight")]: v.clone().requires_grad_(True) for k, v in sd.items()}
    cols = []
    for t in tables:
        for f in t.feature_names:
            b = bags[f]
            rows = []
            for bi, bag in enumerate(b):
                acc = torch.zeros(t.embedding_dim)
                for i, x in enumerate(bag):
                    if isinstance(t, CompositionalEmbeddingBagConfig):
                        classes = reference_classes(t.partition, x)
                        row = combine_rows(t.combine, [leaves[f"{t.name}__p{j}"][c] for j, c in enumerate(classes)])
                    else:
                        row = leaves[t.name][x]
                    acc = acc + (weights[f][bi][i] if weighted else 1.0) * row
                rows.append(acc / len(bag) if t.pooling == PoolingType.MEAN and bag else acc)
            cols.append(torch.stack(rows))
    expected_out = torch.cat(cols, dim=1)
    torch.testing.assert_close(out.detach(), expected_out.detach(), atol=1e-6, rtol=1e-5)
    (expected_out * target).sum().backward()

    assert set(got) == set(leaves)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name  # every sub-table is used
        torch.testing.assert_close(got[name], leaf.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# --- uniqueness, parameter count, initialization ------------------------------------------------------------


@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_composed_rows_are_distinct(scheme, combine):
    n = 300
    module = CompositionalEmbeddingBagCollection([comp_table("t", n, ["f"], scheme, combine)])
    rows = module.embedding_rows("t", torch.arange(n))
    assert rows.shape == (n, D)
    assert torch.unique(rows, dim=0).shape[0] == n


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_count(scheme, combine):
    tables = mixed_tables(scheme, combine) + [comp_table("huge", 5000, ["u"], scheme, combine)]
    module = CompositionalEmbeddingBagCollection(tables)
    expected = 0
    for t in tables:
        if not isinstance(t, CompositionalEmbeddingBagConfig):
            expected += t.num_embeddings * t.embedding_dim
            continue
        # |P_j| = number of classes partition j uses on [0, N); D_j = the sub-table width.
        classes = [reference_classes(t.partition, i) for i in range(t.num_embeddings)]
        dims = t.sub_dims if t.combine == "concat" else [D] * t.num_partitions
        n_params = sum((1 + max(c[j] for c in classes)) * dims[j] for j in range(t.num_partitions))
        assert t.num_parameters() == n_params
        expected += n_params
    assert sum(p.numel() for p in module.parameters()) == expected
    assert tables[-1].num_parameters() < 5000 * D // 2


@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
@pytest.mark.parametrize("scheme", ["qr", "mixed_radix3", "crt"])
def test_initialization_matches_torchrec_scale(scheme, combine):
    n, dim = 20000, 16
    module = CompositionalEmbeddingBagCollection([comp_table("t", n, ["f"], scheme, combine, dim=dim)])
    composed = module.embedding_rows("t", torch.arange(n)).detach()
    plain = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"])]
    )
    plain_std = plain.embedding_bags["t"].weight.detach().std().item()
    s = EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim).get_weight_init_max()
    assert s == pytest.approx(math.sqrt(1 / n))
    assert plain_std == pytest.approx(s / math.sqrt(3), rel=0.02)  # U(-s, s)
    assert composed.std().item() == pytest.approx(plain_std, rel=0.25)
    assert abs(composed.mean().item()) < 0.3 * plain_std


# --- state dict, meta device, reset, compress ------------------------------------------------------------------


def test_state_dict_round_trip():
    tables = mixed_tables("mixed_radix3", "mult", PoolingType.MEAN)
    a = CompositionalEmbeddingBagCollection(tables)
    b = CompositionalEmbeddingBagCollection(mixed_tables("mixed_radix3", "mult", PoolingType.MEAN))
    kjt = make_kjt(random_bags(random.Random(5), feature_sizes(tables), 6))
    assert not torch.allclose(a(kjt).values(), b(kjt).values())
    sd = a.state_dict()
    assert set(sd) == {
        PREFIX + n + ".weight" for n in ["big__p0", "big__p1", "big__p2", "small", "mid__p0", "mid__p1", "mid__p2"]
    }
    b.load_state_dict(sd)
    torch.testing.assert_close(a(kjt).values(), b(kjt).values(), atol=0, rtol=0)
    for name, w in b.state_dict().items():
        torch.testing.assert_close(w, sd[name], atol=0, rtol=0)


def test_meta_device_allocates_nothing():
    tables = [
        CompositionalEmbeddingBagConfig(
            name="c", num_embeddings=10**12, embedding_dim=64, feature_names=["a"], partition=QuotientRemainder(10**6)
        ),
        EmbeddingBagConfig(name="p", num_embeddings=10**11, embedding_dim=64, feature_names=["b"]),  # 25 TB dense
    ]
    module = CompositionalEmbeddingBagCollection(tables, device="meta")
    assert module.device.type == "meta"
    assert all(p.device.type == "meta" for p in module.parameters())
    assert module.embedding_bag_configs() == tables
    with pytest.raises(RuntimeError, match="meta"):
        module(make_kjt({"a": [[1]], "b": [[2]]}))


def test_reset_parameters_on_cpu():
    tables = mixed_tables("qr", "concat")
    module = CompositionalEmbeddingBagCollection(tables)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    module.reset_parameters()
    sd = module.state_dict()
    for t in tables:
        names = (
            [t.name] if not isinstance(t, CompositionalEmbeddingBagConfig) else [f"{t.name}__p{j}" for j in range(2)]
        )
        bound = math.sqrt(1 / t.num_embeddings)  # plain and concat sub-tables: TorchRec's default bound
        for name in names:
            w = sd[PREFIX + name + ".weight"]
            assert w.abs().max() <= bound and w.abs().max() > bound / 2 and w.std() > 0, name


def test_compress_threshold_and_factory():
    configs = [
        EmbeddingBagConfig(
            name=f"t{n}",
            num_embeddings=n,
            embedding_dim=D,
            feature_names=[f"f{n}"],
            pooling=PoolingType.MEAN if n == 5000 else PoolingType.SUM,
        )
        for n in (10, 100, 5000, 70000)
    ]
    seen = []

    def factory(n):
        seen.append(n)
        return MixedRadix.balanced(n, 3)

    out = compress(configs, partition=factory, threshold=100, combine="add")
    assert seen == [5000, 70000]
    assert [type(c) for c in out[:2]] == [EmbeddingBagConfig, EmbeddingBagConfig] and out[:2] == configs[:2]
    for c, orig in zip(out[2:], configs[2:]):
        assert isinstance(c, CompositionalEmbeddingBagConfig)
        assert (c.name, c.num_embeddings, c.embedding_dim, c.feature_names, c.pooling, c.combine) == (
            orig.name,
            orig.num_embeddings,
            orig.embedding_dim,
            orig.feature_names,
            orig.pooling,
            "add",
        )
        assert c.partition == MixedRadix.balanced(c.num_embeddings, 3)  # the factory's scheme for this size
    assert compress(configs, QuotientRemainder(4), threshold=10**6) == configs  # nothing above threshold
    # The compressed collection is a drop-in: same output keys and dims as the plain one.
    module = CompositionalEmbeddingBagCollection(out)
    kjt = make_kjt({f"f{n}": [[n - 1], []] for n in (10, 100, 5000, 70000)})
    ref = EmbeddingBagCollection(configs)(kjt)
    got = module(kjt)
    assert got.keys() == ref.keys() and got.length_per_key() == ref.length_per_key()
    assert module.embedding_bag_configs()[3].num_parameters() < 70000 * D // 10
