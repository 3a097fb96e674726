"""The keys of the training config: one dataclass per section, defaults included.

``torchrec_qr.train.config`` reads YAML and ``key=value`` overrides into these (pydantic checks types against
the annotations; a section's ``__post_init__`` checks itself) and states the cross-field rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import ConfigDict, with_config

from torchrec_qr.data.synthetic import SyntheticCriteoConfig
from torchrec_qr.modules.path_functions import PathFunction

__all__ = [
    "CRITEO_NUM_DENSE",
    "CRITEO_NUM_SPARSE",
    "CheckpointConfig",
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
]

CRITEO_NUM_SPARSE = 26
CRITEO_NUM_DENSE = 13


@dataclass
class DataConfig:
    """Where rows come from and how they are batched.

    ``global_batch_size`` is split evenly over ranks, so a run resumed at another world size keeps
    the same global batches (and learning dynamics).
    """

    source: Literal["synthetic", "criteo"] = "synthetic"
    cache_dir: str = "~/.cache/torchrec_qr"
    synthetic: SyntheticCriteoConfig = field(default_factory=SyntheticCriteoConfig)
    criteo_path: str | None = None
    num_embeddings_per_feature: list[int] | None = None
    max_ind_range: int | None = None
    skip_malformed: bool = False
    global_batch_size: int = 2048
    eval_batch_size: int = 8192
    shuffle: bool = True
    limit_train_rows: int | None = None
    limit_eval_rows: int | None = None


@dataclass
class ModelConfig:
    """TorchRec's DLRM (dot interaction) or DLRM_DCN (low-rank cross net); the over arch ends in 1 logit."""

    arch: Literal["dlrm", "dcn"] = "dlrm"
    embedding_dim: int = 16
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 64, 16])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16


@dataclass
class EmbeddingsConfig:
    """How each table is stored; tables with at most ``threshold`` rows always stay full.

    ``hash``: the hashing trick, ``ceil(N / collisions)`` rows, id mod rows. ``compositional``:
    ``scheme`` qr (``collisions``), mixed_radix or chinese_remainder (``num_partitions`` balanced parts);
    ``combine=path`` keeps partition 1's table and maps its rows through per-class functions (``path``:
    kind linear|mlp, hidden, activation, bias). ``hot_rows=K`` (compositional only; 0 = off): each compressed
    table keeps its K most frequent training ids (capped by its size) in rows of their own (``HotIds``).
    ``auto``: per table full or compositional (``combine`` mult or add) so that every rank fits
    ``memory_per_rank`` (e.g. ``8GiB``), chosen with the sharding plan by
    ``torchrec_qr.distributed.compression_planner`` for the world size the run starts at.
    """

    kind: Literal["full", "hash", "compositional", "auto"] = "full"
    scheme: Literal["qr", "mixed_radix", "chinese_remainder"] = "qr"
    collisions: int = 4
    num_partitions: int = 2
    combine: Literal["mult", "add", "concat", "path"] = "mult"
    composition: Literal["per_id", "pooled"] = "per_id"
    threshold: int = 0
    path: PathFunction = field(default_factory=PathFunction)
    hot_rows: int = 0
    memory_per_rank: str | None = None


@dataclass
class SparseOptimizerConfig:
    """The fused (FBGEMM, in-backward) optimizer of sharded embedding tables."""

    type: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass
class DenseOptimizerConfig:
    """The torch optimizer of MLPs and data-parallel tables."""

    type: Literal["sgd", "adagrad", "adam", "amsgrad"] = "adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.0


@dataclass
class OptimizerConfig:
    sparse: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    dense: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)


@dataclass
class ShardingConfig:
    """Automatic planning (TorchRec's planner) unless ``plan_file`` names a YAML plan.

    Sharded tables use fused FBGEMM kernels (their optimizer runs in the backward); tables the planner
    makes data-parallel are dense parameters trained by the dense optimizer, as in TorchRec.
    """

    plan_file: str | None = None
    sharding_types: (
        list[Literal["table_wise", "column_wise", "table_column_wise", "data_parallel", "row_wise", "table_row_wise"]]
        | None
    ) = None


@dataclass
class TrainConfig:
    """Length of training and evaluation cadence (``max_steps`` caps ``epochs``; 0 = never)."""

    epochs: int = 1
    max_steps: int | None = None
    eval_every_steps: int = 0
    eval_max_batches: int | None = 20
    log_every_steps: int = 20


@dataclass
class CheckpointConfig:
    """DCP checkpoints in ``<run dir>/checkpoints`` (or ``dir``) every N steps (0 = only at the end); the
    newest ``keep_last`` are kept (null = all). Resuming verifies checksums and falls back past a damaged
    checkpoint with a warning; ``strict_resume`` fails instead."""

    every_steps: int = 0
    at_end: bool = True
    keep_last: int | None = 3
    resume: bool = False
    dir: str | None = None
    strict_resume: bool = False


@dataclass
class RunConfig:
    """Run identity and outputs: ``<output_dir>/<name>`` holds config, plan, metrics, checkpoints.

    ``fail_at_step`` is a fault-injection hook for tests: rank 1 (or 0 at world size 1) SIGKILLs itself
    once after that step, guarded by a marker file in the run directory.
    """

    name: str | None = None
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False
    progress_bar: bool = True
    tensorboard: bool = True
    fail_at_step: int | None = None


@with_config(ConfigDict(extra="forbid"))  # every section inherits it: an unknown key is an error, not ignored
@dataclass
class TrainingConfig:
    """The whole configuration of ``python -m torchrec_qr.train``."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
