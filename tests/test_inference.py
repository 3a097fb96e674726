"""Quantized compositional collections against a per-id loop over rows dequantized here.

The reference quantizes each float sub-table with FBGEMM's row-wise quantizer (or casts it to fp16),
dequantizes it, and composes every id on its own from the schemes' Python-int definitions (combine, path
functions, weighted SUM/MEAN pooling, pooled-mode mult), so it shares no code with the module's composition.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import make_kjt, random_bags, random_weights, reference_classes
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.inference.modules import quantize_inference_model as torchrec_quantize_inference_model
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, QuantConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from torchrec_qr import (
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    PathFunction,
    QuotientRemainder,
    compress,
)
from torchrec_qr.inference import (
    DTYPES,
    QUANT_MAPPING,
    QuantBatchedEmbeddingBags,
    QuantCompositionalEmbeddingBagCollection,
    quantize_inference_model,
)
from torchrec_qr.modules.fused_compositional_embedding_modules import FusedCompositionalEmbeddingBagCollection

D = 8
TABLES = "_embedding_bag_collection.embedding_bags."
PATHS = "_path_functions."
BITS = {"int8": 8, "int4": 4}


def comp(name, n, features, combine, c, pooling=PoolingType.SUM, composition="per_id", path=None, dim=D):
    return CompositionalEmbeddingBagConfig(
        name=name,
        num_embeddings=n,
        embedding_dim=dim,
        feature_names=features,
        pooling=pooling,
        partition=QuotientRemainder(c),
        combine=combine,
        composition=composition,
        path=path,
    )


def mixed_tables(pooling=PoolingType.SUM):
    """Every way a table is stored: plain, mult (per id and pooled), add, concat, path."""
    return [
        EmbeddingBagConfig(name="plain", num_embeddings=13, embedding_dim=4, feature_names=["g"], pooling=pooling),
        comp("mult", 60, ["m0", "m1"], "mult", 4, pooling),
        comp("pooled", 30, ["pm"], "mult", 5, pooling, composition="pooled"),
        comp("add", 45, ["a"], "add", 6, pooling),
        comp("concat", 50, ["c"], "concat", 7, pooling),
        comp("path", 40, ["p"], "path", 5, pooling, path=PathFunction.linear(bias=True)),
    ]


def dequantized(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a kernel storing ``weight`` at ``dtype`` gives back, computed with FBGEMM's reference ops."""
    if dtype == "fp32":
        return weight.clone()
    if dtype == "fp16":
        return weight.half().float()
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight.contiguous(), BITS[dtype])
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, BITS[dtype])


def reference_row(p, table, i):
    """One id's embedding from state-dict-like ``p``, composed here."""
    if not isinstance(table, CompositionalEmbeddingBagConfig):
        return p[f"{TABLES}{table.name}.weight"][i]
    cls = reference_classes(table.partition, i)
    sub = [p[f"{TABLES}{table.name}__p{j}.weight"][cls[j]] for j in range(table.num_sub_tables)]
    if table.combine == "concat":
        return torch.cat(sub)
    if table.combine == "path":
        x = sub[0]
        for j in range(1, table.num_partitions):
            x = x @ p[f"{PATHS}{table.name}.p{j}.weights.0"][cls[j]] + p[f"{PATHS}{table.name}.p{j}.biases.0"][cls[j]]
        return x
    return sub[0] * sub[1] if table.combine == "mult" else sub[0] + sub[1]


def reference_forward(p, tables, bags, weights):
    cols = []
    for t in tables:
        for f in t.feature_names:
            rows = []
            for b, bag in enumerate(bags[f]):
                w = [weights[f][b][i] if weights else 1.0 for i in range(len(bag))]
                if isinstance(t, CompositionalEmbeddingBagConfig) and t.composition == "pooled":
                    # pool each sub-table (per-id weights in the first only), then multiply
                    cls = [reference_classes(t.partition, x) for x in bag]
                    parts = [
                        sum(
                            (w[i] if j == 0 else 1.0) * p[f"{TABLES}{t.name}__p{j}.weight"][c[j]]
                            for i, c in enumerate(cls)
                        )
                        + torch.zeros(D)
                        for j in range(2)
                    ]
                    if t.pooling == PoolingType.MEAN and bag:
                        parts = [x / len(bag) for x in parts]
                    rows.append(parts[0] * parts[1])
                    continue
                acc = torch.zeros(t.embedding_dim)
                for i, x in enumerate(bag):
                    acc = acc + w[i] * reference_row(p, t, x)
                rows.append(acc / len(bag) if t.pooling == PoolingType.MEAN and bag else acc)
            cols.append(torch.stack(rows))
    return torch.cat(cols, dim=1)


def qconfig(dtype: torch.dtype, per_table=None) -> QuantConfig:
    return QuantConfig(
        activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.quantization.PlaceholderObserver.with_args(dtype=dtype),
        per_table_weight_dtype=per_table,
    )


def quantized(module, dtype: str, per_table=None):
    module = copy.deepcopy(module)
    module.qconfig = qconfig(DTYPES[dtype], per_table)
    return QuantCompositionalEmbeddingBagCollection.from_float(module)


@pytest.mark.parametrize(
    "pooling, weighted", [(PoolingType.SUM, False), (PoolingType.SUM, True), (PoolingType.MEAN, True)]
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_quantized_lookups_match_dequantized_rows_composed_here(dtype, pooling, weighted):
    tables = mixed_tables(pooling)
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=weighted)
    q = quantized(module, dtype)
    sd = module.state_dict()
    deq = {k: dequantized(v, dtype) if k.startswith(TABLES) else v for k, v in sd.items()}
    # the storage's own dequantized view is the reference's, row for row
    for name, rows in q._embedding_bag_collection.table_weights().items():
        torch.testing.assert_close(rows, deq[f"{TABLES}{name}.weight"], atol=0, rtol=0)
    rng = random.Random(hash((dtype, pooling.value, weighted)) % 2**32)
    sizes = {f: t.num_embeddings for t in tables for f in t.feature_names}
    for batch in (1, 5):
        bags = random_bags(rng, sizes, batch)
        bags["m0"][0] = []
        weights = random_weights(rng, bags) if weighted else None
        kjt = make_kjt(bags, weights)
        out = q(kjt)
        assert out.keys() == module(kjt).keys() and out.length_per_key() == module(kjt).length_per_key()
        torch.testing.assert_close(out.values(), reference_forward(deq, tables, bags, weights), atol=1e-5, rtol=1e-4)
    ids = torch.arange(0, 60, 7)
    expected = torch.stack([reference_row(deq, tables[1], int(i)) for i in ids])
    torch.testing.assert_close(q.embedding_rows("mult", ids), expected, atol=1e-6, rtol=1e-5)
    if dtype != "fp32":  # quantization really happened: the float rows differ from the stored ones
        assert not torch.equal(deq[f"{TABLES}mult__p0.weight"], sd[f"{TABLES}mult__p0.weight"])


def test_per_table_dtypes_and_bytes():
    tables = mixed_tables()
    q = quantized(
        CompositionalEmbeddingBagCollection(tables), "int8", {"path": torch.float16, "mult__p1": torch.quint4x2}
    )
    types = q.data_types()
    assert types["path__p0"] == DataType.FP16  # a logical name covers its sub-tables
    assert types["mult__p1"] == DataType.INT4 and types["mult__p0"] == DataType.INT8
    assert types["plain"] == DataType.INT8
    # rows padded to 16 bytes: int8 D=8 -> 8 + 4 scale/bias -> 16; fp16 D=8 -> 16; int4 D=8 -> 4 + 4 -> 16
    assert q.table_bytes()["mult__p0"] == 15 * 16 and q.table_bytes()["path__p0"] == 8 * 16
    wide = [comp("w", 1000, ["w"], "mult", 10, dim=64)]
    bytes_by_dtype = {d: quantized(CompositionalEmbeddingBagCollection(wide), d).table_bytes()["w__p0"] for d in DTYPES}
    assert bytes_by_dtype == {"fp32": 100 * 256, "fp16": 100 * 128, "int8": 100 * 80, "int4": 100 * 48}


def test_empty_module_loads_quantized_state_dict():
    tables = mixed_tables()
    q = quantized(CompositionalEmbeddingBagCollection(tables, is_weighted=True), "int4")
    empty = QuantCompositionalEmbeddingBagCollection(tables, True, q.data_types())
    empty.load_state_dict(q.state_dict())
    rng = random.Random(0)
    bags = random_bags(rng, {f: t.num_embeddings for t in tables for f in t.feature_names}, 4)
    kjt = make_kjt(bags, random_weights(rng, bags))
    assert torch.equal(empty(kjt).values(), q(kjt).values())


def test_bad_inputs_name_the_table():
    module = CompositionalEmbeddingBagCollection([comp("odd", 40, ["o"], "mult", 5, dim=6)])
    with pytest.raises(ValueError, match=r"table 'odd__p0': INT4 rows of embedding_dim=6 .* fp16"):
        quantized(module, "int4")
    quantized(module, "int8")  # even dims are fine for int8
    with pytest.raises(ValueError, match="module.qconfig"):
        QuantCompositionalEmbeddingBagCollection.from_float(module)
    with pytest.raises(ValueError, match="weight dtype"):
        quantize_inference_model(torch.nn.Sequential(module), torch.int32)
    with pytest.raises(TypeError, match="submodules"):
        quantize_inference_model(module)


def dlrm_tables():
    """``mixed_tables`` at one width (DLRM's interaction needs it)."""
    return [t for t in mixed_tables() if t.name != "plain"] + [
        EmbeddingBagConfig(name="plain", num_embeddings=13, embedding_dim=D, feature_names=["g"])
    ]


SIDE = [EmbeddingBagConfig(name="side", num_embeddings=20, embedding_dim=D, feature_names=["s"])]


def dlrm(tables, ebc_tables):
    """A DLRM whose sparse arch holds a compositional collection, plus a plain EBC elsewhere in the model."""
    model = DLRM(
        embedding_bag_collection=CompositionalEmbeddingBagCollection(tables),
        dense_in_features=3,
        dense_arch_layer_sizes=[D],
        over_arch_layer_sizes=[4, 1],
    )
    model.side = EmbeddingBagCollection(ebc_tables)
    return model


@pytest.mark.parametrize("entry", ["torchrec", "ours"])
def test_quantize_inference_model_converts_every_collection(entry):
    tables = dlrm_tables()
    model = dlrm(tables, SIDE)
    kjt = make_kjt(random_bags(random.Random(1), {f: t.num_embeddings for t in tables for f in t.feature_names}, 3))
    dense = torch.randn(3, 3)
    expected = model(dense, kjt)
    if entry == "torchrec":
        torchrec_quantize_inference_model(model, quantization_mapping=QUANT_MAPPING)
    else:
        quantize_inference_model(model)
    cebc = model.sparse_arch.embedding_bag_collection
    assert type(cebc) is QuantCompositionalEmbeddingBagCollection
    assert type(model.side) is QuantEmbeddingBagCollection
    assert isinstance(cebc._embedding_bag_collection, QuantBatchedEmbeddingBags)
    assert set(cebc.data_types().values()) == {DataType.INT8}
    # no float table weight remains: embedding rows are uint8 and the only float parameters left in the
    # collection are the path functions
    table_keys = [k for k in model.state_dict() if ".embedding_bags." in k and k.endswith(".weight")]
    assert len(table_keys) == len(cebc._embedding_bag_collection.tables) + 1
    assert all(model.state_dict()[k].dtype == torch.uint8 for k in table_keys)
    assert {n.split(".")[0] for n, _ in cebc.named_parameters()} == {"_path_functions"}
    torch.testing.assert_close(model(dense, kjt), expected, atol=0.02, rtol=0.05)


def test_row_alignment_sets_bytes_not_values():
    tables = dlrm_tables()
    models = {}
    for alignment in (16, 1):
        torch.manual_seed(0)
        models[alignment] = quantize_inference_model(dlrm(tables, SIDE), row_alignment=alignment)
    small, padded = (models[a].sparse_arch.embedding_bag_collection for a in (1, 16))
    assert small.table_bytes()["mult__p0"] == 15 * (D + 4) and padded.table_bytes()["mult__p0"] == 15 * 16
    kjt = make_kjt(random_bags(random.Random(2), {f: t.num_embeddings for t in tables for f in t.feature_names}, 4))
    dense = torch.randn(4, 3)
    assert torch.equal(models[1](dense, kjt), models[16](dense, kjt))
    with pytest.raises(ValueError, match="row_alignment"):
        quantize_inference_model(dlrm(tables, SIDE), row_alignment=0)


def test_fused_collection_is_converted_too():
    tables = dlrm_tables()
    fused = FusedCompositionalEmbeddingBagCollection(
        tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}
    )
    kjt = make_kjt(random_bags(random.Random(3), {f: t.num_embeddings for t in tables for f in t.feature_names}, 4))
    before = fused(kjt).values()
    before.sum().backward()  # one fused update: the quantized rows must be the trained ones
    expected = fused(kjt).values()
    assert (expected - before).abs().max() > 0.1
    model = torch.nn.ModuleDict({"ebc": fused})
    torchrec_quantize_inference_model(model, quantization_mapping=QUANT_MAPPING)
    assert type(model["ebc"]) is QuantCompositionalEmbeddingBagCollection
    torch.testing.assert_close(model["ebc"](kjt).values(), expected, atol=0.02, rtol=0.02)


def test_hot_ids_table_keeps_its_hot_ids():
    """A HotIds table: the quantized module composes with the float module's hot-id list; its output equals
    the float module's on dequantized rows."""
    tables = compress(
        [EmbeddingBagConfig(name="hot", num_embeddings=500, embedding_dim=D, feature_names=["h"])],
        partition=QuotientRemainder(8),
        hot_ids={"hot": [3, 77, 499]},
    )
    module = CompositionalEmbeddingBagCollection(tables, is_weighted=True)
    q = quantized(module, "int8")
    assert torch.equal(q.state_dict()["_hot_ids.hot"], torch.tensor([3, 77, 499]))
    deq = {k: dequantized(v, "int8") if k.startswith(TABLES) else v for k, v in module.state_dict().items()}
    reference = copy.deepcopy(module)
    reference.load_state_dict(deq)
    rng = random.Random(4)
    bags = random_bags(rng, {"h": 500}, 6)
    bags["h"][0] = [3, 77, 499, 5]
    kjt = make_kjt(bags, random_weights(rng, bags))
    torch.testing.assert_close(q(kjt).values(), reference(kjt).values(), atol=1e-6, rtol=1e-5)
