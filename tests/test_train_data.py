"""The training data path without processes: hashing is exact, table configs and the memory report follow
the embeddings config; the global-batch layout itself is tested in test_dataloader.py."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import ChineseRemainder, CompositionalEmbeddingBagConfig, MixedRadix, QuotientRemainder
from torchrec_qr.modules.path_functions import PathFunction
from torchrec_qr.train.config import load_config
from torchrec_qr.train.data import HashIds
from torchrec_qr.train.memory import memory_report, totals
from torchrec_qr.train.model import logical_tables, table_configs

SIZES = [3, 10, 199, 200, 201, 1000, 4097] + [50] * 19


def test_hash_ids_is_id_mod_rows_per_feature() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"],
        values=torch.tensor([0, 7, 13, 5, 6, 99, 100, 101, 3]),
        lengths=torch.tensor([2, 0, 1, 1, 2, 1, 0, 1, 1], dtype=torch.int32),
        weights=torch.arange(9, dtype=torch.float32),
    )
    out = HashIds({"a": 5, "b": 7}).kjt(kjt)
    expected = {"a": [0 % 5, 7 % 5, 13 % 5], "b": [5 % 7, 6 % 7, 99 % 7, 100 % 7], "c": [101, 3]}
    for key, ids in expected.items():
        assert out[key].values().tolist() == ids
        assert torch.equal(out[key].lengths(), kjt[key].lengths())
        assert torch.equal(out[key].weights(), kjt[key].weights())
    assert out.stride() == kjt.stride()


def test_hash_kind_tables_and_lookups_are_exact() -> None:
    cfg = load_config(None, ["embeddings.kind=hash", "embeddings.collisions=4", "embeddings.threshold=200"])
    tables = table_configs(cfg, SIZES)
    rows = [t.num_embeddings for t in tables]
    assert rows[:7] == [3, 10, 199, 200, math.ceil(201 / 4), 250, math.ceil(4097 / 4)]
    ebc = EmbeddingBagCollection(tables=tables)
    keys = [t.feature_names[0] for t in tables]
    # Per feature: ids around the wrap-around point and the last id, one id per bag.
    ids = [[min(i, n - 1) for i in (0, 1, r - 1, r, r + 1, n - 1)] for n, r in zip(SIZES, rows)]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(sum(ids, [])), lengths=torch.ones(26 * 6, dtype=torch.int32)
    )
    pooled = ebc(HashIds(dict(zip(keys, rows))).kjt(kjt)).to_dict()
    for t, f, logical in zip(tables, keys, ids):
        expected = ebc.embedding_bags[t.name].weight[torch.tensor(logical) % t.num_embeddings]
        assert torch.equal(pooled[f], expected)
    # Above the threshold, id r shares id 0's row (a collision); at or below it every id keeps its own row.
    assert torch.equal(pooled["cat_6"][3], pooled["cat_6"][0]) and rows[6] < SIZES[6]
    assert not torch.equal(pooled["cat_2"][3], pooled["cat_2"][0]) and rows[2] == SIZES[2]


def test_compositional_kinds_follow_the_scheme() -> None:
    base = ["embeddings.kind=compositional", "embeddings.threshold=200"]
    qr = table_configs(load_config(None, base + ["embeddings.collisions=4", "embeddings.combine=add"]), SIZES)
    assert [type(t) is CompositionalEmbeddingBagConfig for t in qr[:7]] == [False] * 4 + [True] * 3
    assert qr[6].partition == QuotientRemainder(4) and qr[6].combine == "add" and qr[6].sub_table_sizes() == [1025, 4]
    mr = table_configs(
        load_config(None, base + ["embeddings.scheme=mixed_radix", "embeddings.num_partitions=3"]), SIZES
    )
    assert isinstance(mr[6].partition, MixedRadix) and math.prod(mr[6].partition.radices) >= 4097
    crt = table_configs(load_config(None, base + ["embeddings.scheme=chinese_remainder"]), SIZES)
    assert isinstance(crt[6].partition, ChineseRemainder) and math.prod(crt[6].partition.moduli) >= 4097
    path = table_configs(
        load_config(None, base + ["embeddings.combine=path", "embeddings.path.kind=mlp", "embeddings.path.hidden=[8]"]),
        SIZES,
    )
    assert path[6].path == PathFunction(kind="mlp", hidden=(8,)) and path[6].num_sub_tables == 1
    assert type(path[2]) is EmbeddingBagConfig  # below the threshold: a full table


def test_memory_report_counts_sub_tables_and_optimizer_state() -> None:
    cfg = load_config(None, ["embeddings.kind=compositional", "embeddings.threshold=200", "model.embedding_dim=16"])
    tables = table_configs(cfg, SIZES)
    types = {t.name: "table_wise" for t in tables} | {tables[0].name: "data_parallel"}
    report = memory_report(logical_tables(SIZES, 16), tables, types, "rowwise_adagrad", "adagrad")
    big = report[6]
    assert big.sub_table_rows == [1025, 4] and big.logical_rows == 4097
    assert big.param_bytes == (1025 + 4) * 16 * 4 and big.optimizer_bytes == (1025 + 4) * 4
    assert big.full_param_bytes == 4097 * 16 * 4 and big.compression == pytest.approx(4097 / 1029)
    small = report[0]  # data parallel: one replica, dense Adagrad state (one float per weight)
    assert (small.stored_as, small.optimizer_bytes, small.compression) == ("full", 3 * 16 * 4, 1.0)
    path_tables = table_configs(
        load_config(None, ["embeddings.kind=compositional", "embeddings.combine=path", "embeddings.threshold=200"]),
        SIZES,
    )
    path = memory_report(logical_tables(SIZES, 16), path_tables, types, "rowwise_adagrad", "adam")[6]
    assert path.stored_as == "qr(c=4)/path(linear)" and path.sub_table_rows == [1025, 4]
    assert path.param_bytes == (1025 * 16 + 4 * 16 * 16) * 4  # the quotient table, then 4 linear maps
    assert path.optimizer_bytes == (1025 + 2 * 4 * 16 * 16) * 4  # rowwise Adagrad rows, Adam on the maps
    total = totals(report)
    assert total["param_bytes"] == sum(r.param_bytes for r in report)
