"""Choose each table's storage (full or compositional) so that a model fits a memory budget per rank.

Compression is what people use this library for, yet collisions and thresholds picked by hand are checked
only by the first out-of-memory error. ``CompressionPlanner`` picks them for a topology, then lets TorchRec's
planner shard the result (``torchrec_qr.distributed.planner``), with the fused optimizer's state counted.

Storage ladder of a table of N rows (tables of at most ``threshold`` rows stay full): full, then
quotient-remainder with 2, 4, 8, ... collisions while ``c * c <= N`` (past that the remainder table grows),
then balanced k=3 mixed radix (only where QR's smallest does not fit). Quality cost of a choice:
``sum_t w_t * ln(collisions_t)``, with ``collisions`` the ids sharing a row of the table's largest sub-table
(1 for full) and ``w_t`` the table's share of lookups (from id-frequency counts when given, else equal).

Search: from all-full, each step moves the one table whose next rung saves the most bytes (parameters and
optimizer state) per unit of added cost. The sequence of steps does not depend on the budget; the budget
only decides where it stops: at the first step where TorchRec's planner, with each rank capped at
``memory_per_rank`` less ``headroom``, places every shard and every rank's estimate fits (found by galloping
then bisecting, which takes more compression to never make placement harder). A larger budget therefore
compresses no table more (``_shard`` keeps TorchRec's cap-dependent placement from breaking that). Everything
is deterministic (ties go to the earlier table).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_qr.distributed.compositional_embeddingbag import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.plan_checks import shardable_modules
from torchrec_qr.distributed.planner import STORAGE_RESERVATION, PlannerResult, propose_plan
from torchrec_qr.distributed.sub_table_plan import row_split_stride
from torchrec_qr.distributed.torchrec_internals import set_in_backward_optimizer
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig, compress
from torchrec_qr.modules.partitions import MixedRadix, QuotientRemainder
from torchrec_qr.train.memory import format_bytes
from torchrec_qr.train.optim import optimizer_state_floats_per_row

__all__ = ["CompressionPlan", "CompressionPlanner", "TableChoice", "parse_bytes"]

logger = logging.getLogger(__name__)

DEFAULT_COLLISIONS = tuple(2**i for i in range(1, 31))
# What TorchRec's storage estimator counts state for (it reads the class from the table parameters).
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
STATE_BYTES = 4  # fp32 optimizer state
UNCAPPED = 2**50  # bytes per rank when asking how small the busiest rank can get
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: str | int) -> int:
    """``"8GiB"`` -> 8 * 2**30, ``"500MB"`` -> 500 * 10**6; an int is a byte count."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"memory size must be an int (bytes) or a string like '8GiB', got {value!r}")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {value!r}: expected a number and a unit, e.g. 8GiB, 512MiB or 10GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {value} bytes")
    return value


@dataclass(frozen=True)
class _Rung:
    """One storage of one table: its config, label, collisions and bytes."""

    config: EmbeddingBagConfig
    storage: str
    collisions: int
    param_bytes: int
    optimizer_bytes: int

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class TableChoice:
    """What the planner chose for one logical table, and why.

    Args:
        storage: ``full``, ``qr(c=16)/mult``, ``mixed_radix[358, 358, 358]/mult``, ...; ``collisions``: ids
            sharing a row of its largest sub-table; ``param_bytes`` / ``optimizer_bytes``: one copy of it;
            ``traffic_share``: its weight in the cost; ``sharding_type``, ``ranks``: where the plan puts it.

    Example::

        for c in CompressionPlanner(world_size=2, memory_per_rank="1GiB").plan(tables).choices:
            print(f"{c.name}: {c.storage} on {c.ranks} ({c.reason})")
    """

    name: str
    rows: int
    storage: str
    collisions: int
    param_bytes: int
    optimizer_bytes: int
    traffic_share: float
    sharding_type: str
    ranks: list[int]
    reason: str


@dataclass
class CompressionPlan:
    """The stored tables, what was chosen per table, the sharding plan and its estimates.

    Args:
        tables: the configs to build the collection from (input order; full tables stay plain).
        bytes_per_rank: TorchRec's storage estimate per rank (table shards, fused optimizer state, lookup
            input/output buffers) plus the sub-tables a row-wise compositional table replicates on each rank.
            Not counted (``headroom`` is for them): dense parameters and their optimizer, activations, the
            framework.
        quality_cost: ``sum_t w_t * ln(collisions_t)``; ``steps``: compression steps taken.

    Example::

        result = CompressionPlanner(world_size=2, memory_per_rank="1GiB").plan(tables)  # module path ""
        ebc = CompositionalEmbeddingBagCollection(result.tables, device="meta")
        dmp = DistributedModelParallel(ebc, plan=result.plan, sharders=default_sharders(fused_params))
    """

    tables: list[EmbeddingBagConfig]
    choices: list[TableChoice]
    plan: ShardingPlan
    bytes_per_rank: dict[int, int]
    memory_per_rank: int
    headroom: float
    quality_cost: float
    steps: int


@dataclass
class CompressionPlanner:
    """Chooses full or compositional storage per table, and a sharding plan, to fit ``memory_per_rank``.

    Args:
        world_size: ranks to plan for.
        memory_per_rank: bytes (or ``"8GiB"``) of HBM (cuda) or host memory (cpu) per rank.
        optimizer: the fused sparse optimizer (``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``); its state
            is counted (rowwise Adagrad: one float per row; Adagrad: one per element; Adam: two; SGD: none).
        headroom: fraction of each rank kept free for the dense model, activations and the framework.
        threshold: tables with at most this many rows stay full.
        collisions: the QR collision ladder (ascending); ``allow_mixed_radix``: k=3 past QR's smallest.
        combine: ``mult`` or ``add`` for compositional tables.
        batch_size: per rank, for TorchRec's perf and I/O buffer estimates; ``compute_device``,
            ``local_world_size``, ``constraints`` (sharding types by logical name): as for its planner.

    Example::

        planner = CompressionPlanner(world_size=8, memory_per_rank="8GiB", optimizer="rowwise_adagrad")
        result = planner.plan(tables)  # EmbeddingBagConfigs of the full tables
        for c in result.choices:
            print(c.name, c.storage, c.reason)
        ebc = CompositionalEmbeddingBagCollection(result.tables, device="meta")  # shard with result.plan
    """

    world_size: int
    memory_per_rank: int | str
    optimizer: str = "rowwise_adagrad"
    headroom: float = STORAGE_RESERVATION
    threshold: int = 20_000
    collisions: Sequence[int] = DEFAULT_COLLISIONS
    allow_mixed_radix: bool = True
    combine: str = "mult"
    batch_size: int = 512
    compute_device: str = "cpu"
    local_world_size: int | None = None
    constraints: dict[str, ParameterConstraints] | None = None

    def __post_init__(self) -> None:
        self.memory_per_rank = parse_bytes(self.memory_per_rank)
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        if self.optimizer not in OPTIMIZER_CLASSES:
            raise ValueError(f"optimizer {self.optimizer!r}: use one of {sorted(OPTIMIZER_CLASSES)}")
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.combine not in ("mult", "add"):
            raise ValueError(f"combine {self.combine!r}: the planner sizes mult or add tables (one width per table)")
        if list(self.collisions) != sorted(set(self.collisions)) or min(self.collisions, default=2) < 2:
            raise ValueError(f"collisions must be ascending distinct ints >= 2, got {list(self.collisions)}")

    def plan(
        self,
        tables: Sequence[EmbeddingBagConfig],
        traffic: Mapping[str, float | torch.Tensor] | None = None,
        model_fn: Callable[[list[EmbeddingBagConfig]], nn.Module] | None = None,
    ) -> CompressionPlan:
        """Storage per table and a sharding plan that fit; ``ValueError`` (with the smallest bytes per rank
        reachable) when even the largest allowed compression does not.

        ``traffic``: table name -> lookups (a number) or id-frequency counts (a tensor, summed), for every
        table. ``model_fn``: builds the model (on ``meta``) from the stored tables, so the plan carries its
        module paths; default: a bare ``CompositionalEmbeddingBagCollection`` (module path ``""``).
        """
        for t in tables:
            if isinstance(t, CompositionalEmbeddingBagConfig):
                raise TypeError(f"table {t.name!r} is already compositional; give the full (logical) tables")
        weights = _traffic_shares(tables, traffic)
        ladders = [self._ladder(t) for t in tables]
        steps = _greedy_steps(ladders, weights)
        states = [[0] * len(tables)]
        for i, _, _ in steps:
            states.append(states[-1][:])
            states[-1][i] += 1
        capacity = self.memory_per_rank * (1 - self.headroom)
        total = [sum(ladders[i][lv].bytes for i, lv in enumerate(s)) for s in states]
        start = next((s for s, b in enumerate(total) if b <= capacity * self.world_size), None)
        attempts: dict[int, PlannerResult | None] = {}

        def fits(s: int) -> bool:
            if s not in attempts:
                attempts[s] = self._shard([ladders[i][lv] for i, lv in enumerate(states[s])], model_fn, capacity)
            return attempts[s] is not None

        found = None if start is None else _first_true(fits, start, len(states) - 1)
        if found is None:
            raise ValueError(self._infeasible([ladders[i][-1] for i in range(len(tables))], model_fn))
        result = attempts[found]
        assert result is not None
        rungs = [ladders[i][lv] for i, lv in enumerate(states[found])]
        return self._report(tables, rungs, ladders, weights, steps, result, found)

    # --- ladder and sharding ---------------------------------------------------------------------

    def _rung(self, config: EmbeddingBagConfig, storage: str) -> _Rung:
        compositional = isinstance(config, CompositionalEmbeddingBagConfig)
        subs = config.sub_table_configs() if compositional else [config]
        params = config.num_parameters() if compositional else config.num_embeddings * config.embedding_dim
        state = sum(s.num_embeddings * optimizer_state_floats_per_row(self.optimizer, s.embedding_dim) for s in subs)
        largest = max(s.num_embeddings for s in subs)
        return _Rung(
            config,
            storage,
            -(-config.num_embeddings // largest),
            params * DATA_TYPE_NUM_BITS[config.data_type] // 8,
            state * STATE_BYTES,
        )

    def _ladder(self, table: EmbeddingBagConfig) -> list[_Rung]:
        n = table.num_embeddings
        ladder = [self._rung(table, "full")]
        if n <= self.threshold:
            return ladder
        schemes: list[tuple[str, QuotientRemainder | MixedRadix]] = [
            (f"qr(c={c})", QuotientRemainder(c)) for c in self.collisions if c * c <= n
        ]
        if self.allow_mixed_radix:
            radix = MixedRadix.balanced(n, 3)
            schemes.append((f"mixed_radix{list(radix.radices)}", radix))
        for label, scheme in schemes:
            rung = self._rung(compress([table], scheme, combine=self.combine)[0], f"{label}/{self.combine}")
            if rung.bytes < ladder[-1].bytes:
                ladder.append(rung)
        return ladder

    def _shard(
        self, rungs: list[_Rung], model_fn: Callable[..., nn.Module] | None, capacity: float
    ) -> PlannerResult | None:
        """TorchRec's plan for these tables within ``capacity`` per rank (by this planner's estimate, with
        replicated sub-tables), or None.

        TorchRec's placement is a heuristic whose choice depends on the cap it is given: with more room it
        may pick a layout that overshoots where a tighter cap steers it to one that fits. So it is asked with
        caps that depend on the tables alone — uncapped, then multiples of their average bytes per rank,
        largest first, those above this planner's budget skipped — and the first layout that fits wins. A cap
        that works under one budget is tried under every larger one: a larger budget never fails a step a
        smaller one passed."""
        average = sum(r.bytes for r in rungs) / self.world_size / (1 - self.headroom)
        caps = [UNCAPPED] + [int(m * average) for m in _CAP_MULTIPLES if m * average <= self.memory_per_rank]
        for cap in caps:
            try:
                result = self._propose([r.config for r in rungs], model_fn, cap)
            except PlannerError as e:
                logger.debug("planner could not place the tables under a cap of %s: %s", cap, e)
                continue
            if max(_bytes_per_rank(result, self.optimizer).values(), default=0) <= capacity:
                return result
        return None

    def _propose(
        self, configs: list[EmbeddingBagConfig], model_fn: Callable[..., nn.Module] | None, memory_per_rank: int | None
    ) -> PlannerResult:
        model = (
            model_fn(configs)
            if model_fn
            else CompositionalEmbeddingBagCollection(configs, device="meta", validate_ids=False)
        )
        for target in shardable_modules(model).values():  # TorchRec counts state for the class they carry
            set_in_backward_optimizer(target.module.parameters(), OPTIMIZER_CLASSES[self.optimizer], {})
        return propose_plan(
            model,
            self.world_size,
            constraints=self.constraints,
            batch_size=self.batch_size,
            compute_device=self.compute_device,
            local_world_size=self.local_world_size,
            memory_per_rank=memory_per_rank,
            headroom=self.headroom,
        )

    def _infeasible(self, rungs: list[_Rung], model_fn: Callable[..., nn.Module] | None) -> str:
        where = f"memory_per_rank={format_bytes(self.memory_per_rank)} x {self.world_size} ranks"
        try:
            busiest = max(
                _bytes_per_rank(self._propose([r.config for r in rungs], model_fn, UNCAPPED), self.optimizer).values()
            )
        except PlannerError as e:
            return f"{where}: the tables cannot be placed even at the largest allowed compression: {e}"
        needed = math.ceil(busiest / (1 - self.headroom))
        return (
            f"{where} cannot hold the tables even at the largest allowed compression (every table over "
            f"threshold={self.threshold:,} rows at its last rung): the smallest reachable is {format_bytes(busiest)} "
            f"on the busiest rank, i.e. memory_per_rank >= {needed:,} bytes ({format_bytes(needed)}) with "
            f"{self.headroom:.0%} headroom; raise the budget or the world size, lower the threshold, or allow "
            "more collisions / mixed radix"
        )

    def _report(
        self,
        tables: Sequence[EmbeddingBagConfig],
        rungs: list[_Rung],
        ladders: list[list[_Rung]],
        weights: list[float],
        steps: list[tuple[int, int, float]],
        result: PlannerResult,
        found: int,
    ) -> CompressionPlan:
        taken = steps[:found]
        placed = {o.name: o for o in result.options}
        choices = []
        for i, (table, rung) in enumerate(zip(tables, rungs)):
            n, mine = table.num_embeddings, [(saved, added) for j, saved, added in taken if j == i]
            if len(ladders[i]) == 1:
                reason = f"stays full: {n:,} rows <= threshold {self.threshold:,}"
            elif not mine:
                nxt = ladders[i][1]
                saves = format_bytes(ladders[i][0].bytes - nxt.bytes)
                reason = (
                    f"stays full: its next rung ({nxt.storage}) saves {saves} "
                    f"for +{weights[i] * math.log(nxt.collisions):.4f} cost, less per unit of cost than the "
                    f"{found} steps that met the budget"
                )
            else:
                saved, added = mine[-1]
                reason = (
                    f"{len(mine)} step(s) from full, each among the best bytes saved per unit of cost; the last "
                    f"saved {format_bytes(saved)} for +{added:.4f} cost (traffic share {weights[i]:.1%})"
                )
                if rung.storage.startswith("mixed_radix"):
                    reason += "; QR at its fewest rows did not fit"
            option = placed[table.name]
            ranks = sorted({s.rank for s in option.shards if s.rank is not None})
            choices.append(
                TableChoice(
                    table.name,
                    n,
                    rung.storage,
                    rung.collisions,
                    rung.param_bytes,
                    rung.optimizer_bytes,
                    weights[i],
                    option.sharding_type,
                    ranks,
                    reason,
                )
            )
        cost = sum(w * math.log(r.collisions) for w, r in zip(weights, rungs))
        logger.info("budget met after %d compression steps; quality cost %.4f", found, cost)
        return CompressionPlan(
            [r.config for r in rungs],
            choices,
            result.plan,
            _bytes_per_rank(result, self.optimizer),
            self.memory_per_rank,  # type: ignore[arg-type]
            self.headroom,
            cost,
            found,
        )


def _traffic_shares(
    tables: Sequence[EmbeddingBagConfig], traffic: Mapping[str, float | torch.Tensor] | None
) -> list[float]:
    names = [t.name for t in tables]
    if not names:
        raise ValueError("tables: give at least one EmbeddingBagConfig to plan")
    if len(set(names)) != len(names):
        raise ValueError(f"table names must be unique, got {names}")
    if traffic is None:
        return [1.0 / len(tables)] * len(tables)
    unknown, missing = sorted(set(traffic) - set(names)), [n for n in names if n not in traffic]
    if unknown or missing:
        raise ValueError(f"traffic: give every table's lookups or id counts; unknown {unknown}, missing {missing}")
    counts = [float(torch.as_tensor(traffic[n], dtype=torch.float64).sum()) for n in names]
    if min(counts) < 0 or sum(counts) <= 0:
        raise ValueError(f"traffic: counts must be >= 0 and not all 0, got {dict(zip(names, counts))}")
    return [c / sum(counts) for c in counts]


_CAP_MULTIPLES = (4.0, 2.0, 1.5, 1.25, 1.1, 1.0)  # TorchRec caps tried, x the tables' average bytes per rank


def _greedy_steps(ladders: list[list[_Rung]], weights: list[float]) -> list[tuple[int, int, float]]:
    """(table, bytes saved, cost added) of each step, best ratio first; independent of any budget."""
    level = [0] * len(ladders)
    steps: list[tuple[int, int, float]] = []
    while True:
        best: tuple[float, int, int, float] | None = None
        for i, ladder in enumerate(ladders):
            if level[i] + 1 < len(ladder):
                cur, nxt = ladder[level[i]], ladder[level[i] + 1]
                added = weights[i] * (math.log(nxt.collisions) - math.log(cur.collisions))
                score = (cur.bytes - nxt.bytes) / added if added > 0 else math.inf
                if best is None or score > best[0]:
                    best = (score, i, cur.bytes - nxt.bytes, added)
        if best is None:
            return steps
        level[best[1]] += 1
        steps.append(best[1:])


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Smallest s in [lo, hi] with pred(s), for pred monotone in s: gallop up from lo, then bisect."""
    step, prev = 1, lo - 1
    s = lo
    while not pred(s):
        if s == hi:
            return None
        prev, s = s, min(hi, s + step)
        step *= 2
    while s - prev > 1:
        mid = (prev + s) // 2
        prev, s = (prev, mid) if pred(mid) else (mid, s)
    return s


def _bytes_per_rank(result: PlannerResult, optimizer: str) -> dict[int, int]:
    """TorchRec's per-rank estimate plus what it misses: a row-wise compositional table's shards split only
    the row-split sub-table, the others are replicated on each of its ranks."""
    out = result.storage_per_rank()
    for option in result.options:
        config = next((t for t in option.module[1].embedding_bag_configs() if t.name == option.name), None)
        row_wise = option.sharding_type in CompositionalEmbeddingBagCollectionSharder.ROW_WISE_TYPES
        if not isinstance(config, CompositionalEmbeddingBagConfig) or not row_wise:
            continue
        split, _ = row_split_stride(config)  # the sub-table row-wise shards split; the sharder replicates the rest
        replicated = sum(
            s.num_embeddings
            * (
                s.embedding_dim * DATA_TYPE_NUM_BITS[s.data_type] // 8
                + optimizer_state_floats_per_row(optimizer, s.embedding_dim) * STATE_BYTES
            )
            for j, s in enumerate(config.sub_table_configs())
            if j != split
        )
        for shard in option.shards:
            assert shard.rank is not None
            out[shard.rank] += math.ceil(replicated * (1 - shard.size[0] / config.num_embeddings))
    return out
