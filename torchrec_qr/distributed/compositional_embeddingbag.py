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

Path tables' functions (``_path_functions``) are dense and replicated on every rank, as TorchRec's
``ShardedFeatureProcessedEmbeddingBagCollection`` does with its feature processors: they are left out of
``sharded_parameter_names`` so DMP's data-parallel wrapper syncs them, and every rank's output takes a
zero-valued term of all of them so that wrapper sees them used on ranks that own no path table. Only the
rank composing an id uses its function; see ``CompositionalLookup`` for the gradient scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_qr.distributed import torchrec_internals as internals
from torchrec_qr.distributed.compositional_lookup import (
    CompositionalLookup,
    GradScaled,
    row_wise_mean_divisor,
    sharded_tables,
)
from torchrec_qr.distributed.replicated_sub_tables import (
    PHYSICAL,
    REPLICATED,
    register_state_dict_keys,
    replicated_bags,
)
from torchrec_qr.distributed.sub_table_plan import (
    ROW_TYPES,
    SUPPORTED_SHARDING_TYPES,
    check_shared_features,
    logical_row_wise_sharding,
    physical_parameter_shardings,
    row_block_size,
    shifted_partitions,
)
from torchrec_qr.modules.batched_embedding_bags import BatchedEmbeddingBags
from torchrec_qr.modules.composition import LocalTable
from torchrec_qr.modules.compositional_embedding_modules import (
    CompositionalEmbeddingBagCollection,
    path_functions_for,
)
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig, physical_table_configs
from torchrec_qr.modules.hot_id_buffers import HotIdBuffers
from torchrec_qr.modules.validation import check_features, check_id_ranges
from torchrec_qr.modules.variable_batch import fixed_batch

__all__ = [
    "CompositionalEmbeddingBagCollectionSharder",
    "CompositionalLookup",
    "ShardedCompositionalEmbeddingBagCollection",
]


_PATHS = "_path_functions"


@dataclass
class _Parts:
    """What the lookups are built from; a plain object, so it can be set before ``Module.__init__`` runs
    (its modules are registered as children once it has)."""

    tables: list[EmbeddingBagConfig]
    logical_plan: dict[str, ParameterSharding]
    physical: ShardedEmbeddingBagCollection
    replicated: dict[str, BatchedEmbeddingBags]
    path_functions: nn.ModuleDict
    env: ShardingEnv
    is_weighted: bool
    output_layout: tuple[list[str], list[int]] = field(default_factory=lambda: ([], []))  # set by _create_lookups


class ShardedCompositionalEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """A ``ShardedEmbeddingBagCollection`` over logical tables whose lookups compose sub-tables locally.

    Output keys, state-dict keys (``_embedding_bag_collection.embedding_bags.{sub-table}.weight``) and
    fused-optimizer keys match the unsharded ``CompositionalEmbeddingBagCollection``. Row-wise tables'
    replicated sub-tables (see ``sub_table_plan``) and path functions are dense parameters kept in sync by
    DMP's data-parallel wrapper; give them the dense optimizer, as for TorchRec's data_parallel tables::

        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: torch.optim.Adagrad(params, lr=0.01))
        optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
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
        check_shared_features(tables, table_name_to_parameter_sharding)
        logical_plan, dist_tables = {}, []
        for t in tables:
            ps = table_name_to_parameter_sharding[t.name]
            rows = t.num_embeddings
            if isinstance(t, CompositionalEmbeddingBagConfig) and ps.sharding_type in ROW_TYPES:
                ps = logical_row_wise_sharding(t, ps, env.world_size, get_local_size(env.world_size))
                rows = row_block_size(t, env.world_size) * env.world_size
            logical_plan[t.name] = ps
            # The dists only need names, sizes and pooling: plain configs, row-wise ones padded to aligned blocks.
            dist_tables.append(
                EmbeddingBagConfig(
                    num_embeddings=rows,
                    embedding_dim=t.embedding_dim,
                    name=t.name,
                    data_type=t.data_type,
                    feature_names=list(t.feature_names),
                    pooling=t.pooling,
                )
            )
        physical_plan, replicated = physical_parameter_shardings(tables, logical_plan)
        sub_tables = EmbeddingBagCollection(
            [c for c in physical_table_configs(tables) if c.name in physical_plan],
            is_weighted=module.is_weighted(),
            device=torch.device("meta"),
        )
        # TorchRec makes an apply_optimizer_in_backward optimizer on the tables it shards the fused one; the
        # sub-tables are built here from configs, so the unsharded module's choice is carried over.
        internals.copy_in_backward_optimizer(module.parameters(), sub_tables.parameters())
        physical = ebc_sharder.shard(
            sub_tables,
            physical_plan,
            env=env,
            device=device,
            module_fqn=append_prefix(module_fqn or "", PHYSICAL),
        )
        # The base constructor calls _create_lookups before this module can hold children: what the lookups
        # read is set first, as a plain attribute (Module.__setattr__ stores non-modules before __init__).
        self._parts = _Parts(
            tables=tables,
            logical_plan=logical_plan,
            physical=physical,
            replicated=replicated_bags(tables, logical_plan, replicated, device),
            # Fresh on every rank; DMP's data-parallel wrapper broadcasts rank 0's values.
            path_functions=path_functions_for(tables, device),
            env=env,
            is_weighted=module.is_weighted(),
        )
        super().__init__(
            EmbeddingBagCollection(dist_tables, is_weighted=module.is_weighted(), device=torch.device("meta")),
            logical_plan,
            env=env,
            fused_params=ebc_sharder.fused_params,
            device=device,
            qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        self._validate_ids = module.validate_ids
        self._row_wise_mean_features = {
            f
            for t in tables
            if t.pooling == PoolingType.MEAN and logical_plan[t.name].sharding_type in ROW_TYPES
            for f in t.feature_names
        }
        self._embedding_bag_collection: ShardedEmbeddingBagCollection = physical
        # Its lookups are called locally and its input dist never runs; TrainPipelineSparseDist checks it did.
        internals.skip_input_dist(physical)
        if self._parts.replicated:
            self._replicated_embedding_bags = nn.ModuleDict(self._parts.replicated)
            register_state_dict_keys(self)
        self._path_functions: nn.ModuleDict = self._parts.path_functions
        self._hot_ids = HotIdBuffers(tables, device)  # replicated; same keys as unsharded, so DCP reshards them
        internals.set_fused_optimizer(self, CombinedOptimizer([(PHYSICAL, physical.fused_optimizer)]))

    def _create_lookups(self) -> None:
        """One ``CompositionalLookup`` per logical sharding, from ``_parts`` only: safe to run again
        (TorchRec's ``update_shards`` does, after clearing the lookups)."""
        parts = self._parts
        physical = internals.lookups_by_sharding_type(parts.physical)
        rank, world_size = parts.env.rank, parts.env.world_size
        grad_scale = world_size if get_gradient_division() else 1
        names: list[str] = []
        dims: list[int] = []
        for sharding_type, sharding in internals.shardings(self):
            names += sharding.embedding_names()
            dims += sharding.embedding_dims()
            sources = []
            if sharding_type in physical:
                lookup = physical[sharding_type]
                inner = lookup.module if isinstance(lookup, DistributedDataParallel) else lookup
                sources.append((lookup, sharded_tables(inner.grouped_configs)))
            row_wise = sharding_type in ROW_TYPES
            if sharding_type in parts.replicated:
                bags = parts.replicated[sharding_type]
                # Without a physical lookup (only schemes with no row split) the bags are source 0, whose
                # gradient the lookup does not rescale: rescale it here.
                module = bags if sources else GradScaled(bags, grad_scale)
                sources.append((module, [LocalTable(t.name, t.feature_names, 0, t.embedding_dim) for t in bags.tables]))
            internals.add_lookup(
                self,
                CompositionalLookup(
                    parts.tables,
                    internals.local_grouped_configs(sharding, rank),
                    sources,
                    parts.is_weighted,
                    mean_after_output_dist=row_wise,
                    replicated_grad_scale=grad_scale,
                    path_functions=parts.path_functions,
                    data_parallel=sharding_type == ShardingType.DATA_PARALLEL.value,
                    partitions=shifted_partitions(parts.tables, parts.logical_plan, rank) if row_wise else None,
                ),
            )
        # The output's keys and widths in the output dist's order, for the row-wise MEAN divisor.
        self._parts.output_layout = (names, dims)

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """Everything but replicated sub-tables and path functions, which DMP's data-parallel wrapper syncs."""
        for name, _ in self.named_parameters(prefix):
            if f"{REPLICATED}." not in name and f"{_PATHS}." not in name:
                yield name

    def init_data_parallel(self) -> None:
        """Data-parallel sub-tables are already DDP-wrapped by ``_embedding_bag_collection``."""

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        """State lives in ``_embedding_bag_collection`` (registered as a child after construction)."""

    def reset_parameters(self) -> None:
        self._embedding_bag_collection.reset_parameters()
        for functions in self._path_functions.values():
            functions.reset_parameters()

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            # Bags expanded to the output batch before the input dist (exact, as the unsharded module does;
            # the ids of a bag read by several samples travel once per sample).
            features = fixed_batch(features)
        check_features(features, [f for t in self._parts.tables for f in t.feature_names], self._parts.is_weighted)
        if self._validate_ids:
            check_id_ranges(features, self._parts.tables)
        awaitable = super().input_dist(ctx, features)
        if ctx.divisor is not None:  # TorchRec made one: some row-wise table pools by MEAN
            # TorchRec's divisor also divides other sharding types' features and uses sum(w) for weighted
            # bags; row-wise MEAN here divides the reduce-scattered sums by each bag's length, as the kernel does.
            ctx.divisor = row_wise_mean_divisor(features, self._row_wise_mean_features, *self._parts.output_layout)
        return awaitable

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: list[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._touch_path_functions(super().output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: EmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self._touch_path_functions(super().compute_and_output_dist(ctx, input))

    def _touch_path_functions(self, awaitable: LazyAwaitable[KeyedTensor]) -> LazyAwaitable[KeyedTensor]:
        """Add ``0 * sum(path parameters)`` to the output, so every rank's graph uses every path function: a
        DDP without a static graph or ``find_unused_parameters`` waits forever for unused ones."""
        params = list(self._path_functions.parameters())
        if params:
            zero = torch.stack([p.sum() for p in params]).sum() * 0.0
            awaitable.callbacks.append(partial(_add_to_values, term=zero))
        return awaitable

    @property
    def unsharded_module_type(self) -> type[CompositionalEmbeddingBagCollection]:
        return CompositionalEmbeddingBagCollection


def _add_to_values(kt: KeyedTensor, term: torch.Tensor) -> KeyedTensor:
    kt.values().add_(term)
    return kt


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

    # The sharding types it serves, and the row-wise ones among them (whose shards split a compositional
    # table's ids); other files ask the sharder instead of listing them.
    SHARDING_TYPES: tuple[str, ...] = SUPPORTED_SHARDING_TYPES
    ROW_WISE_TYPES: tuple[str, ...] = ROW_TYPES

    def shardable_parameters(self, module: CompositionalEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """One meta parameter per logical table, sized as the bytes it really stores (``plan_shape``):
        the planner estimates storage from these shapes; constraints are keyed by the table's name."""
        out: dict[str, nn.Parameter] = {}
        for t in module.embedding_bag_configs():
            rows, cols = self.plan_shape(t, ShardingType.TABLE_WISE.value)
            out[t.name] = nn.Parameter(torch.empty(rows, cols, device="meta"), requires_grad=False)
        internals.copy_in_backward_optimizer(module.parameters(), out.values())  # the planner counts its state
        return out

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self.SHARDING_TYPES)

    @staticmethod
    def plan_shape(table: EmbeddingBagConfig, sharding_type: str) -> tuple[int, int]:
        """``[rows, cols]`` that a plan's shards of ``table`` cut: ``N x D`` for plain tables; for
        compositional ones ``ceil(sum_j |P_j| D_j / D) x D`` (the stored bytes, never N x D), except that
        row-wise shards cut the ids ``N x D`` (the sharder gives each rank a block of ids)."""
        if isinstance(table, CompositionalEmbeddingBagConfig) and sharding_type not in ROW_TYPES:
            return -(-table.num_parameters() // table.embedding_dim), table.embedding_dim
        return table.num_embeddings, table.embedding_dim

    @staticmethod
    def check_table_sharding(
        table: EmbeddingBagConfig, ps: ParameterSharding, world_size: int, local_size: int
    ) -> None:
        """Raise ``ValueError`` unless the sharder can build ``table`` sharded by ``ps``: its own derivation
        of the sub-tables' shardings, run on this table alone (row-wise needs a row split or replication,
        enough rows and per-id composition; path tables cannot be column-wise; see ``sub_table_plan``)."""
        if isinstance(table, CompositionalEmbeddingBagConfig) and ps.sharding_type in ROW_TYPES:
            ps = logical_row_wise_sharding(table, ps, world_size, local_size)
        physical_parameter_shardings([table], {table.name: ps})

    @property
    def module_type(self) -> type[CompositionalEmbeddingBagCollection]:
        return CompositionalEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedCompositionalEmbeddingBagCollection]:
        return ShardedCompositionalEmbeddingBagCollection
