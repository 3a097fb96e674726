"""Storage for the unsharded collection: all physical tables in FBGEMM TBE kernels.

One TBE per pooling type holds every table's rows, so a whole collection is looked up in one (or two) kernel
calls instead of one ``nn.EmbeddingBag`` per table: ``DenseTableBatchedEmbeddingBagsCodegen`` (one flat
parameter, trained by any dense optimizer; held as ``ServableDenseTBE``, which TorchScript can save and
torch.export can trace) or, given an optimizer, ``SplitTableBatchedEmbeddingBagsCodegen``
with the optimizer fused into its backward (as TorchRec's ``FusedEmbeddingBagCollection``): no dense
gradient of the tables is ever materialized. The state dict presents each table as
``embedding_bags.{name}.weight``, the keys TorchRec's ``ShardedEmbeddingBagCollection`` uses, so unsharded
and sharded checkpoints match.
"""

from __future__ import annotations

from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.fused_embedding_modules import EmbeddingFusedOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.modules.dense_tbe import ServableDenseTBE

__all__ = ["BatchedEmbeddingBags", "group_by_pooling"]

_POOLING_MODES = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}
_PRECISIONS = {DataType.FP32: SparseType.FP32, DataType.FP16: SparseType.FP16}


def group_by_pooling(tables: list[EmbeddingBagConfig]) -> list[list[EmbeddingBagConfig]]:
    """Tables split into runs sharing a pooling type and weight precision (one TBE kernel each), in
    first-seen order."""
    groups: dict[tuple[PoolingType, DataType], list[EmbeddingBagConfig]] = {}
    for t in tables:
        if t.pooling not in _POOLING_MODES:
            raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported; use SUM or MEAN")
        if t.data_type not in _PRECISIONS:
            raise ValueError(
                f"table {t.name!r}: data_type {t.data_type} is not supported for training; use FP32 or FP16 "
                "(quantize for inference with torchrec_qr.inference)"
            )
        groups.setdefault((t.pooling, t.data_type), []).append(t)
    return list(groups.values())


class BatchedEmbeddingBags(nn.Module):
    """Tables of one or more pooling groups, each group one dense TBE; ``forward`` takes a KJT whose keys
    are the tables' features in group order and returns ``[stride, sum of feature dims]``.

    On the ``meta`` device no kernel is built: each group is a flat meta parameter of the kernel's size
    (nothing is allocated), so shapes, parameter names and per-parameter attributes (e.g. an
    ``apply_optimizer_in_backward`` optimizer, which the sharder carries over) exist before sharding.

    ``optimizer`` (an ``EmbOptimType``, with ``optimizer_kwargs`` such as ``learning_rate``) fuses that
    optimizer into the kernels' backward; ``fused_optimizer`` then exposes its learning rate and state.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        device: torch.device | None = None,
        optimizer: EmbOptimType | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if device is None:
            device = torch.empty(0).device  # honours a ``with torch.device(...)`` context, as TorchRec's EBC does
        self._device = torch.device(device)
        self._groups = group_by_pooling(tables)
        self.tables: list[EmbeddingBagConfig] = [t for g in self._groups for t in g]
        self._emb_modules = nn.ModuleList()
        self._features_per_group = [sum(t.num_features() for t in g) for g in self._groups]
        for group in self._groups:
            specs = [(t.num_embeddings, t.embedding_dim) for t in group]
            feature_table_map = [i for i, t in enumerate(group) for _ in t.feature_names]
            precision = _PRECISIONS[group[0].data_type]
            if self._device.type == "meta":
                self._emb_modules.append(_MetaKernel(specs, precision.as_dtype()))
            elif optimizer is not None:
                _check_fused_dims(group)
                cpu = self._device.type == "cpu"
                location = EmbeddingLocation.HOST if cpu else EmbeddingLocation.DEVICE
                compute = ComputeDevice.CPU if cpu else ComputeDevice.CUDA
                self._emb_modules.append(
                    SplitTableBatchedEmbeddingBagsCodegen(
                        [(rows, dim, location, compute) for rows, dim in specs],
                        feature_table_map=feature_table_map,
                        pooling_mode=_POOLING_MODES[group[0].pooling],
                        device=self._device,
                        weights_precision=precision,
                        optimizer=optimizer,
                        **(optimizer_kwargs or {}),
                    )
                )
            else:
                self._emb_modules.append(
                    ServableDenseTBE(
                        specs,
                        feature_table_map=feature_table_map,
                        pooling_mode=_POOLING_MODES[group[0].pooling],
                        weights_precision=precision,
                        use_cpu=self._device.type == "cpu",
                    )
                )
        if self._device.type != "meta":
            self.reset_parameters()
        self._optim: KeyedOptimizer | None = None
        if optimizer is not None and self._device.type != "meta":
            self._optim = CombinedOptimizer(
                [
                    ("embedding_bags", EmbeddingFusedOptimizer(group, emb))
                    for group, emb in zip(self._groups, self._emb_modules)
                ]
            )
        self._register_state_dict_hook(_present_tables)
        self._register_load_state_dict_pre_hook(_load_tables, with_module=True)

    __jit_unused_properties__ = ["fused_optimizer"]

    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.feature_names]

    @property
    def fused_optimizer(self) -> KeyedOptimizer | None:
        """The fused optimizer (keys ``embedding_bags.{table}.weight``), or None for dense kernels."""
        return self._optim

    def table_weights(self) -> dict[str, torch.Tensor]:
        """Each table's ``[rows, dim]`` view of the kernel weights (dense kernels: autograd flows to them)."""
        out: dict[str, torch.Tensor] = {}
        for group, emb in zip(self._groups, self._emb_modules):
            if isinstance(emb, SplitTableBatchedEmbeddingBagsCodegen):
                out.update({t.name: w for t, w in zip(group, emb.split_embedding_weights())})
                continue
            offsets = emb.weights_physical_offsets
            for i, t in enumerate(group):
                flat = emb.weights[offsets[i] : offsets[i] + t.num_embeddings * t.embedding_dim]
                out[t.name] = flat.view(t.num_embeddings, t.embedding_dim)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        weights = self.table_weights()
        for t in self.tables:
            if t.init_fn is not None:  # as TorchRec's EmbeddingBagCollection honours it
                t.init_fn(weights[t.name])
            else:
                weights[t.name].uniform_(t.get_weight_init_min(), t.get_weight_init_max())

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self._device.type == "meta":
            raise RuntimeError(
                "a collection on the meta device has no weights: shard it with DMP or build it on cpu/cuda"
            )
        per_group = features.split(self._features_per_group) if len(self._features_per_group) > 1 else [features]
        outs: list[torch.Tensor] = []
        for i, emb in enumerate(self._emb_modules):  # indexed, not zipped: TorchScript unrolls module lists
            kjt = per_group[i]
            weights = kjt.weights_or_none()
            outs.append(
                emb(
                    indices=kjt.values().to(torch.int64),
                    offsets=kjt.offsets().to(torch.int64),
                    per_sample_weights=weights.float() if weights is not None else None,
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _check_fused_dims(tables: list[EmbeddingBagConfig]) -> None:
    for t in tables:
        if t.embedding_dim % 4:
            raise ValueError(
                f"table {t.name!r}: embedding_dim={t.embedding_dim}; FBGEMM's fused kernels need a multiple of 4 "
                "(for concat sub-tables, pass sub_dims that are multiples of 4)"
            )


class _MetaKernel(nn.Module):
    """The shape of a dense TBE kernel on ``meta``: its flat ``weights`` and per-table offsets."""

    def __init__(self, specs: list[tuple[int, int]], dtype: torch.dtype) -> None:
        super().__init__()
        self.weights_physical_offsets = [0]
        for rows, dim in specs:
            self.weights_physical_offsets.append(self.weights_physical_offsets[-1] + rows * dim)
        self.weights = nn.Parameter(torch.empty(self.weights_physical_offsets[-1], dtype=dtype, device="meta"))


def _present_tables(module: BatchedEmbeddingBags, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "_emb_modules.")]:
        del state_dict[key]
    for name, weight in module.table_weights().items():
        state_dict[f"{prefix}embedding_bags.{name}.weight"] = weight.detach()


def _load_tables(
    module: BatchedEmbeddingBags,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    weights = module.table_weights()
    with torch.no_grad():
        for name, weight in weights.items():
            key = f"{prefix}embedding_bags.{name}.weight"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if tuple(value.shape) != tuple(weight.shape):
                error_msgs.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(weight.shape)} here")
                continue
            weight.copy_(value)
    # The kernels' own entries (flat weights, offset buffers) are satisfied with their current values.
    own = nn.Module.state_dict(module._emb_modules, prefix=prefix + "_emb_modules.", keep_vars=True)
    for key, value in own.items():
        state_dict.setdefault(key, value)
