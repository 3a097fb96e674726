"""Derive the sub-tables' ``ParameterSharding`` from a compositional table's logical one.

A plan names *logical* tables (what users and the planner see); TorchRec stores *physical* tables (plain
tables and sub-tables ``{table}__p{j}``). Each sub-table is placed so that every rank can compose the
logical rows or columns it owns from rows it holds itself:

- table_wise / data_parallel: every sub-table goes where the table goes.
- column_wise / table_column_wise: for ``mult``/``add`` every sub-table is cut at the table's column
  boundaries (composition is element-wise); for ``concat`` each logical shard's column range is
  intersected with each sub-table's slice of the concatenated width.
"""

from __future__ import annotations

from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import ParameterSharding, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig

__all__ = ["SUPPORTED_SHARDING_TYPES", "physical_parameter_shardings"]

SUPPORTED_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)
_COLUMN_TYPES = (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)


def physical_parameter_shardings(
    tables: list[EmbeddingBagConfig], logical: dict[str, ParameterSharding]
) -> dict[str, ParameterSharding]:
    """Physical table name → ParameterSharding, for a logical plan over ``tables``."""
    out: dict[str, ParameterSharding] = {}
    for t in tables:
        ps = logical[t.name]
        if not isinstance(t, CompositionalEmbeddingBagConfig):
            out[t.name] = ps
            continue
        if ps.sharding_type not in SUPPORTED_SHARDING_TYPES:
            raise ValueError(
                f"table {t.name!r}: sharding type {ps.sharding_type!r} is not supported for compositional "
                f"tables; use one of {SUPPORTED_SHARDING_TYPES}"
            )
        offset = 0
        for sub in t.sub_table_configs():
            out[sub.name] = _sub_table_sharding(t, ps, sub, offset)
            if t.combine == "concat":
                offset += sub.embedding_dim
    return out


def _sub_table_sharding(
    table: CompositionalEmbeddingBagConfig, ps: ParameterSharding, sub: EmbeddingBagConfig, col_offset: int
) -> ParameterSharding:
    if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
        return ParameterSharding(sharding_type=ps.sharding_type, compute_kernel=ps.compute_kernel)
    assert isinstance(ps.sharding_spec, EnumerableShardingSpec), f"table {table.name!r} has no shard metadata"
    shards: list[ShardMetadata] = []
    ranks: list[int] = []
    for shard, rank in zip(ps.sharding_spec.shards, ps.ranks or []):
        start, width = shard.shard_offsets[1], shard.shard_sizes[1]
        if ps.sharding_type in _COLUMN_TYPES and table.combine == "concat":
            lo, hi = max(start, col_offset), min(start + width, col_offset + sub.embedding_dim)
            if lo >= hi:
                continue
            start, width = lo - col_offset, hi - lo
        elif ps.sharding_type not in _COLUMN_TYPES:
            start, width = 0, sub.embedding_dim
        shards.append(
            ShardMetadata(
                shard_offsets=[0, start],
                shard_sizes=[sub.num_embeddings, width],
                placement=shard.placement,
            )
        )
        ranks.append(rank)
    # The sharding type stays the table's, so each logical sharding has one physical lookup to compose from.
    return ParameterSharding(
        sharding_type=ps.sharding_type,
        compute_kernel=ps.compute_kernel,
        ranks=ranks,
        sharding_spec=EnumerableShardingSpec(shards),
        cache_params=ps.cache_params,
        enforce_hbm=ps.enforce_hbm,
        stochastic_rounding=ps.stochastic_rounding,
        bounds_check_mode=ps.bounds_check_mode,
    )
