"""Sharding for training: the plan (file or planner), what is written next to the run, pipelining.

The planner is the project's (``torchrec_qr.distributed.planner``: TorchRec's planner sized by stored
sub-table bytes, proposing only what the sharders can build); plan files are the project's YAML plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from torchrec_qr.distributed.plan_io import load_plan_yaml, save_plan_yaml
from torchrec_qr.distributed.planner import plan_model
from torchrec_qr.train.config import ConfigError, TrainingConfig
from torchrec_qr.train.data import num_embeddings
from torchrec_qr.train.model import build_model, table_configs

__all__ = ["SHARDING_TYPES_FILE", "check_plan_file", "make_plan", "sharding_types", "write_plan"]

SHARDING_TYPES_FILE = "sharding_types.json"


def check_plan_file(cfg: TrainingConfig, world_size: int, local_world_size: int, device_type: str) -> None:
    """Check ``sharding.plan_file`` against the model (built on meta from the config), before any process group."""
    if cfg.sharding.plan_file is None:
        return
    model = build_model(cfg, table_configs(cfg, num_embeddings(cfg)), torch.device("meta"))
    try:
        load_plan_yaml(cfg.sharding.plan_file, model, world_size, device_type, local_world_size=local_world_size)
    except ValueError as e:
        raise ConfigError(f"sharding.plan_file: {e}") from e


def make_plan(
    cfg: TrainingConfig,
    model: torch.nn.Module,
    sharders: list[ModuleSharder[torch.nn.Module]],
    world_size: int,
    local_world_size: int,
    device_type: str,
    pinned: dict[str, str] | None,
) -> ShardingPlan:
    """The plan file's plan, else the planner's (collective: rank 0 plans, all get the same plan).

    ``pinned`` fixes each table's sharding type; on resume a table thereby keeps its optimizer (fused for
    sharded tables, dense for data-parallel ones), so its optimizer state loads at any world size.
    """
    if cfg.sharding.plan_file is not None:
        return load_plan_yaml(
            cfg.sharding.plan_file, model, world_size, device_type, local_world_size=local_world_size, sharders=sharders
        )
    names = [t.name for t in model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()]
    allowed = {n: list(cfg.sharding.sharding_types) for n in names} if cfg.sharding.sharding_types else {}
    allowed.update({n: [pinned[n]] for n in names if pinned and n in pinned})
    return plan_model(
        model,
        world_size,
        constraints={n: ParameterConstraints(sharding_types=types) for n, types in allowed.items()} or None,
        batch_size=cfg.data.global_batch_size // world_size,
        sharders=sharders,
        compute_device=device_type,
        local_world_size=local_world_size,
        pg=dist.GroupMember.WORLD,
    )


def sharding_types(plan: ShardingPlan) -> dict[str, str]:
    """Table name → sharding type, over all sharded modules of the plan."""
    return {table: ps.sharding_type for module in plan.plan.values() for table, ps in module.items()}


def write_plan(plan: ShardingPlan, directory: Path, world_size: int) -> None:
    """``plan.yaml`` (a plan file: pass it back as ``sharding.plan_file``), ``plan.txt`` (TorchRec's table
    view) and the sharding types that a resumed run keeps."""
    save_plan_yaml(plan, directory / "plan.yaml", world_size)
    (directory / "plan.txt").write_text(str(plan) + "\n")
    (directory / SHARDING_TYPES_FILE).write_text(json.dumps(sharding_types(plan), indent=1) + "\n")
