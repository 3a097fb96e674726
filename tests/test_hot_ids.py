"""HotIds: frequency-aware partitions (hot ids keep rows of their own) against Python-int definitions, brute
force and a materialized full table; compress(hot_ids=...), the state-dict buffer, fx tracing."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from conftest import make_kjt, random_bags, random_weights, reference_classes, table_grads
from hypothesis import assume, given
from hypothesis import strategies as st
from test_compositional_embedding_modules import feature_sizes, materialize, reference_forward, reference_table
from test_partitions import SETTINGS, assert_complementary, assert_reported_pair_collides
from torchrec import EmbeddingBagConfig, PoolingType

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    HotIds,
    MixedRadix,
    QuotientRemainder,
    compress,
    most_frequent_ids,
)

BASES = {
    "qr": lambda n: QuotientRemainder(4),
    "mixed_radix3": lambda n: MixedRadix.balanced(n, 3),
    "crt": lambda n: ChineseRemainder.balanced(n, 2),
}


def hot_sample(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct ids of [0, n) in random order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


# --- the partition -----------------------------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(2, 1500), c=st.integers(1, 60), frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_hot_ids_over_qr_complementary(n, c, frac, seed):
    k = max(1, min(n - 1, int(frac * n)))
    p = HotIds(hot_sample(n, k, seed), base=QuotientRemainder(c))
    assert_complementary(p, n)  # classes match the definition, lie in sizes(n), all n tuples distinct
    assert p.sizes(n) == [k + -(-(n - k) // c), min(c, n - k) + 1]  # QR keeps at most (tail) N remainder rows


@SETTINGS
@given(
    n=st.integers(2, 1500),
    k_parts=st.integers(1, 4),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    scheme=st.sampled_from(["mixed", "crt"]),
)
def test_hot_ids_over_fitted_bases_complementary(n, k_parts, frac, seed, scheme):
    k = max(1, min(n - 1, int(frac * n)))
    base = (MixedRadix.balanced if scheme == "mixed" else ChineseRemainder.balanced)(n - k, k_parts)
    assert_complementary(HotIds(hot_sample(n, k, seed), base=base), n)


@SETTINGS
@given(n=st.integers(3, 800), frac=st.floats(0, 1), seed=st.integers(0, 2**31), data=st.data())
def test_hot_rows_are_private(n, frac, seed, data):
    """A hot id's row of partition 1 is used by no other id; hot ids share class 0 of the later partitions only
    with each other."""
    k = max(1, min(n - 1, int(frac * n)))
    hot = hot_sample(n, k, seed)
    p = HotIds(hot, base=MixedRadix.balanced(n - k, data.draw(st.integers(2, 3))))
    idx = p.indices(torch.arange(n))
    is_hot = torch.zeros(n, dtype=torch.bool)
    is_hot[hot] = True
    assert sorted(idx[0][is_hot].tolist()) == list(range(k))
    assert int(idx[0][~is_hot].min()) >= k
    assert bool((idx[1:, is_hot] == 0).all()) and bool((idx[1:, ~is_hot] >= 1).all())


@SETTINGS
@given(n=st.integers(10, 3000), k=st.integers(1, 9), r=st.integers(2, 6), seed=st.integers(0, 2**31))
def test_collision_in_base_names_a_colliding_pair(n, k, r, seed):
    """A base too small for the tail: the reported ids are real, distinct, in range and share every class."""
    top = max(1, (n - k - 1) // r)
    assume(r * top < n - k)
    p = HotIds(hot_sample(n, k, seed), base=MixedRadix((r, top)))
    assert_reported_pair_collides(p, n, lambda i: reference_classes(p, i))


def test_exact_above_float_precision():
    n = 2**62
    hot = torch.tensor([2**53 + 1, 2**61, 5])
    p = HotIds(hot, base=QuotientRemainder(2**31 - 1))
    ids = [0, 5, 6, 2**53, 2**53 + 1, 2**53 + 2, 2**61, n - 1]
    got = p.indices(torch.tensor(ids))
    assert [tuple(col) for col in got.T.tolist()] == [reference_classes(p, i) for i in ids]
    p.validate(n)


def test_bad_hot_ids_are_named():
    with pytest.raises(ValueError, match="id 3 more than once"):
        HotIds([3, 1, 3], base=QuotientRemainder(4))
    with pytest.raises(ValueError, match=">= 0"):
        HotIds([-1, 2], base=QuotientRemainder(4))
    with pytest.raises(ValueError, match="empty"):
        HotIds([], base=QuotientRemainder(4))
    with pytest.raises(TypeError, match="integer ids"):
        HotIds([1.5], base=QuotientRemainder(4))
    with pytest.raises(TypeError, match="Partition"):
        HotIds([1], base=4)
    with pytest.raises(ValueError, match="hot id 10 is out of range"):
        HotIds([1, 10], base=QuotientRemainder(4)).validate(10)
    with pytest.raises(ValueError, match="every id would be hot"):
        HotIds([0, 1], base=QuotientRemainder(4)).sizes(2)
    with pytest.raises(ValueError, match="table 't'.*row_wise.*hot ids"):
        from torchrec_qr.distributed.sub_table_plan import row_split_stride

        row_split_stride(
            CompositionalEmbeddingBagConfig(
                name="t",
                num_embeddings=20,
                embedding_dim=4,
                feature_names=["f"],
                partition=HotIds([3], base=QuotientRemainder(4)),
            )
        )


def test_indices_trace_with_fx_and_follow_the_ids_device():
    p = HotIds([7, 2, 40], base=QuotientRemainder(6))

    class M(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return p.indices(ids)

    traced = torch.fx.symbolic_trace(M())
    ids = torch.tensor([0, 2, 7, 8, 40, 41, 2, 99])
    torch.testing.assert_close(traced(ids), p.indices(ids), atol=0, rtol=0)
    assert p.indices(ids.to(torch.int32)).dtype == torch.int64
    assert p.indices(torch.empty(0, dtype=torch.int64)).shape == (2, 0)


# --- compress -----------------------------------------------------------------------------------------------------


def test_most_frequent_ids_caps_and_breaks_ties_by_id():
    counts = torch.tensor([0, 5, 2, 5, 0, 1])
    assert most_frequent_ids(counts, 3).tolist() == [1, 3, 2]
    assert most_frequent_ids(counts, 5).tolist() == [1, 3, 2, 5, 0]  # then unseen ids: the count is k, not data
    assert most_frequent_ids(torch.ones(4, dtype=torch.int64), 9).tolist() == [0, 1, 2]  # one id stays in the tail


def test_compress_with_counts_and_with_lists():
    plain = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=4, feature_names=[f"f{i}"])
        for i, n in enumerate([50, 400, 1000])
    ]
    counts = {"t1": torch.bincount(torch.tensor([7] * 9 + [3] * 4 + [300]), minlength=400)}
    out = compress(plain, lambda n: MixedRadix.balanced(n, 2), threshold=100, hot_ids=counts, hot_rows=2)
    assert not isinstance(out[0], CompositionalEmbeddingBagConfig)
    assert isinstance(out[1].partition, HotIds) and out[1].partition.hot_ids.tolist() == [3, 7]
    assert out[1].partition.base == MixedRadix.balanced(398, 2)  # the factory is fitted to the tail
    assert isinstance(out[2].partition, MixedRadix)  # no entry: the plain scheme
    listed = compress(plain, QuotientRemainder(8), hot_ids={"t2": [999, 0]})
    assert listed[2].partition.hot_ids.tolist() == [0, 999] and listed[2].sub_table_sizes() == [2 + 125, 9]
    assert listed[2].num_parameters() == (127 + 9) * 4
    with pytest.raises(ValueError, match="'t9'"):
        compress(plain, QuotientRemainder(8), hot_ids={"t9": [1]})
    with pytest.raises(ValueError, match="table 't1'.*frequency of each of its 400 ids"):
        compress(plain, QuotientRemainder(8), hot_ids={"t1": [1, 2]}, hot_rows=2)


# --- the module against a materialized table ---------------------------------------------------------------------


def hot_tables(base: str, combine: str, pooling: PoolingType) -> list[EmbeddingBagConfig]:
    def table(name, n, features, k):
        p = HotIds(hot_sample(n, k, seed=n), base=BASES[base](n - k))
        return CompositionalEmbeddingBagConfig(
            name=name,
            num_embeddings=n,
            embedding_dim=8,
            feature_names=features,
            pooling=pooling,
            partition=p,
            combine=combine,
        )

    return [
        table("big", 60, ["f0", "f1"], 7),
        EmbeddingBagConfig(name="small", num_embeddings=13, embedding_dim=4, feature_names=["g"]),
        table("mid", 37, ["h"], 1),
    ]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
@pytest.mark.parametrize("base", BASES)
def test_matches_materialized_table(base, combine, pooling, weighted):
    tables = hot_tables(base, combine, pooling)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    full = materialize(module)
    for t in tables:  # embedding_rows agrees with a composition from the definitions
        torch.testing.assert_close(full[t.name], reference_table(module.state_dict(), t), atol=0, rtol=0)
    rng = random.Random(hash((base, combine, pooling.value, weighted)) % 2**32)
    for batch in (1, 6):
        bags = random_bags(rng, feature_sizes(tables), batch)
        bags["f0"][0] = [int(t) for t in tables[0].partition.hot_ids[:3]]  # hot ids in a multi-id bag
        weights = random_weights(rng, bags) if weighted else None
        out = module(make_kjt(bags, weights))
        torch.testing.assert_close(out.values(), reference_forward(tables, full, bags, weights), atol=1e-6, rtol=1e-5)
    one_hot = {f: [[rng.randrange(n)] for _ in range(5)] for f, n in feature_sizes(tables).items()}  # fast path
    one_hot["f0"][1] = [int(tables[0].partition.hot_ids[0])]
    weights = random_weights(rng, one_hot) if weighted else None
    torch.testing.assert_close(
        module(make_kjt(one_hot, weights)).values(),
        reference_forward(tables, full, one_hot, weights),
        atol=1e-6,
        rtol=1e-5,
    )


def test_composed_rows_distinct_and_hot_rows_private():
    tables = hot_tables("qr", "add", PoolingType.SUM)
    module = CompositionalEmbeddingBagCollection(tables)
    assert torch.unique(module.embedding_rows("big", torch.arange(60)), dim=0).shape[0] == 60
    assert tables[0].sub_table_sizes() == [7 + 14, 4 + 1]  # K + ceil(53 / 4) tail quotients; 4 remainders + 1
    hot = tables[0].partition.hot_ids
    module.embedding_rows("big", hot[2:3]).sum().backward()  # one hot id touches its own row and the shared one
    grads = table_grads(module)
    assert torch.nonzero(grads["big__p0"].abs().sum(1)).flatten().tolist() == [2]
    assert torch.nonzero(grads["big__p1"].abs().sum(1)).flatten().tolist() == [0]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("function", ["linear", "mlp_relu"])
def test_path_tables_match_per_id_loop(function, weighted):
    """combine='path': hot ids all take the later partitions' class 0 function after their own row."""
    from test_path_functions import FUNCTIONS
    from test_path_functions import reference_forward as path_reference

    tables = [
        CompositionalEmbeddingBagConfig(
            name="big",
            num_embeddings=60,
            embedding_dim=8,
            feature_names=["f0"],
            combine="path",
            path=FUNCTIONS[function],
            partition=HotIds(hot_sample(60, 9, seed=1), base=MixedRadix.balanced(51, 3)),
        )
    ]
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    rng = random.Random(7)
    bags = random_bags(rng, {"f0": 60}, 6)
    bags["f0"][1] = [int(i) for i in tables[0].partition.hot_ids[:4]]
    weights = random_weights(rng, bags) if weighted else None
    torch.testing.assert_close(
        module(make_kjt(bags, weights)).values(),
        path_reference(module.state_dict(), tables, bags, weights),
        atol=1e-6,
        rtol=1e-5,
    )


# --- state dict ---------------------------------------------------------------------------------------------------


def test_state_dict_carries_and_restores_the_hot_ids():
    tables = hot_tables("qr", "mult", PoolingType.SUM)
    module = CompositionalEmbeddingBagCollection(tables)
    sd = module.state_dict()
    assert torch.equal(sd["_hot_ids.big"], torch.sort(hot_sample(60, 7, seed=60)).values)
    assert "_hot_ids.small" not in sd
    kjt = make_kjt({"f0": [[0, 1, 2], [59]], "f1": [[5], []], "g": [[1], [2]], "h": [[3], [36]]})
    expected = module(kjt).values()
    # A model built with other hot ids (same K) takes the saved list and computes the saved model's function.
    other = [
        replace(t, partition=HotIds(torch.arange(t.partition.num_hot), base=t.partition.base))
        if isinstance(t, CompositionalEmbeddingBagConfig)
        else t
        for t in hot_tables("qr", "mult", PoolingType.SUM)
    ]
    restored = CompositionalEmbeddingBagCollection(other)
    assert not torch.equal(restored(kjt).values(), expected)
    restored.load_state_dict(sd)
    torch.testing.assert_close(restored(kjt).values(), expected, atol=0, rtol=0)
    assert torch.equal(other[0].partition.hot_ids, sd["_hot_ids.big"])
    bad = dict(sd, **{"_hot_ids.big": torch.tensor([0, 5, 5, 9, 10, 11, 12])})
    with pytest.raises(ValueError, match="table 'big'.*not strictly increasing"):
        restored.load_state_dict(bad)


def test_meta_module_keeps_the_list_and_to_empty_restores_it():
    tables = hot_tables("qr", "mult", PoolingType.SUM)
    expected = tables[0].partition.hot_ids.clone()
    module = CompositionalEmbeddingBagCollection(tables, device="meta")
    assert torch.equal(module.state_dict()["_hot_ids.big"], expected)
    module._hot_ids.to_empty(device="cpu")
    assert torch.equal(module._hot_ids.big, expected) and tables[0].partition.hot_ids is module._hot_ids.big


def test_scripted_module_equals_eager_and_follows_a_loaded_list():
    tables = hot_tables("qr", "mult", PoolingType.SUM)
    sd = CompositionalEmbeddingBagCollection(tables).state_dict()
    kjt = make_kjt({"f0": [[0, 1, 2], [59]], "f1": [[5], []], "g": [[1], [2]], "h": [[3], [36]]})
    other = [
        replace(t, partition=HotIds(torch.arange(t.partition.num_hot), base=t.partition.base))
        if isinstance(t, CompositionalEmbeddingBagConfig)
        else t
        for t in hot_tables("qr", "mult", PoolingType.SUM)
    ]
    module = CompositionalEmbeddingBagCollection(other)
    module.load_state_dict(sd)
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(kjt).values(), module(kjt).values(), atol=1e-6, rtol=0)
