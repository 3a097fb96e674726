"""Derive the sub-tables' ``ParameterSharding`` from a compositional table's logical one.

A plan names *logical* tables (what users and the planner see); TorchRec stores *physical* tables (plain
tables and sub-tables ``{table}__p{j}``). Each sub-table is placed so that every rank can compose the
logical rows or columns it owns from rows it holds itself:

- table_wise / data_parallel: every sub-table goes where the table goes.
- column_wise / table_column_wise: for ``mult``/``add`` every sub-table is cut at the table's column
  boundaries (composition is element-wise); for ``concat`` each logical shard's column range is
  intersected with each sub-table's slice of the concatenated width.
- row_wise: for tables larger than one rank. The id space is cut into blocks of ``B`` ids, ``B`` a
  multiple of the scheme's row-split stride ``s`` (QR: ``c``; mixed radix: the product of the lower
  radices), so rank r's ids ``[rB, (r+1)B)`` use exactly rows ``[rB/s, (r+1)B/s)`` of the large
  sub-table (``id // s``), which is row-wise sharded along those boundaries, and every other class
  depends only on ``id % s``: those small sub-tables are *replicated* on every rank, held outside TorchRec's
  tables and kept in sync by DMP's data-parallel wrapper (like TorchRec's data_parallel tables, they are
  dense parameters for the dense optimizer). A rank receives block-local ids ``id - rB``; since ``B`` is a
  multiple of ``s``, ``partition.indices(local id)`` is already the local row of every sub-table.
  Schemes without a row split (Chinese remainder, explicit maps) have only small sub-tables (about
  ``N^(1/k)`` rows each): all are replicated, the ids are cut into blocks of ``ceil(N / W)``, and the rank
  owning a block composes its ids from ``ShiftedPartition`` (``indices(local id + block offset)``).

Path tables (``combine="path"``) store one sub-table, partition 1's, which goes where the table goes
(table_wise, data_parallel), or is row-split when partition 1 is the row-split one (QuotientRemainder);
their functions are replicated by the sharded module. Column-wise shards cannot compose them: a function
mixes all columns of a row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import BoundsCheckMode, ParameterSharding, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from torchrec_qr.modules.composition import pools_first
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.modules.partitions import HotIds, Partition

__all__ = [
    "ROW_TYPES",
    "SUPPORTED_SHARDING_TYPES",
    "ShiftedPartition",
    "check_shared_features",
    "logical_row_wise_sharding",
    "physical_parameter_shardings",
    "row_block_size",
    "shifted_partitions",
]

SUPPORTED_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)
ROW_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
_COLUMN_TYPES = (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)


@dataclass(frozen=True)
class ShiftedPartition(Partition):
    """``base``'s classes of ``id + offset``: what a row-wise rank needs for the block-local ids it receives
    (ids ``[offset, offset + B)`` arrive as ``[0, B)``) when no class of the scheme follows id blocks."""

    base: Partition
    offset: int

    @property
    def num_partitions(self) -> int:
        return self.base.num_partitions

    def sizes(self, num_embeddings: int) -> list[int]:
        return self.base.sizes(num_embeddings)

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.indices(ids + self.offset)


def row_split_stride(table: CompositionalEmbeddingBagConfig) -> tuple[int | None, int]:
    """The row-split partition and stride of a table to be sharded row-wise (``(None, 1)``: no partition
    follows id blocks, every sub-table is replicated), or a clear error."""
    assert table.partition is not None
    split = table.partition.row_split()
    if split is None:
        if isinstance(table.partition, HotIds):
            raise ValueError(
                f"table {table.name!r}: row_wise cannot shard {table.partition!r} (its hot ids keep rows of their own "
                "wherever they lie in the id range, so no block of ids owns a contiguous range of rows): shard it "
                "table_wise or column_wise"
            )
        if table.combine == "path":
            raise ValueError(
                f"table {table.name!r}: row_wise for combine='path' needs a partition 1 of id // stride "
                f"(QuotientRemainder); {table.partition!r} has none: shard it table_wise or data_parallel"
            )
        split = (None, 1)
    if table.combine == "path" and split[0] != 0:
        raise ValueError(
            f"table {table.name!r}: row_wise for combine='path' needs the row-split partition (id // stride) to "
            f"be partition 1, the one with the embedding sub-table; {table.partition!r} splits partition "
            f"{split[0] + 1}: use QuotientRemainder, or shard it table_wise or data_parallel"
        )
    if pools_first(table):
        raise ValueError(
            f"table {table.name!r}: composition='pooled' mult multiplies whole-bag sums, which row-wise "
            "partial sums cannot reproduce; use composition='per_id' or table_wise/column_wise"
        )
    return split


def row_block_size(table: CompositionalEmbeddingBagConfig, world_size: int) -> int:
    """Ids per rank, ``ceil(N / (W s)) * s``: blocks start on multiples of the row-split stride s."""
    _, stride = row_split_stride(table)
    return -(-table.num_embeddings // (world_size * stride)) * stride


def logical_row_wise_sharding(
    table: CompositionalEmbeddingBagConfig, ps: ParameterSharding, world_size: int, local_size: int
) -> ParameterSharding:
    """The table's row_wise sharding over ``W`` aligned blocks (what TorchRec's input dist bucketizes by).

    table_row_wise is accepted on a single node, where it is the same layout; across nodes the replicated
    sub-tables would be idle on other nodes' ranks, which DDP cannot synchronize.
    """
    if ps.sharding_type == ShardingType.TABLE_ROW_WISE.value and local_size != world_size:
        raise ValueError(
            f"table {table.name!r}: table_row_wise across nodes is not supported for compositional tables "
            f"(world size {world_size}, {local_size} ranks per node); use row_wise or table_wise"
        )
    if ps.ranks is not None and list(ps.ranks) != list(range(world_size)):
        raise ValueError(f"table {table.name!r}: row_wise shards must be on ranks 0..{world_size - 1} in order")
    block = row_block_size(table, world_size)
    placements = (
        [m.placement for m in ps.sharding_spec.shards] if isinstance(ps.sharding_spec, EnumerableShardingSpec) else []
    )
    if len(placements) != world_size:
        raise ValueError(
            f"table {table.name!r}: row_wise needs one shard per rank ({world_size}), got {len(placements)}"
        )
    shards = [
        ShardMetadata(shard_offsets=[r * block, 0], shard_sizes=[block, table.embedding_dim], placement=placements[r])
        for r in range(world_size)
    ]
    return ParameterSharding(
        sharding_type=ps.sharding_type,
        compute_kernel=ps.compute_kernel,
        ranks=list(range(world_size)),
        sharding_spec=EnumerableShardingSpec(shards),
    )


def shifted_partitions(
    tables: list[EmbeddingBagConfig], logical: dict[str, ParameterSharding], rank: int
) -> dict[tuple[str, str], Partition]:
    """(table, feature) → ``ShiftedPartition`` for the row-wise tables without a row split, on ``rank``
    (whose block of ids starts at its shard's row offset)."""
    out: dict[tuple[str, str], Partition] = {}
    for t in tables:
        ps = logical[t.name]
        if not isinstance(t, CompositionalEmbeddingBagConfig) or ps.sharding_type not in ROW_TYPES:
            continue
        if row_split_stride(t)[0] is not None:
            continue
        assert isinstance(ps.sharding_spec, EnumerableShardingSpec)
        offset = next(s.shard_offsets[0] for s in ps.sharding_spec.shards if s.placement.rank() == rank)
        out.update({(t.name, f): ShiftedPartition(t.partition, offset) for f in t.feature_names})
    return out


def check_shared_features(tables: list[EmbeddingBagConfig], plan: dict[str, ParameterSharding]) -> None:
    """A feature read by several tables shards table-, column-wise or data-parallel; row-wise sharding of
    such tables is not supported (each table bucketizes the feature's ids into its own row blocks)."""
    readers: dict[str, list[str]] = {}
    for t in tables:
        for f in t.feature_names:
            readers.setdefault(f, []).append(t.name)
    for f, names in readers.items():
        row_wise = [n for n in names if plan[n].sharding_type in ROW_TYPES]
        if len(names) > 1 and row_wise:
            raise ValueError(
                f"feature {f!r} is read by tables {names}, and {row_wise} are sharded "
                f"{plan[row_wise[0]].sharding_type}: row-wise sharding of tables that share a feature is not "
                "supported; shard them table_wise, column_wise or data_parallel, or give each table its own feature"
            )


def physical_parameter_shardings(
    tables: list[EmbeddingBagConfig], logical: dict[str, ParameterSharding]
) -> tuple[dict[str, ParameterSharding], list[EmbeddingBagConfig]]:
    """Physical table name → ParameterSharding for a logical plan over ``tables`` (row_wise tables already
    in aligned blocks, see ``logical_row_wise_sharding``), and the sub-tables to replicate instead."""
    out: dict[str, ParameterSharding] = {}
    replicated: list[EmbeddingBagConfig] = []
    for t in tables:
        ps = logical[t.name]
        if not isinstance(t, CompositionalEmbeddingBagConfig):
            out[t.name] = _checked_bounds(ps)  # like the sub-tables, so they still share kernels
            continue
        if ps.sharding_type not in SUPPORTED_SHARDING_TYPES:
            raise ValueError(
                f"table {t.name!r}: sharding type {ps.sharding_type!r} is not supported for compositional "
                f"tables; use one of {SUPPORTED_SHARDING_TYPES}"
            )
        if t.combine == "path" and ps.sharding_type in _COLUMN_TYPES:
            raise ValueError(
                f"table {t.name!r}: {ps.sharding_type} cannot compose combine='path' (its functions mix all "
                "columns of a row); shard it table_wise, row_wise or data_parallel"
            )
        if ps.sharding_type in ROW_TYPES:
            split_index, _ = row_split_stride(t)
            for j, sub in enumerate(t.sub_table_configs()):
                if j == split_index:
                    out[sub.name] = _checked_bounds(_row_split_sharding(t, ps, sub))
                else:  # partial sums, like TorchRec's row-wise kernels: MEAN is applied after the output dist
                    replicated.append(replace(sub, pooling=PoolingType.SUM))
            continue
        offset = 0
        for sub in t.sub_table_configs():
            out[sub.name] = _checked_bounds(_sub_table_sharding(t, ps, sub, offset))
            if t.combine == "concat":
                offset += sub.embedding_dim
    return out, replicated


def _checked_bounds(ps: ParameterSharding) -> ParameterSharding:
    """Lookups raise on an index past their table's rows (unless the plan chose a mode), as the unsharded
    module does: FBGEMM's default would read row 0 instead, so an out-of-range id with ``validate_ids=False``
    would silently get some embedding."""
    return ps if ps.bounds_check_mode is not None else replace(ps, bounds_check_mode=BoundsCheckMode.FATAL)


def _row_split_sharding(
    table: CompositionalEmbeddingBagConfig, ps: ParameterSharding, sub: EmbeddingBagConfig
) -> ParameterSharding:
    """Rows ``[r B/s, (r+1) B/s)`` of the row-split sub-table on rank r (B: the aligned block)."""
    assert isinstance(ps.sharding_spec, EnumerableShardingSpec)
    _, stride = row_split_stride(table)
    shards = []
    for r, logical_shard in enumerate(ps.sharding_spec.shards):
        rows_per_rank = logical_shard.shard_sizes[0] // stride
        start = r * rows_per_rank
        size = min(rows_per_rank, sub.num_embeddings - start)
        if size <= 0:
            raise ValueError(
                f"table {table.name!r} is too small to shard row_wise over {len(ps.sharding_spec.shards)} ranks "
                f"(rank {r} would own no rows of {sub.name!r}); shard it table_wise"
            )
        shards.append(
            ShardMetadata(
                shard_offsets=[start, 0], shard_sizes=[size, sub.embedding_dim], placement=logical_shard.placement
            )
        )
    return ParameterSharding(
        sharding_type=ps.sharding_type,
        compute_kernel=ps.compute_kernel,
        ranks=list(ps.ranks or range(len(shards))),
        sharding_spec=EnumerableShardingSpec(shards),
    )


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
