"""TorchRec's ``EmbeddingShardingPlanner`` for models holding compositional collections.

Nothing is replaced: the planner enumerates, estimates, proposes and partitions as it does for EBCs. It
sees one parameter per *logical* table (``CompositionalEmbeddingBagCollectionSharder.shardable_parameters``)
sized as the bytes its sub-tables really store, so storage and perf estimates come from the stored rows
(never N x D) and ``ParameterConstraints`` are keyed by the logical table name. One callback runs on the
chosen plan: row-wise shards of compositional tables are re-expressed over the table's ids ``[0, N)`` (the
sharder splits the id space, not the stored rows); see ``logical_row_shards``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ShardingOption, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import (
    calculate_shard_sizes_and_offsets,
    column_wise,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingPlan, ShardingType

from torchrec_qr.distributed.compositional_embeddingbag import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig

__all__ = [
    "PlannerResult",
    "default_sharders",
    "logical_row_shards",
    "make_planner",
    "plan_model",
    "propose_plan",
    "sharder_rejects",
    "sharding_constraints",
]

# Memory kept free for dense parameters, activations and KJTs. TorchRec's default (heuristical) reservation
# warns that it over-estimates dense tensors of models built on the meta device, which is how ours are built.
STORAGE_RESERVATION = 0.15


def default_sharders(fused_params: dict | None = None) -> list[ModuleSharder[nn.Module]]:
    """Sharders for compositional collections and plain EBCs (a model may hold both)."""
    return [
        CompositionalEmbeddingBagCollectionSharder(fused_params=fused_params),
        EmbeddingBagCollectionSharder(fused_params=fused_params),
    ]


def sharder_rejects(
    table: CompositionalEmbeddingBagConfig, ps: ParameterSharding, world_size: int, local_world_size: int
) -> str | None:
    """The sharder's error for sharding ``table`` by ``ps`` (None: it can); see
    ``CompositionalEmbeddingBagCollectionSharder.check_table_sharding``."""
    try:
        CompositionalEmbeddingBagCollectionSharder.check_table_sharding(table, ps, world_size, local_world_size)
    except ValueError as e:
        return str(e)
    return None


def _probe(
    table: CompositionalEmbeddingBagConfig,
    sharding_type: str,
    world_size: int,
    local_world_size: int,
    sharder: ModuleSharder[nn.Module],
    compute_device: str,
) -> ParameterSharding:
    """A simple sharding of that type (one column shard for column types) to ask the sharder about."""
    generators = {
        ShardingType.TABLE_WISE.value: table_wise(rank=0),
        ShardingType.ROW_WISE.value: row_wise(),
        ShardingType.TABLE_ROW_WISE.value: table_row_wise(host_index=0),
        ShardingType.DATA_PARALLEL.value: data_parallel(),
    }
    generator = generators.get(sharding_type, column_wise(ranks=[0]))
    rows, cols = CompositionalEmbeddingBagCollectionSharder.plan_shape(table, sharding_type)
    param = nn.Parameter(torch.empty(rows, cols, device="meta"), requires_grad=False)
    ps = generator(param, local_world_size, world_size, compute_device, sharder)
    return replace(ps, sharding_type=sharding_type)


def sharding_constraints(
    model: nn.Module,
    world_size: int,
    constraints: dict[str, ParameterConstraints] | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    compute_device: str = "cpu",
    local_world_size: int | None = None,
) -> dict[str, ParameterConstraints] | None:
    """``constraints`` narrowed so the planner proposes only what the sharders can build.

    A sharder offers sharding types per module; a compositional table whose scheme rules some out (see
    ``sharder_rejects``) gets a per-table constraint, by logical name, without them.
    """
    out = dict(constraints or {})
    sharders = sharders or default_sharders()
    sharder = next((s for s in sharders if s.module_type is CompositionalEmbeddingBagCollection), None)
    if sharder is None:
        return constraints
    local = local_world_size or world_size
    for module in model.modules():
        if type(module) is not CompositionalEmbeddingBagCollection:
            continue
        for table in module.embedding_bag_configs():
            if not isinstance(table, CompositionalEmbeddingBagConfig):
                continue
            offered = sharder.sharding_types(compute_device)
            problems = {
                t: sharder_rejects(
                    table, _probe(table, t, world_size, local, sharder, compute_device), world_size, local
                )
                for t in offered
            }
            if not any(problems.values()):
                continue
            given = out.get(table.name)
            wanted = given.sharding_types if given is not None and given.sharding_types else offered
            allowed = [t for t in wanted if t in offered and problems[t] is None]
            if not allowed:
                reasons = "; ".join(p for t, p in problems.items() if t in wanted and p)
                raise ValueError(f"constraints for table {table.name!r} allow only {wanted}, but {reasons}")
            out[table.name] = (
                replace(given, sharding_types=allowed) if given else ParameterConstraints(sharding_types=allowed)
            )
    return out or None


def logical_row_shards(options: list[ShardingOption]) -> list[ShardingOption]:
    """Planner callback: row-wise shards of compositional tables cut the ids ``[0, N)``, not stored rows.

    The planner splits the parameter it was shown (``ceil(stored / D)`` rows); the sharder assigns each
    rank a block of *ids*. The rows are rewritten to ``row_wise()``'s even split of ``N`` (same shard count,
    ranks and storage estimates), so plans from the planner and hand-written ones mean the same thing.
    """
    for option in options:
        module = option.module[1]
        row_wise = option.sharding_type in CompositionalEmbeddingBagCollectionSharder.ROW_WISE_TYPES
        if not row_wise or not isinstance(module, CompositionalEmbeddingBagCollection):
            continue
        table = next(t for t in module.embedding_bag_configs() if t.name == option.name)
        if not isinstance(table, CompositionalEmbeddingBagConfig):
            continue
        n = len(option.shards)
        ids = torch.empty(table.num_embeddings, table.embedding_dim, device="meta")
        sizes, offsets = calculate_shard_sizes_and_offsets(ids, n, n, ShardingType.ROW_WISE.value)
        for shard, size, offset in zip(option.shards, sizes, offsets):
            shard.size, shard.offset = list(size), list(offset)
    return options


def make_planner(
    world_size: int,
    *,
    constraints: dict[str, ParameterConstraints] | None = None,
    batch_size: int | None = None,
    compute_device: str = "cpu",
    local_world_size: int | None = None,
    capture: list[ShardingOption] | None = None,
    memory_per_rank: int | None = None,
    headroom: float = STORAGE_RESERVATION,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` with the logical-row callback; ``capture`` receives the chosen options.

    It balances what TorchRec balances: estimated step time per rank (memory only has to fit).
    ``memory_per_rank`` caps each rank's HBM (cuda) or DDR (cpu) in bytes (default: TorchRec's topology
    defaults); ``headroom`` is the fraction of it kept free for what the planner does not count.
    """
    caps: dict[str, int] = {}
    if memory_per_rank is not None:
        caps["hbm_cap_bytes" if compute_device == "cuda" else "ddr_cap_bytes"] = memory_per_rank

    def keep(options: list[ShardingOption]) -> list[ShardingOption]:
        if capture is not None:
            capture[:] = options
        return options

    topology: Topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size or world_size, **caps),
        kernel_config=KernelConfig(compute_device=compute_device),
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(headroom),
        callbacks=[logical_row_shards, keep],
        debug=False,
    )


@dataclass
class PlannerResult:
    """A plan and the planner's chosen sharding options (per-shard storage and perf estimates)."""

    plan: ShardingPlan
    options: list[ShardingOption]

    def storage_per_rank(self) -> dict[int, int]:
        """Estimated bytes per rank (HBM + DDR): tables, optimizer state the planner counts, and I/O buffers."""
        out: dict[int, int] = {}
        for option in self.options:
            for shard in option.shards:
                assert shard.rank is not None and shard.storage is not None
                out[shard.rank] = out.get(shard.rank, 0) + shard.storage.hbm + shard.storage.ddr
        return dict(sorted(out.items()))

    def perf_per_rank(self) -> dict[int, float]:
        """Estimated step time per rank (ms), what TorchRec's partitioner balances."""
        out: dict[int, float] = {}
        for option in self.options:
            for shard in option.shards:
                assert shard.rank is not None and shard.perf is not None
                out[shard.rank] = out.get(shard.rank, 0.0) + shard.perf.total
        return dict(sorted(out.items()))


def propose_plan(
    model: nn.Module,
    world_size: int,
    *,
    constraints: dict[str, ParameterConstraints] | None = None,
    batch_size: int | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    compute_device: str = "cpu",
    local_world_size: int | None = None,
    memory_per_rank: int | None = None,
    headroom: float = STORAGE_RESERVATION,
) -> PlannerResult:
    """Plan in this process (no process group needed) for a topology of ``world_size`` ranks
    (``memory_per_rank``, ``headroom``: as for ``make_planner``)."""
    sharders = sharders or default_sharders()
    constraints = sharding_constraints(model, world_size, constraints, sharders, compute_device, local_world_size)
    options: list[ShardingOption] = []
    planner = make_planner(
        world_size,
        constraints=constraints,
        batch_size=batch_size,
        compute_device=compute_device,
        local_world_size=local_world_size,
        capture=options,
        memory_per_rank=memory_per_rank,
        headroom=headroom,
    )
    return PlannerResult(planner.plan(model, sharders), options)


def plan_model(
    model: nn.Module,
    world_size: int,
    *,
    constraints: dict[str, ParameterConstraints] | None = None,
    batch_size: int | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    compute_device: str = "cpu",
    local_world_size: int | None = None,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """The plan for ``DistributedModelParallel(model, plan=...)``.

    With ``pg``, rank 0 plans and broadcasts (every rank must get the same plan); without, plans locally.

    Example::

        plan = plan_model(model, dist.get_world_size(), batch_size=512, pg=dist.group.WORLD,
                          constraints={"t_user": ParameterConstraints(sharding_types=["column_wise"])})
        dmp = DistributedModelParallel(model, plan=plan, sharders=default_sharders(fused_params))
    """
    if pg is None:
        return propose_plan(
            model,
            world_size,
            constraints=constraints,
            batch_size=batch_size,
            sharders=sharders,
            compute_device=compute_device,
            local_world_size=local_world_size,
        ).plan
    sharders = sharders or default_sharders()
    planner = make_planner(
        world_size,
        constraints=sharding_constraints(model, world_size, constraints, sharders, compute_device, local_world_size),
        batch_size=batch_size,
        compute_device=compute_device,
        local_world_size=local_world_size,
    )
    return planner.collective_plan(model, sharders, pg)
