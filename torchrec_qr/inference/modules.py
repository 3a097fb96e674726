"""Quantized compositional collections and the module swap that puts them into a model.

``QuantCompositionalEmbeddingBagCollection`` is a ``CompositionalEmbeddingBagCollection`` whose storage is
swapped for ``QuantBatchedEmbeddingBags``: the composition (expand, per-id combine, weighted SUM/MEAN
pooling, path functions, which stay float) is the float module's own code, so quantized and float
collections differ only in the rows their kernels return.

TorchRec's ``quantize_inference_model`` swaps modules by type name through a mapping that knows only
EmbeddingBagCollection and EmbeddingCollection; ``QUANT_MAPPING`` adds ours (plain and fused-optimizer).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.inference.modules import DEFAULT_QUANT_MAPPING, trim_torch_package_prefix_from_typename
from torchrec.inference.modules import quantize_inference_model as _torchrec_quantize_inference_model
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, QuantConfig, dtype_to_data_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.quant.embedding_modules import MODULE_ATTR_ROW_ALIGNMENT_INT, quant_prep_customize_row_alignment

from torchrec_qr.inference.quant_storage import DEFAULT_ROW_ALIGNMENT, QuantBatchedEmbeddingBags
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.embedding_configs import SUB_TABLE_SEPARATOR
from torchrec_qr.modules.fused_compositional_embedding_modules import FusedCompositionalEmbeddingBagCollection

__all__ = [
    "DTYPES",
    "QUANT_MAPPING",
    "QuantCompositionalEmbeddingBagCollection",
    "physical_data_types",
    "quantize_inference_model",
]

logger = logging.getLogger(__name__)

# Names the CLIs and manifests use for the weight dtypes FBGEMM's int-N kernels store.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.int8,
    "int4": torch.quint4x2,
}


def physical_data_types(
    tables: list[EmbeddingBagConfig], default: torch.dtype, per_table: Mapping[str, torch.dtype] | None = None
) -> dict[str, DataType]:
    """Physical table name -> its DataType: its own entry in ``per_table``, else its logical table's
    (``t_user`` covers ``t_user__p0``, ``t_user__p1``), else ``default``."""
    per_table = per_table or {}
    out = {}
    for t in tables:
        logical = t.name.rsplit(SUB_TABLE_SEPARATOR, 1)[0]
        out[t.name] = dtype_to_data_type(per_table.get(t.name, per_table.get(logical, default)))
    return out


class QuantCompositionalEmbeddingBagCollection(CompositionalEmbeddingBagCollection):
    """A ``CompositionalEmbeddingBagCollection`` for inference, sub-tables and plain tables quantized.

    Same input, output keys, dims and semantics as the float collection; each physical table is stored at
    its own dtype (FP32, FP16, INT8 or INT4, row-wise scale/bias for the int-N ones) in FBGEMM int-N TBE
    kernels. Path-table functions stay float. Usually made by ``from_float`` or ``quantize_inference_model``;
    the constructor builds an empty one that ``load_state_dict`` fills (state dict:
    ``_embedding_bag_collection.embedding_bags.{table}.weight`` uint8 rows, path functions as in training).

    Args:
        tables: logical table configs.
        is_weighted: whether inputs carry per-id weights.
        data_types: physical table name -> DataType (see ``physical_data_types``).
        device: where the kernels and path functions live.
        validate_ids: check every id is in range (one device sync per batch).
        row_alignment: rows are padded to a multiple of this many bytes.
        storage: an already filled quantized storage (``from_float`` passes one); None: zeros.

    Path functions and hot-id lists (``HotIds`` tables) are the float module's, copied by ``from_float``.

    Example::

        tables = compress(
            [EmbeddingBagConfig(name="t1", num_embeddings=1_000_000, embedding_dim=64, feature_names=["f1"])],
            partition=QuotientRemainder(collisions=100),
        )
        cebc = CompositionalEmbeddingBagCollection(tables)
        cebc.qconfig = QuantConfig(
            activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
            weight=torch.quantization.PlaceholderObserver.with_args(dtype=torch.int8),
        )
        qcebc = QuantCompositionalEmbeddingBagCollection.from_float(cebc)
        kt = qcebc(KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([3, 999_999]), torch.tensor([1, 1])))
        kt["f1"].shape  # torch.Size([2, 64]), as cebc's; qcebc.table_bytes(): {'t1__p0': 800000, 't1__p1': 8000}
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool,
        data_types: Mapping[str, DataType],
        device: torch.device | str | None = None,
        validate_ids: bool = True,
        row_alignment: int = DEFAULT_ROW_ALIGNMENT,
        storage: QuantBatchedEmbeddingBags | None = None,
    ) -> None:
        def quantized_storage(physical: list[EmbeddingBagConfig], dev: torch.device | str | None) -> nn.Module:
            if storage is not None:
                return storage
            return QuantBatchedEmbeddingBags(physical, data_types, is_weighted, dev, row_alignment)

        super().__init__(tables, is_weighted, device, validate_ids, storage=quantized_storage)

    @classmethod
    def from_float(
        cls, module: CompositionalEmbeddingBagCollection, use_precomputed_fake_quant: bool = False
    ) -> QuantCompositionalEmbeddingBagCollection:
        """Quantize a trained collection per ``module.qconfig`` (a TorchRec ``QuantConfig``: weight dtype,
        optional ``per_table_weight_dtype`` by logical or physical table name; output must be float)."""
        qconfig = getattr(module, "qconfig", None)
        if qconfig is None:
            raise ValueError(
                "from_float needs module.qconfig (a torchrec QuantConfig with the weight dtype); set it, or use "
                "torchrec_qr.inference.quantize_inference_model(model)"
            )
        if qconfig.activation().dtype != torch.float:
            raise ValueError(
                f"output dtype {qconfig.activation().dtype} is not supported: compositional tables compose "
                "in float32; quantize with output_dtype=torch.float"
            )
        per_table = qconfig.per_table_weight_dtype if isinstance(qconfig, QuantConfig) else None
        float_storage = module._embedding_bag_collection
        data_types = physical_data_types(float_storage.tables, qconfig.weight().dtype, per_table)
        storage = QuantBatchedEmbeddingBags.from_float(
            float_storage,
            data_types,
            module.is_weighted(),
            getattr(module, MODULE_ATTR_ROW_ALIGNMENT_INT, DEFAULT_ROW_ALIGNMENT),
        )
        quant = cls(
            copy.deepcopy(module.embedding_bag_configs()),
            module.is_weighted(),
            data_types,
            module.device,
            validate_ids=module.validate_ids,
            storage=storage,
        )
        quant._path_functions.load_state_dict(module._path_functions.state_dict())
        quant._hot_ids.load_state_dict(module._hot_ids.state_dict())
        logger.info("quantized %d tables: %s", len(data_types), {k: v.name for k, v in data_types.items()})
        return quant

    def reset_parameters(self) -> None:
        raise TypeError("a quantized collection is not trained: quantize a trained one with from_float")

    def table_bytes(self) -> dict[str, int]:
        """Bytes each physical table occupies in its kernel (padded rows, scale/bias included)."""
        return self._embedding_bag_collection.table_bytes()

    def data_types(self) -> dict[str, DataType]:
        """Physical table name -> the DataType it is stored at."""
        return dict(self._embedding_bag_collection.data_types)

    def _get_name(self) -> str:
        return "QuantCompositionalEmbeddingBagCollection"


QUANT_MAPPING: dict[str, type[nn.Module]] = {
    **DEFAULT_QUANT_MAPPING,
    **{
        trim_torch_package_prefix_from_typename(torch.typename(float_type)): QuantCompositionalEmbeddingBagCollection
        for float_type in (CompositionalEmbeddingBagCollection, FusedCompositionalEmbeddingBagCollection)
    },
}


def quantize_inference_model(
    model: nn.Module,
    dtype: torch.dtype = torch.int8,
    per_table_weight_dtype: Mapping[str, torch.dtype] | None = None,
    quantization_mapping: Mapping[str, type[nn.Module]] | None = None,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> nn.Module:
    """TorchRec's ``quantize_inference_model`` with ``QUANT_MAPPING``: every EBC, EC and compositional
    collection in ``model`` swapped for its quantized class, in place; returns ``model``.

    ``per_table_weight_dtype`` overrides ``dtype`` by table name (a compositional table's logical name
    covers its sub-tables). ``row_alignment``: rows are padded to a multiple of this many bytes (16, TorchRec's
    default, suits GPU kernels; FBGEMM's CPU kernels take 1, e.g. 20 instead of 32 bytes for an int8 row of
    D=16). Raises a ValueError if any compositional collection is left in float.
    """
    if isinstance(model, CompositionalEmbeddingBagCollection):
        raise TypeError(
            "quantize_inference_model swaps submodules: pass the model holding the collection, or "
            "call QuantCompositionalEmbeddingBagCollection.from_float on the collection itself"
        )
    if dtype not in DTYPES.values():
        raise ValueError(f"weight dtype {dtype} is not supported; use one of {DTYPES}")
    if row_alignment < 1:
        raise ValueError(f"row_alignment must be a positive number of bytes, got {row_alignment}")
    quant_prep_customize_row_alignment(
        model, [EmbeddingBagCollection, EmbeddingCollection, CompositionalEmbeddingBagCollection], row_alignment
    )
    _torchrec_quantize_inference_model(
        model,
        quantization_mapping=dict(quantization_mapping or QUANT_MAPPING),
        per_table_weight_dtype=dict(per_table_weight_dtype) if per_table_weight_dtype else None,
        quantization_dtype=dtype,
    )
    quantized = QuantCompositionalEmbeddingBagCollection
    left = [
        n
        for n, m in model.named_modules()
        if isinstance(m, CompositionalEmbeddingBagCollection) and not isinstance(m, quantized)
    ]
    if left:
        raise ValueError(f"compositional collections left in float: {left}; the mapping lacks their type")
    return model
