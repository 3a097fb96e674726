"""Training configuration: the tree of dataclasses of ``config_schema`` loaded from YAML plus ``key=value``
overrides, and the rules across keys.

Everything is checked before any process group starts, so a typo fails in a second with the key path
(``embeddings.combine: must be one of mult/add/concat, got 'mul'``) instead of after data loading and
sharding on every rank. pydantic checks the YAML tree against the dataclass annotations (lax mode: YAML 1.1's
``1e-3`` string reads as a number; unknown keys are errors) and sections check themselves in ``__post_init__``;
cross-field rules live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from torchrec_qr.train.config_schema import (
    CRITEO_NUM_DENSE,
    CRITEO_NUM_SPARSE,
    CheckpointConfig,
    DataConfig,
    DenseOptimizerConfig,
    EmbeddingsConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ShardingConfig,
    SparseOptimizerConfig,
    TrainConfig,
    TrainingConfig,
)

__all__ = [  # the sections are re-exported: the app and its users import them from here
    "CRITEO_NUM_DENSE",
    "CRITEO_NUM_SPARSE",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DenseOptimizerConfig",
    "EmbeddingsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "ShardingConfig",
    "SparseOptimizerConfig",
    "TrainConfig",
    "TrainingConfig",
    "config_to_dict",
    "load_config",
    "num_steps",
    "parse_overrides",
    "validate",
]


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message starts with its key path."""


_TRAINING_CONFIG = TypeAdapter(TrainingConfig)


# --- loading -------------------------------------------------------------------------------------

# pydantic (lax mode) checks the YAML tree against the annotations; its errors are phrased here for people.
_PHRASES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true/false",
    "bool_parsing": "expected true/false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
}


def _key_path(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".") or "config"


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    section: Any = TrainingConfig
    for key in loc[:-1]:
        section = typing.get_type_hints(section)[key]
    names = [f.name for f in dataclasses.fields(section) if f.init]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    hint = f"did you mean {_key_path((*loc[:-1], close[0]))!r}? " if close else ""
    return f"{_key_path(loc)}: unknown key; {hint}known keys: {', '.join(names)}"


def _message(error: Any) -> str:
    """One pydantic error as ``<key path>: <what is wrong>, got <value>``."""
    kind, loc, value = error["type"], error["loc"], error["input"]
    if kind == "unexpected_keyword_argument":
        return _unknown_key(loc)
    if kind == "value_error":  # a section's own check (its __post_init__)
        return f"{_key_path(loc)}: {error['ctx']['error']}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"{_key_path(loc)}: must be one of {'/'.join(choices)}, got {value!r}"
    if kind == "dataclass_type":
        return f"{_key_path(loc)}: expected a mapping of {error['ctx']['class_name']} keys, got {value!r}"
    return f"{_key_path(loc)}: {_PHRASES.get(kind, error['msg'])}, got {value!r}"


def _config_error(errors: list[str]) -> ConfigError:
    return ConfigError("invalid config:\n  " + "\n  ".join(errors) if len(errors) > 1 else errors[0])


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` → nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. embeddings.kind=hash")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} was already given a value")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainingConfig:
    """Read ``path`` (YAML; None = defaults), apply overrides, check types (not cross-field rules)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, model, ...)")
    try:
        cfg = _TRAINING_CONFIG.validate_python(_merge(data, parse_overrides(list(overrides))))
    except ValidationError as e:
        raise _config_error([_message(error) for error in e.errors()]) from e
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "default"
    return cfg


def config_to_dict(cfg: TrainingConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- cross-field rules ---------------------------------------------------------------------------


def _positive(errors: list[str], path: str, value: float | None, allow_zero: bool = False) -> None:
    if value is not None and not math.isfinite(value):
        errors.append(f"{path}: must be a finite number, got {value}")
    elif value is not None and (value < 0 or (value == 0 and not allow_zero)):
        errors.append(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: TrainingConfig, world_size: int, cuda_available: bool) -> None:
    """Raise ``ConfigError`` listing every inconsistent setting (each message starts with its key path)."""
    errors: list[str] = []
    d, m, e, o, s, t = cfg.data, cfg.model, cfg.embeddings, cfg.optimizer, cfg.sharding, cfg.train

    if cfg.run.device == "cuda" and not cuda_available:
        errors.append("run.device: 'cuda' requested but no GPU is visible; use auto or cpu")
    on_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and cuda_available)
    _positive(errors, "run.fail_at_step", cfg.run.fail_at_step)

    if d.global_batch_size < 1 or d.global_batch_size % world_size:
        errors.append(
            f"data.global_batch_size: must be a positive multiple of the world size {world_size}, "
            f"got {d.global_batch_size}"
        )
    if d.eval_batch_size < 1:
        errors.append(f"data.eval_batch_size: must be > 0, got {d.eval_batch_size}")
    _positive(errors, "data.limit_train_rows", d.limit_train_rows)
    _positive(errors, "data.limit_eval_rows", d.limit_eval_rows)
    _positive(errors, "data.max_ind_range", d.max_ind_range)
    sizes = d.num_embeddings_per_feature
    if sizes is not None and (len(sizes) != CRITEO_NUM_SPARSE or min(sizes) < 1):
        errors.append(
            f"data.num_embeddings_per_feature: needs {CRITEO_NUM_SPARSE} positive table sizes (one per "
            f"categorical feature), got {len(sizes)} values"
        )
    if d.source == "criteo":
        if d.criteo_path is None:
            errors.append(
                "data.criteo_path: required when data.source=criteo (a directory of day_<n> files or train.txt)"
            )
        elif not Path(d.criteo_path).exists():
            errors.append(f"data.criteo_path: {d.criteo_path} does not exist")
        if d.num_embeddings_per_feature is None and d.max_ind_range is None:
            errors.append(
                "data.num_embeddings_per_feature: Criteo ids are 32-bit hashes; give table sizes "
                "(ids are taken modulo them) or data.max_ind_range"
            )
    elif d.criteo_path is not None or d.num_embeddings_per_feature is not None:
        errors.append("data.source: criteo_path/num_embeddings_per_feature are set but source is 'synthetic'")

    if m.dense_arch_layer_sizes and m.dense_arch_layer_sizes[-1] != m.embedding_dim:
        errors.append(
            f"model.dense_arch_layer_sizes: the last size ({m.dense_arch_layer_sizes[-1]}) must equal "
            f"model.embedding_dim ({m.embedding_dim}): the dense output interacts with the embeddings"
        )
    if not m.dense_arch_layer_sizes:
        errors.append("model.dense_arch_layer_sizes: must not be empty")
    if not m.over_arch_layer_sizes or m.over_arch_layer_sizes[-1] != 1:
        errors.append(f"model.over_arch_layer_sizes: must end with 1 (one logit), got {m.over_arch_layer_sizes}")
    for name in ("embedding_dim", "dcn_num_layers", "dcn_low_rank_dim"):
        _positive(errors, f"model.{name}", getattr(m, name))
    for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
        if any(v < 1 for v in getattr(m, name)):
            errors.append(f"model.{name}: sizes must be positive, got {getattr(m, name)}")
    if m.embedding_dim % 4:
        errors.append(f"model.embedding_dim: fused TBE kernels need a multiple of 4, got {m.embedding_dim}")

    _positive(errors, "embeddings.collisions", e.collisions)
    _positive(errors, "embeddings.threshold", e.threshold, allow_zero=True)
    _positive(errors, "embeddings.hot_rows", e.hot_rows, allow_zero=True)
    if e.hot_rows and e.kind != "compositional":
        errors.append(f"embeddings.hot_rows: hot rows apply to kind=compositional tables, got kind={e.kind}")
    if e.num_partitions < 2:
        errors.append(f"embeddings.num_partitions: must be >= 2, got {e.num_partitions}")
    if e.kind == "compositional":
        if e.scheme == "qr" and e.num_partitions != 2:
            errors.append(
                f"embeddings.num_partitions: scheme qr has exactly 2 partitions, got {e.num_partitions}; "
                "use scheme mixed_radix or chinese_remainder for more"
            )
        if e.scheme == "qr" and e.collisions < 2:
            errors.append("embeddings.collisions: qr needs collisions >= 2 (1 would be a full table)")
        if e.combine == "path" and e.composition != "per_id":
            errors.append("embeddings.composition: combine=path composes each id; use per_id")

    if e.kind == "compositional":
        _check_tables(errors, cfg)
    if e.kind == "auto":
        _check_auto(errors, cfg)
    elif e.memory_per_rank is not None:
        errors.append(f"embeddings.memory_per_rank: applies to embeddings.kind=auto, got kind={e.kind!r}")

    if o.sparse.type == "adam" and not on_gpu:
        errors.append(
            "optimizer.sparse.type: fused 'adam' needs a GPU in fbgemm 1.8; on CPU use sgd, adagrad or rowwise_adagrad"
        )
    for section in ("sparse", "dense"):
        opt = getattr(o, section)
        _positive(errors, f"optimizer.{section}.lr", opt.lr)
        _positive(errors, f"optimizer.{section}.eps", opt.eps)
        _positive(errors, f"optimizer.{section}.weight_decay", opt.weight_decay, allow_zero=True)
        for beta in ("beta1", "beta2"):
            if not 0.0 <= getattr(opt, beta) < 1.0:
                errors.append(f"optimizer.{section}.{beta}: must be in [0, 1), got {getattr(opt, beta)}")

    if s.plan_file is not None:
        if not Path(s.plan_file).is_file():
            errors.append(f"sharding.plan_file: {s.plan_file} is not a file")
        if s.sharding_types is not None:
            errors.append("sharding.sharding_types: constrains the planner; it cannot be combined with plan_file")

    _positive(errors, "train.epochs", t.epochs)
    _positive(errors, "train.max_steps", t.max_steps)
    _positive(errors, "train.eval_every_steps", t.eval_every_steps, allow_zero=True)
    _positive(errors, "train.eval_max_batches", t.eval_max_batches)
    _positive(errors, "train.log_every_steps", t.log_every_steps)
    _positive(errors, "checkpoint.every_steps", cfg.checkpoint.every_steps, allow_zero=True)
    _positive(errors, "checkpoint.keep_last", cfg.checkpoint.keep_last)

    if errors:
        raise _config_error(errors)


def _check_tables(errors: list[str], cfg: TrainingConfig) -> None:
    """Build the tables as training will (``CompositionalEmbeddingBagConfig``, no weights) so the library's own
    checks speak before any process group: complementary partitions, the concat split, path functions.

    Table sizes come from the config (``torchrec_qr.train.data.num_embeddings``); hot ids need the training data's
    id counts, so they are left out here (they change neither the schemes' validity nor the widths). Each
    stored width must then suit FBGEMM's fused kernels.
    """
    if any(err.startswith(("data.", "model.embedding_dim", "embeddings.")) for err in errors):
        return  # the tables are built from these keys: they are reported first
    from torchrec_qr.distributed.plan_checks import FUSED_WIDTH_MULTIPLE
    from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
    from torchrec_qr.train.data import num_embeddings
    from torchrec_qr.train.model import table_configs

    try:
        tables = table_configs(replace(cfg, embeddings=replace(cfg.embeddings, hot_rows=0)), num_embeddings(cfg))
    except ValueError as err:
        errors.append(f"embeddings: {err}")
        return
    widths = (t.sub_embedding_dims() for t in tables if isinstance(t, CompositionalEmbeddingBagConfig))
    dims = next((w for w in widths if any(d % FUSED_WIDTH_MULTIPLE for d in w)), None)
    if dims is None:
        return
    m = FUSED_WIDTH_MULTIPLE
    if len(set(dims)) > 1:  # only concat splits; mult/add widths are model.embedding_dim, checked above
        errors.append(
            f"embeddings.combine: concat splits model.embedding_dim={cfg.model.embedding_dim} into {len(dims)} "
            f"parts of widths {dims}; fused TBE kernels need multiples of {m}: pick a dimension divisible by "
            f"{m * len(dims)}"
        )
    else:
        errors.append(
            f"embeddings.combine: concat sub-tables of width {dims[0]} are not a multiple of {m}, which fused TBE "
            "kernels need; raise model.embedding_dim or use mult/add"
        )


def _check_auto(errors: list[str], cfg: TrainingConfig) -> None:
    # imported here: compression_planner imports this module's package
    from torchrec_qr.distributed.compression_planner import parse_bytes

    e = cfg.embeddings
    if e.memory_per_rank is None:
        errors.append("embeddings.memory_per_rank: embeddings.kind=auto needs a budget per rank, e.g. 8GiB")
    else:
        try:
            parse_bytes(e.memory_per_rank)
        except ValueError as err:
            errors.append(f"embeddings.memory_per_rank: {err}")
    if e.combine not in ("mult", "add"):
        errors.append(f"embeddings.combine: kind=auto sizes mult or add tables, got {e.combine!r}")
    if cfg.sharding.plan_file is not None:
        errors.append("sharding.plan_file: kind=auto chooses tables and plan together for the budget; drop plan_file")


def num_steps(cfg: TrainingConfig, train_rows: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)``: whole global batches only, capped by ``train.max_steps``."""
    per_epoch = train_rows // cfg.data.global_batch_size
    total = per_epoch * cfg.train.epochs
    return per_epoch, total if cfg.train.max_steps is None else min(total, cfg.train.max_steps)
