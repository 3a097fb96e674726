"""``python -m torchrec_qr.plan --config configs/<name>.yaml --world-size N``: print a sharding plan.

Builds the training app's model for the config (tables on the meta device, nothing allocated), runs
TorchRec's planner as ``python -m torchrec_qr.train`` would at that world size (same batch size per rank,
same ``sharding.sharding_types`` constraints), and prints the plan as a YAML plan file, preceded by comment
lines on table sizes and the per-rank estimates. With ``--plan FILE`` (or ``sharding.plan_file`` in the
config) it checks that file against the model instead and prints it expanded. Needs no data and no
process group: ``> plan.yaml`` gives a file to edit and pass back as ``sharding.plan_file``.

With ``--memory-per-rank 8GiB`` (or ``embeddings.kind: auto`` and ``embeddings.memory_per_rank``) the
compression planner also chooses each table's storage for that budget: one line per logical table (rows,
storage, parameter and optimizer-state bytes, sharding, ranks, why), then the plan, as training with
``embeddings.kind=auto`` will use them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import torch
import torch.distributed as dist
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from torchrec_qr.distributed.compression_planner import CompressionPlan, CompressionPlanner
from torchrec_qr.distributed.plan_checks import shardable_modules
from torchrec_qr.distributed.plan_io import load_plan_yaml, plan_to_yaml
from torchrec_qr.distributed.planner import propose_plan
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.train.config import TrainingConfig, load_config
from torchrec_qr.train.data import num_embeddings  # re-exported: torchrec_qr.plan.num_embeddings stays importable
from torchrec_qr.train.memory import format_bytes
from torchrec_qr.train.model import build_model, logical_tables, table_configs

EXIT_BAD_INPUT = 2


def budget_plan(
    cfg: TrainingConfig,
    sizes: list[int],
    world_size: int,
    *,
    local_world_size: int | None = None,
    device_type: str = "cpu",
    batch_size: int | None = None,
) -> CompressionPlan:
    """``embeddings.kind=auto``: storage per table and the plan for ``embeddings.memory_per_rank``.

    Inside a process group rank 0 plans and every rank receives its result (one plan for all, as
    ``plan_model`` does). Deterministic: a run resumed at the same world size gets the same tables and plan.
    """
    e = cfg.embeddings
    if e.memory_per_rank is None:
        raise ValueError("embeddings.memory_per_rank: kind=auto needs a budget per rank, e.g. 8GiB")
    logical = logical_tables(sizes, cfg.model.embedding_dim)
    types = cfg.sharding.sharding_types
    allowed = {t.name: list(types) for t in logical} if types else {}
    planner = CompressionPlanner(
        world_size,
        e.memory_per_rank,
        optimizer=cfg.optimizer.sparse.type,
        threshold=e.threshold,
        combine=e.combine,
        batch_size=batch_size or max(1, cfg.data.global_batch_size // world_size),
        compute_device=device_type,
        local_world_size=local_world_size,
        constraints={n: ParameterConstraints(sharding_types=t) for n, t in allowed.items()} or None,
    )
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    result: list[CompressionPlan | str | None] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            result[0] = planner.plan(logical, model_fn=lambda tables: build_model(cfg, tables, torch.device("meta")))
        except ValueError as err:
            if not distributed:
                raise
            result[0] = str(err)  # every rank raises it, instead of waiting for a plan
    if distributed:
        dist.broadcast_object_list(result, src=0)
    if not isinstance(result[0], CompressionPlan):
        raise ValueError(result[0])
    return result[0]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _stored(t: EmbeddingBagConfig) -> int:
    return t.num_parameters() if isinstance(t, CompositionalEmbeddingBagConfig) else t.num_embeddings * t.embedding_dim


def table_bytes_per_rank(plan: ShardingPlan, model: torch.nn.Module) -> dict[int, float]:
    """Stored table bytes per rank: each shard's share of its table, whole tables for data_parallel (row-wise
    compositional tables also replicate their small sub-tables on every rank, counted here as split)."""
    out: dict[int, float] = {}
    for path, target in shardable_modules(model).items():
        for name, ps in plan.plan[path].items():  # type: ignore[attr-defined]
            config = target.config(name)
            nbytes = _stored(config) * DATA_TYPE_NUM_BITS[config.data_type] / 8
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                for r in ps.ranks:
                    out[r] = out.get(r, 0.0) + nbytes
                continue
            rows, cols = target.shape(name, ps.sharding_type)
            for shard in ps.sharding_spec.shards:
                r = shard.placement.rank()
                out[r] = out.get(r, 0.0) + nbytes * shard.shard_sizes[0] * shard.shard_sizes[1] / (rows * cols)
    return dict(sorted(out.items()))


def _summary(cfg: TrainingConfig, tables: list[EmbeddingBagConfig], world_size: int, batch_size: int) -> list[str]:
    compositional = [t for t in tables if isinstance(t, CompositionalEmbeddingBagConfig)]
    stored = sum(_stored(t) for t in tables)
    full = sum(t.num_embeddings * t.embedding_dim for t in tables)
    return [
        f"world size {world_size}, batch {batch_size} per rank, embeddings.kind={cfg.embeddings.kind}",
        f"{len(tables)} tables ({len(compositional)} compositional): {stored:,} stored parameters, "
        f"{full:,} as full tables ({full / stored:.1f}x)",
    ]


def _choices(budget: CompressionPlan) -> list[str]:
    """One line per logical table, then the totals."""
    width = max(len(c.storage) for c in budget.choices)
    lines = [
        f"{c.name:<10} {c.rows:>13,} rows  {c.storage:<{width}}  params {format_bytes(c.param_bytes):>10}  "
        f"optimizer {format_bytes(c.optimizer_bytes):>10}  {c.sharding_type:<14} ranks {c.ranks}  | {c.reason}"
        for c in budget.choices
    ]
    lines.append(
        f"compression planner: {budget.steps} steps, quality cost {budget.quality_cost:.4f} "
        f"(sum of traffic share x ln collisions); {format_bytes(budget.memory_per_rank)} per rank, "
        f"{budget.headroom:.0%} kept free for dense parameters, activations and the framework"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchrec_qr.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training YAML config (default: built-in defaults)")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--local-world-size", type=int, help="ranks per host (default: all on one host)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="compute device to plan for")
    parser.add_argument("--batch-size", type=int, help="per rank (default: data.global_batch_size / world size)")
    parser.add_argument("--plan", help="check this YAML plan instead of planning (default: sharding.plan_file)")
    parser.add_argument(
        "--memory-per-rank", help="e.g. 8GiB: choose each table's storage to fit (embeddings.kind=auto)"
    )
    parser.add_argument("--output", help="also write the plan to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", force=True)
    warnings.filterwarnings("ignore")  # TorchRec's planner warns about topology and storage defaults

    try:
        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        cfg = load_config(args.config, args.overrides)
        if args.memory_per_rank:
            cfg.embeddings.kind, cfg.embeddings.memory_per_rank = "auto", args.memory_per_rank
        batch_size = args.batch_size or max(1, cfg.data.global_batch_size // args.world_size)
        plan_file = args.plan or cfg.sharding.plan_file
        budget = None
        if cfg.embeddings.kind == "auto":
            if plan_file:
                raise ValueError("--plan / sharding.plan_file: kind=auto chooses tables and plan together; drop it")
            budget = budget_plan(
                cfg,
                num_embeddings(cfg),
                args.world_size,
                local_world_size=args.local_world_size,
                device_type=args.device,
                batch_size=batch_size,
            )
        tables = budget.tables if budget else table_configs(cfg, num_embeddings(cfg))
        model = build_model(cfg, tables, torch.device("meta"))
        lines = _summary(cfg, tables, args.world_size, batch_size)
        if budget:
            plan, estimates = budget.plan, budget.bytes_per_rank
            lines += _choices(budget)
        elif plan_file:
            plan = load_plan_yaml(
                plan_file, model, args.world_size, args.device, local_world_size=args.local_world_size
            )
            lines.append(f"plan checked: {plan_file}")
            estimates = {}
        else:
            types = cfg.sharding.sharding_types
            constraints = {t.name: ParameterConstraints(sharding_types=list(types)) for t in tables} if types else None
            proposal = propose_plan(
                model,
                args.world_size,
                constraints=constraints,
                batch_size=batch_size,
                compute_device=args.device,
                local_world_size=args.local_world_size,
            )
            plan = proposal.plan
            lines.append("proposed by TorchRec's planner" + (f" (sharding types {types})" if types else ""))
            estimates = proposal.storage_per_rank()
    except (ValueError, OSError, PlannerError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    for rank, nbytes in table_bytes_per_rank(plan, model).items():
        line = f"rank {rank}: tables {_mb(nbytes)}"
        if rank in estimates:
            line += f"; planner estimate with optimizer state and I/O {_mb(estimates[rank])}"
        lines.append(line)
    text = "".join(f"# {line}\n" for line in lines) + plan_to_yaml(plan, args.world_size)
    print(text, end="")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
