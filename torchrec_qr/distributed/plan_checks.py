"""Check a ``ShardingPlan`` against a model before DistributedModelParallel applies it.

DMP trusts its plan: a table left out, a rank past the world size or shards that leave rows uncovered
surface as assertions (or hangs) deep inside a sharder, on some ranks. These checks name the module and
table instead. Shapes are the ones the planner sees (each sharder's ``shardable_parameters``), except that
row-wise shards of a compositional table split its ids ``[0, N)`` (what its sharder distributes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingPlan, ShardingType

from torchrec_qr.distributed.compositional_embeddingbag import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.planner import default_sharders
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig

__all__ = ["KNOWN_SHARDING_TYPES", "ShardableModule", "shardable_modules", "validate_plan"]

_SHARDER = CompositionalEmbeddingBagCollectionSharder
_TW, _CW, _TWCW = ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value
_RW, _DP = ShardingType.ROW_WISE.value, ShardingType.DATA_PARALLEL.value
# Every type a sharder here serves on CPU: the compositional sharder's are the EBC sharder's plus row-wise.
KNOWN_SHARDING_TYPES = _SHARDER.SHARDING_TYPES
_ROW_TYPES = _SHARDER.ROW_WISE_TYPES
_DENSE = EmbeddingComputeKernel.DENSE.value
FUSED_WIDTH_MULTIPLE = 4  # FBGEMM's fused TBE kernels need every local width to be a multiple of 4


@dataclass(frozen=True)
class ShardableModule:
    """A module DMP will shard, its sharder, and each table's ``[rows, cols]`` as the planner sees it."""

    module: nn.Module
    sharder: ModuleSharder[nn.Module]
    shapes: dict[str, tuple[int, int]]

    def config(self, table: str) -> Any:
        return next(t for t in self.module.embedding_bag_configs() if t.name == table)

    def shape(self, table: str, sharding_type: str) -> tuple[int, int]:
        config = self.config(table)
        if isinstance(config, CompositionalEmbeddingBagConfig):
            return _SHARDER.plan_shape(config, sharding_type)
        return self.shapes[table]

    def sharding_types(self, device_type: str) -> list[str]:
        types = list(self.sharder.sharding_types(device_type))
        if device_type == "cpu" and not isinstance(self.sharder, _SHARDER):
            # TorchRec lists row_wise / table_row_wise for GPUs only, yet its EBC runs them on CPU.
            types += [t for t in _ROW_TYPES if t not in types]
        return types

    def compute_kernels(self, sharding_type: str, device_type: str) -> list[str]:
        kernels = list(self.sharder.compute_kernels(sharding_type, device_type))
        # TorchRec leaves dense (a plain autograd lookup) out of the model-parallel list, but runs it.
        return kernels if _DENSE in kernels else [_DENSE, *kernels]


def shardable_modules(
    model: nn.Module, sharders: list[ModuleSharder[nn.Module]] | None = None
) -> dict[str, ShardableModule]:
    """Path → module for every module a sharder handles: matched by exact type, and not searched below,
    as DMP and the planner do."""
    by_type = {s.module_type: s for s in sharders or default_sharders()}
    out: dict[str, ShardableModule] = {}

    def visit(module: nn.Module, path: str) -> None:
        sharder = by_type.get(type(module))
        if sharder is None:
            for name, child in module.named_children():
                visit(child, f"{path}.{name}" if path else name)
            return
        params = sharder.shardable_parameters(module)
        out[path] = ShardableModule(module, sharder, {n: (int(p.shape[0]), int(p.shape[1])) for n, p in params.items()})

    visit(model, "")
    return out


def validate_plan(
    plan: ShardingPlan,
    model: nn.Module,
    world_size: int,
    device_type: str = "cpu",
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    local_world_size: int | None = None,
) -> None:
    """Raise ``ValueError`` (naming module and table) unless DMP can apply ``plan`` to ``model``."""
    targets = shardable_modules(model, sharders)
    for path in plan.plan:
        if path not in targets:
            raise ValueError(f"unknown module path {path!r}; the model's shardable modules are {sorted(targets)}")
    for path, target in targets.items():
        if path not in plan.plan:
            raise ValueError(f"module {path!r} holds tables {list(target.shapes)} but is not in the plan")
        module_plan: Any = plan.plan[path]
        for name in module_plan:
            if name not in target.shapes:
                raise ValueError(f"module {path!r}: unknown table {name!r}; its tables are {list(target.shapes)}")
        for name in target.shapes:
            if name not in module_plan:
                raise ValueError(f"module {path!r}: table {name!r} is missing from the plan")
            where = f"module {path!r}, table {name!r}"
            _check_table(where, target, name, module_plan[name], world_size, device_type)
            config = target.config(name)
            if isinstance(config, CompositionalEmbeddingBagConfig):
                try:
                    _SHARDER.check_table_sharding(config, module_plan[name], world_size, local_world_size or world_size)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from e


def _check_table(
    where: str, target: ShardableModule, name: str, ps: ParameterSharding, world_size: int, device_type: str
) -> None:
    kind = ps.sharding_type
    if kind not in KNOWN_SHARDING_TYPES:
        raise ValueError(f"{where}: unknown sharding type {kind!r}; known: {list(KNOWN_SHARDING_TYPES)}")
    if kind not in target.sharding_types(device_type):
        raise ValueError(
            f"{where}: {type(target.sharder).__name__} cannot shard it {kind} on {device_type}; "
            f"use one of {target.sharding_types(device_type)}"
        )
    kernels = target.compute_kernels(kind, device_type)
    if ps.compute_kernel not in kernels:
        raise ValueError(
            f"{where}: compute kernel {ps.compute_kernel!r} cannot run {kind} on {device_type}; use one of {kernels}"
        )
    ranks = list(ps.ranks or [])
    _check_ranks(where, ranks, world_size)
    if kind == _DP:
        if ps.sharding_spec is not None or (ps.ranks is not None and ranks != list(range(world_size))):
            raise ValueError(
                f"{where}: data_parallel replicates the table on ranks 0..{world_size - 1}, without shards"
            )
        return
    if not isinstance(ps.sharding_spec, EnumerableShardingSpec) or not ps.sharding_spec.shards:
        raise ValueError(f"{where}: {kind} needs a list of shards")
    shards = ps.sharding_spec.shards
    shard_ranks = [s.placement.rank() for s in shards]
    _check_ranks(where, shard_ranks, world_size)
    if ranks != shard_ranks:
        raise ValueError(f"{where}: ranks {ranks} differ from the shards' placements {shard_ranks}")
    if kind == _RW and ranks != list(range(world_size)):
        raise ValueError(f"{where}: row_wise needs one shard per rank, in rank order 0..{world_size - 1}; got {ranks}")
    config = target.config(name)
    rows, cols = target.shape(name, kind)
    _check_cover(where, shards, kind, rows, cols, config)
    if kind in _ROW_TYPES:
        _check_even_rows(where, shards, rows)
    if ps.compute_kernel != _DENSE:
        _check_widths(where, shards, config)


def _check_ranks(where: str, ranks: list[int], world_size: int) -> None:
    for r in ranks:
        if r is None or not 0 <= r < world_size:
            raise ValueError(f"{where}: rank {r} does not exist at world size {world_size} (ranks 0..{world_size - 1})")


def _check_cover(where: str, shards: list[ShardMetadata], kind: str, rows: int, cols: int, config: Any) -> None:
    """Shards must tile ``rows x cols`` exactly: inside it and, as EnumerableShardingSpec already checked
    that they do not overlap, of total area ``rows x cols``."""
    described = f"the {rows} x {cols} table"
    if isinstance(config, CompositionalEmbeddingBagConfig):
        described += f" ({'rows are its ids' if kind in _ROW_TYPES else 'rows of its stored parameters'})"
    if kind == _TW and len(shards) > 1:
        raise ValueError(f"{where}: table_wise puts the whole table in one shard, got {len(shards)}")
    for i, s in enumerate(shards):
        (r0, c0), (h, w) = s.shard_offsets, s.shard_sizes
        if min(r0, c0, h, w) < 0 or r0 + h > rows or c0 + w > cols:
            raise ValueError(f"{where}: shard {i} (offsets [{r0}, {c0}], sizes [{h}, {w}]) lies outside {described}")
        if kind in (_CW, _TWCW) and (r0, h) != (0, rows):
            raise ValueError(f"{where}: column shard {i} must span all {rows} rows, got rows [{r0}, {r0 + h})")
        if kind in _ROW_TYPES and (c0, w) != (0, cols):
            raise ValueError(f"{where}: row shard {i} must span all {cols} columns, got columns [{c0}, {c0 + w})")
    area = sum(s.shard_sizes[0] * s.shard_sizes[1] for s in shards)
    if area != rows * cols:
        hint = ""
        if isinstance(config, CompositionalEmbeddingBagConfig) and kind in _ROW_TYPES:
            hint = (
                " (TorchRec's planner splits the stored rows instead: plan with "
                "torchrec_qr.distributed.planner.plan_model, whose callback splits the ids)"
            )
        raise ValueError(
            f"{where}: shards cover {area} of the {rows * cols} cells of {described}; they must cover it exactly{hint}"
        )


def _check_even_rows(where: str, shards: list[ShardMetadata], rows: int) -> None:
    """TorchRec 1.8's row-wise input dist sends ids to ranks in equal blocks of ``ceil(rows / shards)``
    whatever the shard sizes say: other sizes would be reported but not served."""
    block = -(-rows // len(shards))
    offsets = [min(i * block, rows) for i in range(len(shards))]
    expected = [min(block, rows - o) for o in offsets]
    sizes = [s.shard_sizes[0] for s in shards]
    if [s.shard_offsets[0] for s in shards] != offsets or sizes != expected:
        raise ValueError(
            f"{where}: row shards of sizes {sizes}; TorchRec routes ids to row shards in equal blocks of "
            f"ceil({rows} / {len(shards)}) = {block}, so only sizes {expected} are served as planned: use those "
            "(or give no shards, only the sharding type)"
        )


def _check_widths(where: str, shards: list[ShardMetadata], config: Any) -> None:
    """Each shard's width per stored table (a concat table's shard may cut several sub-tables)."""
    concat = isinstance(config, CompositionalEmbeddingBagConfig) and config.combine == "concat"
    dims = config.sub_embedding_dims() if concat else [config.embedding_dim]
    for i, s in enumerate(shards):
        lo, hi = s.shard_offsets[1], s.shard_offsets[1] + s.shard_sizes[1]
        start = 0
        for j, d in enumerate(dims):
            width = min(hi, start + d) - max(lo, start)
            if width > 0 and width % FUSED_WIDTH_MULTIPLE:
                part = f" of sub-table {j}" if len(dims) > 1 else ""
                raise ValueError(
                    f"{where}: shard {i} holds {width} columns{part}; FBGEMM's fused kernels need multiples of "
                    f"{FUSED_WIDTH_MULTIPLE} (move the column boundaries or use compute_kernel: dense)"
                )
            start += d
