"""``python -m torchrec_qr.plan --config configs/<name>.yaml --world-size N``: print a sharding plan.

Builds the training app's model for the config (tables on the meta device, nothing allocated), runs
TorchRec's planner as ``python -m torchrec_qr.train`` would at that world size (same batch size per rank,
same ``sharding.sharding_types`` constraints), and prints the plan as a YAML plan file, preceded by comment
lines on table sizes and the per-rank estimates. With ``--plan FILE`` (or ``sharding.plan_file`` in the
config) it checks that file against the model instead and prints it expanded. Needs no data and no
process group: ``> plan.yaml`` gives a file to edit and pass back as ``sharding.plan_file``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import torch
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from torchrec_qr.distributed.plan_checks import shardable_modules
from torchrec_qr.distributed.plan_io import load_plan_yaml, plan_to_yaml
from torchrec_qr.distributed.planner import propose_plan
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.train.config import CRITEO_NUM_SPARSE, ConfigError, TrainingConfig, load_config
from torchrec_qr.train.model import build_model, table_configs

EXIT_BAD_INPUT = 2


def num_embeddings(cfg: TrainingConfig) -> list[int]:
    """Table sizes without reading data: generator cardinalities, or the Criteo caps."""
    d = cfg.data
    if d.source == "synthetic":
        return list(d.synthetic.cardinalities)
    if d.num_embeddings_per_feature:
        return list(d.num_embeddings_per_feature)
    if d.max_ind_range:
        return [d.max_ind_range] * CRITEO_NUM_SPARSE
    raise ConfigError("data.num_embeddings_per_feature: Criteo table sizes are needed to plan (or data.max_ind_range)")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchrec_qr.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training YAML config (default: built-in defaults)")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--local-world-size", type=int, help="ranks per host (default: all on one host)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="compute device to plan for")
    parser.add_argument("--batch-size", type=int, help="per rank (default: data.global_batch_size / world size)")
    parser.add_argument("--plan", help="check this YAML plan instead of planning (default: sharding.plan_file)")
    parser.add_argument("--output", help="also write the plan to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", force=True)
    warnings.filterwarnings("ignore")  # TorchRec's planner warns about topology and storage defaults

    try:
        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        cfg = load_config(args.config, args.overrides)
        tables = table_configs(cfg, num_embeddings(cfg))
        model = build_model(cfg, tables, torch.device("meta"))
        batch_size = args.batch_size or max(1, cfg.data.global_batch_size // args.world_size)
        lines = _summary(cfg, tables, args.world_size, batch_size)
        plan_file = args.plan or cfg.sharding.plan_file
        if plan_file:
            plan = load_plan_yaml(plan_file, model, args.world_size, args.device,
                                  local_world_size=args.local_world_size)
            lines.append(f"plan checked: {plan_file}")
            estimates = {}
        else:
            types = cfg.sharding.sharding_types
            constraints = {t.name: ParameterConstraints(sharding_types=list(types)) for t in tables} if types else None
            proposal = propose_plan(model, args.world_size, constraints=constraints, batch_size=batch_size,
                                    compute_device=args.device, local_world_size=args.local_world_size)
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
