"""Sharding plans as YAML files: write what the planner chose, read (and check) what a user wrote.

TorchRec 1.8 has no plan file format (``ShardingPlan`` only prints a table), so a plan is stored as the
``ParameterSharding`` s it holds, per module path and logical table::

    world_size: 2                       # optional; checked when present
    modules:
      model.sparse_arch.embedding_bag_collection:
        t_cat_0: {sharding_type: data_parallel, compute_kernel: dense, ranks: [0, 1]}
        t_cat_1:
          sharding_type: column_wise
          compute_kernel: fused
          ranks: [0, 1]
          shards:
          - {rank: 0, offsets: [0, 0], sizes: [250, 8]}
          - {rank: 1, offsets: [0, 8], sizes: [250, 8]}

Shard offsets and sizes are ``[row, column]`` within the parameter the table's sharder exposes
(``shardable_parameters``): ``N x D`` for plain tables, ``ceil(stored parameters / D) x D`` for compositional
ones, whose row_wise / table_row_wise shards instead split the ids ``[0, N)``.

Written by hand, an entry may leave out ``shards``: it is then expanded with TorchRec's
``torchrec.distributed.sharding_plan`` helpers (``ranks`` picks the ranks: one for table_wise, the column
shards' ranks for column_wise; ``host`` the host for table_row_wise; ``compute_kernel`` defaults to fused,
dense for data_parallel). A module's ``"*"`` entry applies to every table it does not list (table_wise over
several ranks takes them in turn)::

    modules:
      ebc:
        t_big: {sharding_type: column_wise, ranks: [0, 1]}
        "*": {sharding_type: table_wise, ranks: [0, 1]}

Loading checks the plan against the model before DistributedModelParallel sees it, so a bad file fails with
the module and table it is about instead of an assertion deep in a sharder.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import (
    column_wise,
    data_parallel,
    placement,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import (
    BoundsCheckMode,
    DataType,
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
)

from torchrec_qr.distributed.plan_checks import KNOWN_SHARDING_TYPES, ShardableModule, shardable_modules, validate_plan
from torchrec_qr.distributed.planner import default_sharders

__all__ = ["load_plan_yaml", "plan_from_yaml_dict", "plan_to_yaml", "plan_to_yaml_dict", "save_plan_yaml"]

logger = logging.getLogger(__name__)

DEFAULT_ENTRY = "*"
_TW, _CW, _TWCW = ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value
_RW, _TWRW, _DP = ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value, ShardingType.DATA_PARALLEL.value
_DENSE = EmbeddingComputeKernel.DENSE.value
_FUSED = EmbeddingComputeKernel.FUSED.value
_ENUM_FIELDS = {"bounds_check_mode": BoundsCheckMode, "output_dtype": DataType}
_BOOL_FIELDS = ("enforce_hbm", "stochastic_rounding")
_ENTRY_KEYS = ("sharding_type", "compute_kernel", "ranks", "shards", "host", *_BOOL_FIELDS, *_ENUM_FIELDS)
_HEADER = """\
# TorchRec sharding plan, per module path and logical table (torchrec_qr.distributed.plan_io).
# Shard [row, column] offsets/sizes are within the parameter each table's sharder exposes: N x D for plain
# tables, ceil(stored parameters / D) x D for compositional ones (row_wise: the ids [0, N)).
"""


# --- writing ---------------------------------------------------------------------------------------


class _Inline(dict):
    """A mapping written on one line (one shard per line keeps long plans readable)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Inline, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
)


def _entry(ps: ParameterSharding, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "sharding_type": ps.sharding_type,
        "compute_kernel": ps.compute_kernel,
        "ranks": list(ps.ranks or []),
    }
    if isinstance(ps.sharding_spec, EnumerableShardingSpec):
        entry["shards"] = [
            _Inline(rank=s.placement.rank(), offsets=list(s.shard_offsets), sizes=list(s.shard_sizes))
            for s in ps.sharding_spec.shards
        ]
    for name in _BOOL_FIELDS:
        if getattr(ps, name) is not None:
            entry[name] = bool(getattr(ps, name))
    for name in _ENUM_FIELDS:
        if getattr(ps, name) is not None:
            entry[name] = getattr(ps, name).name
    for name in ("cache_params", "key_value_params"):
        if getattr(ps, name) is not None:
            logger.warning("%s: %s are not written to YAML plans (the loaded plan uses the defaults)", where, name)
    return entry


def plan_to_yaml_dict(plan: ShardingPlan, world_size: int | None = None) -> dict[str, Any]:
    """The plan as plain data (the YAML file's content); ``world_size`` is recorded when given."""
    modules = {
        path: {table: _entry(ps, f"{path}.{table}") for table, ps in module_plan.items()}
        for path, module_plan in plan.plan.items()
    }
    return {"world_size": world_size, "modules": modules} if world_size is not None else {"modules": modules}


def plan_to_yaml(plan: ShardingPlan, world_size: int | None = None) -> str:
    """The YAML file's text: a header saying what shard offsets mean, then ``plan_to_yaml_dict``."""
    return _HEADER + yaml.dump(
        plan_to_yaml_dict(plan, world_size), Dumper=_Dumper, sort_keys=False, default_flow_style=None
    )


def save_plan_yaml(plan: ShardingPlan, path: str | Path, world_size: int | None = None) -> None:
    Path(path).write_text(plan_to_yaml(plan, world_size))


# --- reading ---------------------------------------------------------------------------------------


def load_plan_yaml(
    path: str | Path,
    model: nn.Module,
    world_size: int,
    device_type: str = "cpu",
    *,
    local_world_size: int | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> ShardingPlan:
    """Read a YAML plan for ``model`` at ``world_size`` ranks; raises ``ValueError`` naming what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    try:
        return plan_from_yaml_dict(
            data, model, world_size, device_type, local_world_size=local_world_size, sharders=sharders
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def plan_from_yaml_dict(
    data: Any,
    model: nn.Module,
    world_size: int,
    device_type: str = "cpu",
    *,
    local_world_size: int | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> ShardingPlan:
    """Build (expanding compact entries) and validate a plan from ``plan_to_yaml_dict``-shaped data."""
    sharders = sharders or default_sharders()
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise ValueError("a plan is a mapping with a 'modules' mapping: {modules: {<module path>: {<table>: ...}}}")
    unknown = set(data) - {"world_size", "modules"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}; a plan has 'modules' and optionally 'world_size'")
    if data.get("world_size", world_size) != world_size:
        raise ValueError(f"the plan was written for world size {data['world_size']}, not {world_size}")
    targets = shardable_modules(model, sharders)
    local_size = local_world_size or world_size
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    for path, tables in data["modules"].items():
        target = _target(targets, path)
        if not isinstance(tables, dict):
            raise ValueError(f"module {path!r}: expected a mapping of table name to its sharding, got {tables!r}")
        default = tables.get(DEFAULT_ENTRY)
        _check_names(path, target, [n for n in tables if n != DEFAULT_ENTRY], complete=default is None)
        module_plan = EmbeddingModuleShardingPlan()
        unlisted = [n for n in target.shapes if n not in tables]
        for name in target.shapes:
            entry, turn = (tables[name], None) if name in tables else (default, unlisted.index(name))
            module_plan[name] = _parse_entry(
                entry, f"module {path!r}, table {name!r}", target, name, world_size, local_size, device_type, turn
            )
        plan[path] = module_plan
    result = ShardingPlan(plan)
    validate_plan(result, model, world_size, device_type, sharders=sharders, local_world_size=local_size)
    return result


def _target(targets: dict[str, ShardableModule], path: str) -> ShardableModule:
    if path not in targets:
        raise ValueError(f"unknown module path {path!r}; the model's shardable modules are {sorted(targets)}")
    return targets[path]


def _check_names(path: str, target: ShardableModule, names: list[str], complete: bool) -> None:
    unknown = [n for n in names if n not in target.shapes]
    if unknown:
        raise ValueError(f"module {path!r}: unknown table {unknown[0]!r}; its tables are {list(target.shapes)}")
    missing = [n for n in target.shapes if n not in names]
    if complete and missing:
        raise ValueError(
            f"module {path!r}: table {missing[0]!r} is missing from the plan (add it, or a {DEFAULT_ENTRY!r} entry)"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, where: str, what: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}")
    return value


def _ints(value: Any, where: str, what: str, length: int | None = None) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ValueError(f"{where}: {what} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{where}: {what} must have {length} entries, got {value!r}")
    return value


def _parse_entry(
    entry: Any,
    where: str,
    target: ShardableModule,
    table: str,
    world_size: int,
    local_size: int,
    device_type: str,
    turn: int | None,
) -> ParameterSharding:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with sharding_type, ..., got {entry!r}")
    unknown = set(entry) - set(_ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {list(_ENTRY_KEYS)}")
    sharding_type = entry.get("sharding_type")
    if sharding_type not in KNOWN_SHARDING_TYPES:
        raise ValueError(f"{where}: unknown sharding_type {sharding_type!r}; use one of {list(KNOWN_SHARDING_TYPES)}")
    kernel = entry.get("compute_kernel", _DENSE if sharding_type == _DP else _FUSED)  # checked by validate_plan
    extras: dict[str, Any] = {}
    for name in _BOOL_FIELDS:
        if name in entry:
            if not isinstance(entry[name], bool):
                raise ValueError(f"{where}: {name} must be true or false, got {entry[name]!r}")
            extras[name] = entry[name]
    for name, enum in _ENUM_FIELDS.items():
        if name in entry:
            if entry[name] not in enum.__members__:
                raise ValueError(f"{where}: {name} must be one of {list(enum.__members__)}, got {entry[name]!r}")
            extras[name] = enum[entry[name]]
    ranks = _ints(entry["ranks"], where, "ranks") if "ranks" in entry else None
    if "shards" in entry:
        ps = _explicit(entry["shards"], ranks, where, sharding_type, kernel, local_size, device_type)
    else:
        ps = _compact(entry, ranks, where, target, table, world_size, local_size, device_type, turn)
    return replace(ps, compute_kernel=kernel, **extras)


def _explicit(
    shards: Any, ranks: list[int] | None, where: str, sharding_type: str, kernel: str, local_size: int, device_type: str
) -> ParameterSharding:
    if sharding_type == _DP:
        raise ValueError(f"{where}: data_parallel tables are replicated whole and have no shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: shards must be a non-empty list of {{rank, offsets, sizes}}")
    metadata = []
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or set(shard) != {"rank", "offsets", "sizes"}:
            raise ValueError(f"{where}: shard {i} must have exactly rank, offsets and sizes, got {shard!r}")
        metadata.append(
            ShardMetadata(
                shard_offsets=_ints(shard["offsets"], where, f"shard {i} offsets", 2),
                shard_sizes=_ints(shard["sizes"], where, f"shard {i} sizes", 2),
                placement=placement(device_type, _int(shard["rank"], where, f"shard {i} rank"), local_size),
            )
        )
    shard_ranks = [s["rank"] for s in shards]
    if ranks is not None and ranks != shard_ranks:
        raise ValueError(f"{where}: ranks {ranks} differ from the shards' ranks {shard_ranks}")
    try:
        spec = EnumerableShardingSpec(metadata)
    except ValueError as e:  # overlapping shards
        raise ValueError(f"{where}: {e}") from e
    return ParameterSharding(sharding_type=sharding_type, compute_kernel=kernel, ranks=shard_ranks, sharding_spec=spec)


def _compact(
    entry: dict[str, Any],
    ranks: list[int] | None,
    where: str,
    target: ShardableModule,
    table: str,
    world_size: int,
    local_size: int,
    device_type: str,
    turn: int | None,
) -> ParameterSharding:
    sharding_type = entry["sharding_type"]
    if "host" in entry and sharding_type != _TWRW:
        raise ValueError(f"{where}: 'host' is for table_row_wise only")
    if sharding_type in (_RW, _DP) and ranks is not None and ranks != list(range(world_size)):
        raise ValueError(f"{where}: {sharding_type} uses every rank; omit ranks or give {list(range(world_size))}")
    if sharding_type == _TW:
        if not ranks or (turn is None and len(ranks) > 1):
            raise ValueError(
                f"{where}: table_wise needs ranks: [<rank>] (a {DEFAULT_ENTRY!r} entry may list ranks to take in turn)"
            )
        generator = table_wise(rank=ranks[(turn or 0) % len(ranks)])
    elif sharding_type in (_CW, _TWCW):
        if not ranks:
            raise ValueError(f"{where}: {sharding_type} needs ranks: the rank of each column shard")
        generator = column_wise(ranks=ranks)
    elif sharding_type == _RW:
        generator = row_wise()
    elif sharding_type == _TWRW:
        if ranks is not None:
            raise ValueError(f"{where}: table_row_wise spreads over one host's ranks: give host: <index>, not ranks")
        host = _int(entry.get("host", 0), where, "host")
        hosts = world_size // local_size
        if not 0 <= host < hosts:
            raise ValueError(
                f"{where}: host {host} does not exist: {world_size} ranks, {local_size} per host, "
                f"hosts are 0..{hosts - 1}"
            )
        generator = table_row_wise(host_index=host)
    else:
        generator = data_parallel()
    rows, cols = target.shape(table, sharding_type)
    param = nn.Parameter(torch.empty(rows, cols, device="meta"), requires_grad=False)
    try:
        ps = generator(param, local_size, world_size, device_type, target.sharder)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"{where}: cannot expand {sharding_type} over {rows} x {cols}: {e}") from e
    return replace(ps, sharding_type=sharding_type)
