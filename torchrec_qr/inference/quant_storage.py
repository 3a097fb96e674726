"""Quantized storage for compositional collections: physical tables in FBGEMM int-N TBE kernels.

``QuantBatchedEmbeddingBags`` is the inference twin of ``BatchedEmbeddingBags``: the same interface (a
KJT of physical features in, ``[stride, sum of widths]`` float out, ``feature_names()``, ``tables``,
``table_weights()``), so the collection's composition code runs unchanged on top of it. Each pooling group
is one ``IntNBitTableBatchedEmbeddingBagsCodegen`` holding every table at its own dtype (FP32, FP16, INT8,
INT4), built and filled the way TorchRec's ``QuantEmbeddingBagCollection`` does; each table's padded rows
are exposed as the uint8 buffer ``embedding_bags.{name}.weight`` (a view of the kernel's storage), so a
state dict saves and restores the quantized rows exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    EmbeddingLocation,
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec.modules.embedding_configs import (
    DATA_TYPE_NUM_BITS,
    DataType,
    EmbeddingBagConfig,
    data_type_to_sparse_type,
    pooling_type_to_pooling_mode,
)
from torchrec.quant.embedding_modules import quantize_state_dict
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.modules.batched_embedding_bags import BatchedEmbeddingBags, group_by_pooling

__all__ = ["DEFAULT_ROW_ALIGNMENT", "QUANT_DATA_TYPES", "QuantBatchedEmbeddingBags"]

DEFAULT_ROW_ALIGNMENT = 16  # TorchRec's default: rows padded to 16 bytes (what its GPU kernels expect)
QUANT_DATA_TYPES = (DataType.FP32, DataType.FP16, DataType.INT8, DataType.INT4)
# Bytes of fp16 scale and bias in front of each int-N row.
_SCALE_BIAS_BYTES = 4


def _check_table(table: EmbeddingBagConfig, data_type: DataType) -> None:
    """Reject what FBGEMM's kernels cannot store, naming the table and a way out."""
    if data_type not in QUANT_DATA_TYPES:
        raise ValueError(
            f"table {table.name!r}: weight dtype {data_type.name} is not supported; use one of "
            f"{[d.name for d in QUANT_DATA_TYPES]}"
        )
    bits = DATA_TYPE_NUM_BITS[data_type]
    if bits < 16 and (table.embedding_dim * bits // 8) % 2:
        raise ValueError(
            f"table {table.name!r}: {data_type.name} rows of embedding_dim={table.embedding_dim} are not "
            f"supported by FBGEMM (needs a dim divisible by {16 // bits}); give this table fp16 instead, e.g. "
            f"per_table_weight_dtype={{{table.name!r}: torch.float16}}"
        )


@torch.fx.wrap
def _unwrap_kjt(kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and offsets in one integer dtype, as the CPU int-N kernel requires."""
    indices = kjt.values()
    return indices, kjt.offsets().to(indices.dtype)


class QuantBatchedEmbeddingBags(nn.Module):
    """Physical tables in int-N TBE kernels, one per pooling group; ``forward`` as ``BatchedEmbeddingBags``.

    Args:
        tables: the physical tables in storage order (``BatchedEmbeddingBags.tables``).
        data_types: table name -> FP32 / FP16 / INT8 / INT4.
        is_weighted: whether lookups carry per-id weights.
        device: where the kernels live.
        row_alignment: each row is padded to a multiple of this many bytes.
        weights: table name -> (rows, scale/bias or None) as ``quantize_state_dict`` makes them; None
            leaves zeros, to be filled by ``load_state_dict``.

    Example::

        float_storage = BatchedEmbeddingBags(
            [EmbeddingBagConfig(name="t1", num_embeddings=100, embedding_dim=16, feature_names=["f1"])]
        )
        storage = QuantBatchedEmbeddingBags.from_float(float_storage, {"t1": DataType.INT8}, is_weighted=False)
        storage(KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([3, 7]), torch.tensor([1, 1]))).shape
        # torch.Size([2, 16]); storage.table_bytes(): {'t1': 3200}
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        data_types: Mapping[str, DataType],
        is_weighted: bool,
        device: torch.device | str | None = None,
        row_alignment: int = DEFAULT_ROW_ALIGNMENT,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._is_weighted = is_weighted
        self._groups = group_by_pooling(tables)
        self.tables: list[EmbeddingBagConfig] = [t for g in self._groups for t in g]
        self.data_types = {t.name: data_types[t.name] for t in self.tables}
        for t in self.tables:
            _check_table(t, self.data_types[t.name])
        self._features_per_group = [sum(t.num_features() for t in g) for g in self._groups]
        self._num_groups = len(self._groups)
        location = EmbeddingLocation.HOST if self._device.type == "cpu" else EmbeddingLocation.DEVICE
        self._emb_modules = nn.ModuleList()
        self.embedding_bags = nn.ModuleDict()
        for group in self._groups:
            emb = IntNBitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=[
                    (
                        t.name,
                        t.num_embeddings,
                        t.embedding_dim,
                        data_type_to_sparse_type(self.data_types[t.name]),
                        location,
                    )
                    for t in group
                ],
                feature_table_map=[i for i, t in enumerate(group) for _ in t.feature_names],
                pooling_mode=pooling_type_to_pooling_mode(group[0].pooling),
                device=self._device,
                weight_lists=[weights[t.name] for t in group] if weights is not None else None,
                output_dtype=data_type_to_sparse_type(DataType.FP32),
                row_alignment=row_alignment,
            )
            if weights is None:
                emb.initialize_weights()
            self._emb_modules.append(emb)
            # Mode 0: each table's whole padded rows (scale/bias included), a view of the kernel's storage.
            for t, (rows, _, _) in zip(group, emb.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)):
                holder = nn.Module()
                holder.register_buffer("weight", rows)
                self.embedding_bags[t.name] = holder

    @classmethod
    def from_float(
        cls,
        storage: BatchedEmbeddingBags,
        data_types: Mapping[str, DataType],
        is_weighted: bool,
        row_alignment: int = DEFAULT_ROW_ALIGNMENT,
    ) -> "QuantBatchedEmbeddingBags":
        """Quantize a trained ``BatchedEmbeddingBags`` table by table (row-wise scale/bias for int-N)."""
        if storage._device.type == "meta":
            raise ValueError("cannot quantize a collection on the meta device: load its weights on cpu first")
        for t in storage.tables:
            _check_table(t, data_types[t.name])
        quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Its state dict holds exactly ``embedding_bags.{table}.weight``, the layout TorchRec's helper reads.
        quantize_state_dict(storage, quantized, dict(data_types))
        return cls(storage.tables, data_types, is_weighted, storage._device, row_alignment, weights=quantized)

    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.feature_names]

    def table_bytes(self) -> dict[str, int]:
        """Bytes each table occupies in its kernel (padded rows, scale/bias included)."""
        return {name: h.weight.numel() * h.weight.element_size() for name, h in self.embedding_bags.items()}

    def table_weights(self) -> dict[str, torch.Tensor]:
        """Each table's dequantized ``[rows, dim]`` float rows (what the kernel pools)."""
        out: dict[str, torch.Tensor] = {}
        for group, emb in zip(self._groups, self._emb_modules):
            parts = emb.split_embedding_weights_with_scale_bias(split_scale_bias_mode=1)
            for t, (rows, scale_bias, _) in zip(group, parts):
                data_type = self.data_types[t.name]
                if data_type == DataType.FP32:
                    out[t.name] = rows.contiguous().view(torch.float32).clone()
                elif data_type == DataType.FP16:
                    out[t.name] = rows.contiguous().view(torch.float16).float()
                else:  # FBGEMM's dequantizer reads scale/bias at the end of each row; the kernel keeps them first
                    fused = torch.cat([rows, scale_bias], dim=1)
                    out[t.name] = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
                        fused, DATA_TYPE_NUM_BITS[data_type]
                    )[:, : t.embedding_dim]
        return out

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        per_group = features.split(self._features_per_group) if self._num_groups > 1 else [features]
        outs: list[torch.Tensor] = []
        for i, emb in enumerate(self._emb_modules):  # indexed, not zipped: fx cannot iterate a traced split
            kjt = per_group[i]
            indices, offsets = _unwrap_kjt(kjt)
            outs.append(
                emb(indices=indices, offsets=offsets, per_sample_weights=kjt.weights() if self._is_weighted else None)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
