"""Bad configs and bad inputs fail early with messages that name what is wrong."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import make_kjt
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    ExplicitPartitions,
    MixedRadix,
    QuotientRemainder,
)


def comp(name="big", n=38, features=("f",), **kw):
    kw.setdefault("partition", QuotientRemainder(4))
    return CompositionalEmbeddingBagConfig(
        name=name, num_embeddings=n, embedding_dim=kw.pop("dim", 8), feature_names=list(features), **kw
    )


def plain(name="small", n=10, features=("g",), dim=8):
    return EmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=dim, feature_names=list(features))


@pytest.fixture
def module():
    return CompositionalEmbeddingBagCollection([comp(features=("f", "f2")), plain()])


# --- ids out of range -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "feature, bad_id, table, n",
    [
        ("f", 38, "big", 38),
        ("f", -1, "big", 38),
        ("f2", 2**40, "big", 38),
        ("g", 10, "small", 10),
        ("g", -7, "small", 10),
    ],
)
def test_out_of_range_ids_name_table_feature_and_id(module, feature, bad_id, table, n):
    bags = {"f": [[1], [2, 3]], "f2": [[0], []], "g": [[9], [0]]}
    bags[feature][1].append(bad_id)
    with pytest.raises(ValueError) as err:
        module(make_kjt(bags))
    msg = str(err.value)
    assert f"id {bad_id} " in msg
    assert f"feature {feature!r}" in msg
    assert f"table {table!r}" in msg
    assert f"num_embeddings={n}" in msg


def test_first_bad_id_is_reported(module):
    bags = {"f": [[1], [40]], "f2": [[0], []], "g": [[11], [0]]}
    with pytest.raises(ValueError, match=r"id 40 of feature 'f' .*table 'big'"):
        module(make_kjt(bags))


def test_validate_ids_false_skips_the_check():
    # N = 38 with c = 4: ids 38 and 39 are outside the logical table but still inside both sub-tables
    # (quotient 9 < 10 rows), so the unchecked lookup is well defined and shows the check was skipped.
    checked = CompositionalEmbeddingBagCollection([comp()])
    unchecked = CompositionalEmbeddingBagCollection([comp()], validate_ids=False)
    unchecked.load_state_dict(checked.state_dict())
    kjt = make_kjt({"f": [[39], [1]]})
    with pytest.raises(ValueError, match="id 39"):
        checked(kjt)
    out = unchecked(kjt).values()
    sd = checked.state_dict()
    q = sd["_embedding_bag_collection.embedding_bags.big__p0.weight"]
    r = sd["_embedding_bag_collection.embedding_bags.big__p1.weight"]
    torch.testing.assert_close(out[0], q[9] * r[3])


def test_embedding_rows_checks_ids_and_table(module):
    with pytest.raises(ValueError, match=r"ids for table 'big' must be in \[0, 38\)"):
        module.embedding_rows("big", torch.tensor([0, 38]))
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        module.embedding_rows("nope", torch.tensor([0]))


# --- malformed KJTs ---------------------------------------------------------------------------------------------


def test_missing_feature_is_named(module):
    with pytest.raises(ValueError, match=r"features \['f2'\] are missing"):
        module(make_kjt({"f": [[1]], "g": [[2]]}))


def test_extra_features_are_ignored_like_torchrec(module):
    # EmbeddingBagCollection looks up its own features and ignores others; the drop-in must do the same.
    tables = [
        EmbeddingBagConfig(
            name=t.name, num_embeddings=t.num_embeddings, embedding_dim=8, feature_names=list(t.feature_names)
        )
        for t in module.embedding_bag_configs()
    ]
    ebc = EmbeddingBagCollection(tables)
    bags = {"f": [[1], [2]], "f2": [[3], []], "g": [[4], [5]]}
    extra = {"zzz": [[10**9], [-5]], **bags}
    assert module(make_kjt(extra)).keys() == ebc(make_kjt(extra)).keys() == ["f", "f2", "g"]
    torch.testing.assert_close(module(make_kjt(extra)).values(), module(make_kjt(bags)).values())


def test_weights_given_to_unweighted_module(module):
    bags = {"f": [[1]], "f2": [[3]], "g": [[4]]}
    with pytest.raises(ValueError, match="per-id weights but the module is unweighted.*is_weighted=True"):
        module(make_kjt(bags, {k: [[1.0] for _ in v] for k, v in bags.items()}))


def test_missing_weights_on_weighted_module():
    weighted = CompositionalEmbeddingBagCollection([comp(), plain()], is_weighted=True)
    with pytest.raises(ValueError, match=r"weighted \(is_weighted=True\) but the input .* has no weights"):
        weighted(make_kjt({"f": [[1]], "g": [[4]]}))


def test_lengths_values_mismatch(module):
    kjt = KeyedJaggedTensor(
        keys=["f", "f2", "g"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1, 1, 1])
    )
    with pytest.raises(ValueError, match="lengths sum to 6 but there are 4 values"):
        module(kjt)


def test_weights_values_mismatch():
    weighted = CompositionalEmbeddingBagCollection([comp()], is_weighted=True)
    kjt = KeyedJaggedTensor(
        keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]), weights=torch.tensor([1.0, 2.0, 3.0])
    )
    with pytest.raises(ValueError, match="3 weights for 2 values"):
        weighted(kjt)


def test_not_a_kjt(module):
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        module(torch.tensor([1, 2]))


# --- bad configs ------------------------------------------------------------------------------------------------


def test_concat_sub_dims_must_sum_to_embedding_dim():
    with pytest.raises(ValueError, match=r"table 'big': concat sub_dims \[4, 5\] sum to 9, not embedding_dim=8"):
        comp(combine="concat", sub_dims=[4, 5])
    with pytest.raises(ValueError, match=r"sub_dims must be 2 positive ints"):
        comp(combine="concat", sub_dims=[2, 3, 3])
    with pytest.raises(ValueError, match="cannot be split into 3 parts"):
        comp(combine="concat", partition=MixedRadix((4, 4, 4)), dim=2)


@pytest.mark.parametrize("combine", ["add", "mult"])
def test_add_mult_need_equal_sub_dims(combine):
    with pytest.raises(ValueError, match=rf"combine='{combine}' needs every sub-table at embedding_dim=8.*\[4, 4\]"):
        comp(combine=combine, sub_dims=[4, 4])


def test_bad_combine_and_composition_strings():
    with pytest.raises(ValueError, match=r"combine must be one of \('mult', 'add', 'concat'.*\), got 'multiply'"):
        comp(combine="multiply")
    with pytest.raises(ValueError, match=re.escape("composition must be one of ('per_id', 'pooled'), got 'pool'")):
        comp(composition="pool")


@pytest.mark.parametrize("partition", [None, 4, (4,), "qr"])
def test_partition_must_be_a_partition(partition):
    with pytest.raises(TypeError, match="partition must be a torchrec_qr Partition"):
        comp(partition=partition)


@pytest.mark.parametrize(
    "partition, n",
    [
        (ChineseRemainder((4, 6)), 30),
        (MixedRadix((3, 3)), 10),
        (ExplicitPartitions((torch.arange(12) // 4, torch.arange(12) % 3)), 12),
    ],
)
def test_non_complementary_partition_rejected_in_config(partition, n):
    with pytest.raises(ValueError, match=r"table 'big'|not complementary for num_embeddings=\d+: ids \d+ and \d+"):
        comp(n=n, partition=partition)


def test_duplicate_table_names():
    with pytest.raises(ValueError, match="duplicate table name 'big'"):
        CompositionalEmbeddingBagCollection([comp(features=("a",)), comp(features=("b",))])
    with pytest.raises(ValueError, match="duplicate table name 'small'"):
        CompositionalEmbeddingBagCollection([plain(features=("a",)), plain(features=("b",))])


def test_feature_listed_twice_in_one_table():
    # A feature shared by two tables is allowed (outputs f@big, f@small; see test_ebc_parity.py); listed twice
    # within one table it is a mistake.
    assert CompositionalEmbeddingBagCollection([comp(features=("f",)), plain(features=("f",))])._embedding_names == [
        "f@big",
        "f@small",
    ]
    with pytest.raises(ValueError, match="table 'big' lists a feature twice"):
        CompositionalEmbeddingBagCollection([comp(features=("f", "f"))])


def test_empty_and_non_config_tables():
    with pytest.raises(ValueError, match="at least one table"):
        CompositionalEmbeddingBagCollection([])
    with pytest.raises(TypeError, match="must be EmbeddingBagConfig"):
        CompositionalEmbeddingBagCollection([{"name": "t"}])


@pytest.mark.parametrize("value", [1.7, float("nan")])
def test_float_ids_are_rejected_not_truncated(module, value):
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f", "f2", "g"], values=torch.tensor([value, 1.0, 2.0]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(TypeError, match=r"values are ids and must be torch.int64 or torch.int32, got torch.float32"):
        module(kjt)


def test_structural_checks_read_no_device_data_and_work_on_meta(monkeypatch):
    from torchrec_qr.modules.validation import check_features, check_id_ranges

    kjt = make_kjt({"f": [[1, 2], []], "g": [[3], [4]]})
    meta = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().to("meta"), lengths=kjt.lengths().to("meta"))

    def sync(*_):
        raise AssertionError("a host sync (device read) in a check that must not read data")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    check_features(kjt, ["f", "g"], is_weighted=False)
    check_features(meta, ["f", "g"], is_weighted=False)
    check_id_ranges(meta, [comp(), plain()])  # nothing to read on meta: skipped
    monkeypatch.undo()
    with pytest.raises(ValueError, match="id 12 of feature 'g'"):
        check_id_ranges(make_kjt({"f": [[1]], "g": [[12]]}), [comp(), plain()])


@pytest.mark.parametrize("field", ["embedding_dim", "num_embeddings"])
def test_zero_sizes_name_the_table(field):
    with pytest.raises(ValueError, match=rf"table 'small': {field} must be a positive int, got 0"):
        CompositionalEmbeddingBagCollection([comp(), replace(plain(), **{field: 0})])


def test_plain_table_named_like_a_sub_table():
    with pytest.raises(ValueError, match=r"table name 'big__p0' ends like a sub-table's \(__p<j>\).*'big_p0'"):
        CompositionalEmbeddingBagCollection([comp(), plain(name="big__p0")])


def test_explicit_class_map_shorter_than_the_table():
    short = ExplicitPartitions((torch.arange(8) // 3, torch.arange(8) % 3))
    with pytest.raises(
        ValueError,
        match=r"^table 'big': ExplicitPartitions covers 8 ids but the table has "
        r"num_embeddings=10; give one class per id",
    ):
        comp(n=10, partition=short)


def test_empty_batch_is_named(module):
    empty = KeyedJaggedTensor(
        keys=["f", "f2", "g"], values=torch.tensor([], dtype=torch.int64), lengths=torch.tensor([], dtype=torch.int64)
    )
    with pytest.raises(ValueError, match=r"has no bags \(batch size 0"):
        module(empty)


def test_qr_with_more_collisions_than_ids_stores_at_most_n_rows():
    table = comp(n=10, partition=QuotientRemainder(100))
    assert [c.num_embeddings for c in table.sub_table_configs()] == [1, 10]
    ebc = CompositionalEmbeddingBagCollection([table])
    rows = ebc.embedding_rows("big", torch.arange(10))
    sd = ebc.state_dict()
    q = sd["_embedding_bag_collection.embedding_bags.big__p0.weight"]
    r = sd["_embedding_bag_collection.embedding_bags.big__p1.weight"]
    torch.testing.assert_close(rows, q[0] * r)  # id i: quotient 0, remainder i
