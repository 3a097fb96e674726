"""Sharded ``CompositionalEmbeddingBagCollection``: compose where the rows live, then communicate.

Design (two levels, both TorchRec's own machinery):

- *Logical* level: this module is a ``ShardedEmbeddingBagCollection`` over the logical tables. TorchRec's
  input dist sends each original id once to the rank that owns the table (or column shard), and its output
  dist sends one pooled vector of the table's width per (sample, feature): exactly the bytes a plain sharded
  EBC over the same features sends. Only the lookups differ: each is a ``CompositionalLookup``.
- *Physical* level: ``_embedding_bag_collection``, a real ``ShardedEmbeddingBagCollection`` over the
  sub-tables, sharded by the EBC sharder with a plan derived from the logical one (``sub_table_plan``). It
  owns storage, FBGEMM TBE kernels, fused optimizers, state dict and DCP. Its lookups are called locally,
  never its dists.

``CompositionalLookup`` expands the ids a rank received into sub-table indices, runs the physical lookup
and composes (per id, then pools) into the layout the logical output dist expects.
"""

from __future__ import annotations

from typing import Any, Iterator, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig, KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import Awaitable, ParameterSharding, QuantizedCommCodecs, ShardingEnv
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.distributed.sub_table_plan import SUPPORTED_SHARDING_TYPES, physical_parameter_shardings
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.composition import ComposeSlot, CompositionPlan, ExpandSlot, looks_up_per_id, pools_first
from torchrec_qr.modules.embedding_configs import (
    SUB_TABLE_SEPARATOR,
    CompositionalEmbeddingBagConfig,
    physical_table_configs,
)
from torchrec_qr.modules.validation import check_id_ranges

__all__ = [
    "CompositionalEmbeddingBagCollectionSharder",
    "CompositionalLookup",
    "ShardedCompositionalEmbeddingBagCollection",
]


def _local_tables(grouped: list[GroupedEmbeddingConfig]) -> Iterator[Any]:
    for group in grouped:
        yield from group.embedding_tables


def _col_offset(table: Any) -> int:
    meta = table.local_metadata
    return meta.shard_offsets[1] if meta is not None and len(meta.shard_offsets) > 1 else 0


class CompositionalLookup(nn.Module):
    """The lookup of one logical sharding: expand → physical TBE lookup → compose.

    The physical lookup is held outside the module tree (it belongs to ``_embedding_bag_collection``, which
    registers its parameters and fused optimizer exactly once).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        logical_grouped: list[GroupedEmbeddingConfig],
        physical_lookup: nn.Module,
        is_weighted: bool,
        mean_after_output_dist: bool = False,
    ) -> None:
        super().__init__()
        self.__dict__["_physical_lookup"] = physical_lookup
        self._is_weighted = is_weighted
        inner = physical_lookup.module if hasattr(physical_lookup, "module") else physical_lookup
        self.plan = _lookup_plan(tables, logical_grouped, inner.grouped_configs, is_weighted, mean_after_output_dist)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        looked_up = self._physical_lookup(self.plan.expand(features, weighted=self._is_weighted))
        if not self.plan.compose_slots:
            return looked_up  # an empty rank: the physical lookup's placeholder
        return self.plan.compose(features, looked_up)


def _lookup_plan(
    tables: list[EmbeddingBagConfig],
    logical_grouped: list[GroupedEmbeddingConfig],
    physical_grouped: list[GroupedEmbeddingConfig],
    is_weighted: bool,
    mean_after_output_dist: bool,
) -> CompositionPlan:
    by_name = {t.name: t for t in tables}
    source: dict[str, tuple[EmbeddingBagConfig, int | None]] = {}
    for t in tables:
        if isinstance(t, CompositionalEmbeddingBagConfig):
            source.update({sub.name: (t, j) for j, sub in enumerate(t.sub_table_configs())})
        else:
            source[t.name] = (t, None)

    expand: list[ExpandSlot] = []
    widths: list[int] = []
    block_of: dict[tuple[str, int | None, int], int] = {}  # (logical feature, partition, col offset)
    for shard in _local_tables(physical_grouped):
        logical, j = source[shard.name]
        per_id = looks_up_per_id(logical, is_weighted)
        for phys_feature in shard.feature_names:
            feature = phys_feature if j is None else phys_feature.rsplit(SUB_TABLE_SEPARATOR, 1)[0]
            block_of[(feature, j, _col_offset(shard))] = len(expand)
            expand.append(ExpandSlot(feature, j, per_id))
            widths.append(shard.local_cols)

    compose: list[ComposeSlot] = []
    for shard in _local_tables(logical_grouped):
        t = by_name[shard.name]
        start, width = _col_offset(shard), shard.local_cols
        per_id = looks_up_per_id(t, is_weighted)
        mean = t.pooling == PoolingType.MEAN and not mean_after_output_dist
        for f in shard.feature_names:
            if not isinstance(t, CompositionalEmbeddingBagConfig):
                compose.append(ComposeSlot(f, "none", per_id, mean, (block_of[(f, None, start)],)))
                continue
            if t.combine == "concat":
                blocks, sub_start = [], 0
                for j, d in enumerate(t.sub_embedding_dims()):
                    lo, hi = max(start, sub_start), min(start + width, sub_start + d)
                    if lo < hi:
                        blocks.append(block_of[(f, j, lo - sub_start)])
                    sub_start += d
            else:
                blocks = [block_of[(f, j, start)] for j in range(t.num_partitions)]
            compose.append(ComposeSlot(f, t.combine, per_id, mean, tuple(blocks), pools_first(t)))
    return CompositionPlan(tables, expand, widths, compose)


class ShardedCompositionalEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """A ``ShardedEmbeddingBagCollection`` over logical tables whose lookups compose sub-tables locally.

    Output keys, state-dict keys (``_embedding_bag_collection.embedding_bags.{sub-table}.weight``) and
    fused-optimizer keys match the unsharded ``CompositionalEmbeddingBagCollection``.
    """

    def __init__(
        self,
        module: CompositionalEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> None:
        tables = module.embedding_bag_configs()
        logical_plan = {t.name: table_name_to_parameter_sharding[t.name] for t in tables}
        physical = ebc_sharder.shard(
            EmbeddingBagCollection(physical_table_configs(tables), is_weighted=module.is_weighted(), device=torch.device("meta")),
            physical_parameter_shardings(tables, logical_plan),
            env=env,
            device=device,
            module_fqn=append_prefix(module_fqn or "", "_embedding_bag_collection"),
        )
        # The base constructor builds lookups (see _create_lookups) before this module can hold children.
        self.__dict__["_pending_physical"] = physical
        self.__dict__["_validate_ids"] = module.validate_ids
        super().__init__(
            EmbeddingBagCollection(tables, is_weighted=module.is_weighted(), device=torch.device("meta")),
            logical_plan,
            env=env,
            fused_params=ebc_sharder.fused_params,
            device=device,
            qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        del self.__dict__["_pending_physical"]
        self._embedding_bag_collection: ShardedEmbeddingBagCollection = physical
        self._optim = CombinedOptimizer([("_embedding_bag_collection", physical.fused_optimizer)])

    def _create_lookups(self) -> None:
        physical: ShardedEmbeddingBagCollection = self.__dict__["_pending_physical"]
        by_type = dict(zip(physical._sharding_types, physical._lookups))
        for sharding_type, sharding in zip(self._sharding_types, self._embedding_shardings):
            self._lookups.append(
                CompositionalLookup(
                    self._embedding_bag_configs,
                    sharding._grouped_embedding_configs,
                    by_type[sharding_type],
                    self._is_weighted,
                )
            )

    def init_data_parallel(self) -> None:
        """Data-parallel sub-tables are already DDP-wrapped by ``_embedding_bag_collection``."""

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        """State lives in ``_embedding_bag_collection`` (registered as a child after construction)."""

    def reset_parameters(self) -> None:
        self._embedding_bag_collection.reset_parameters()

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if self._validate_ids:
            check_id_ranges(features, self._embedding_bag_configs)
        return super().input_dist(ctx, features)

    @property
    def unsharded_module_type(self) -> Type[CompositionalEmbeddingBagCollection]:
        return CompositionalEmbeddingBagCollection


class CompositionalEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Shards ``CompositionalEmbeddingBagCollection`` with DMP and the TorchRec planner.

    Takes the same arguments as ``EmbeddingBagCollectionSharder`` (``fused_params`` selects the fused
    optimizer, e.g. ``{"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}``).

    Example::

        model = DistributedModelParallel(
            model, sharders=[CompositionalEmbeddingBagCollectionSharder(fused_params=fp),
                             EmbeddingBagCollectionSharder(fused_params=fp)],
        )
    """

    def __init__(
        self,
        fused_params: dict[str, Any] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)

    def shard(
        self,
        module: CompositionalEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedCompositionalEmbeddingBagCollection:
        return ShardedCompositionalEmbeddingBagCollection(
            module,
            params,
            ebc_sharder=EmbeddingBagCollectionSharder(
                fused_params=self.fused_params, qcomm_codecs_registry=self.qcomm_codecs_registry
            ),
            env=env,
            device=device if device is not None else torch.device("cpu"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(self, module: CompositionalEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """One meta parameter per logical table, sized as the bytes it really stores.

        The planner estimates storage from these shapes, so a compositional table presents
        ``ceil(sum_j |P_j| D_j / D)`` rows of width D (never N x D); constraints are keyed by its name.
        """
        out: dict[str, nn.Parameter] = {}
        for t in module.embedding_bag_configs():
            if isinstance(t, CompositionalEmbeddingBagConfig):
                rows = -(-t.num_parameters() // t.embedding_dim)
            else:
                rows = t.num_embeddings
            out[t.name] = nn.Parameter(torch.empty(rows, t.embedding_dim, device="meta"), requires_grad=False)
        return out

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(SUPPORTED_SHARDING_TYPES)

    @property
    def module_type(self) -> Type[CompositionalEmbeddingBagCollection]:
        return CompositionalEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedCompositionalEmbeddingBagCollection]:
        return ShardedCompositionalEmbeddingBagCollection
