"""Every private TorchRec 1.8 member the sharded compositional module uses, in one place.

``ShardedCompositionalEmbeddingBagCollection`` subclasses ``ShardedEmbeddingBagCollection`` and replaces its
``_create_lookups`` hook; what that hook reads (the per-type shardings, each sharding's local grouped configs)
and writes (the lookups) has no public name. Each accessor here has a test in ``tests/test_torchrec_internals.py``,
so a TorchRec upgrade that renames one fails there, by name, instead of deep inside a sharded forward.
"""

from __future__ import annotations

from torch import nn
from torchrec.distributed.embedding_sharding import EmbeddingSharding
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

__all__ = [
    "OVERRIDDEN_HOOKS",
    "add_lookup",
    "local_grouped_configs",
    "lookups_by_sharding_type",
    "set_fused_optimizer",
    "shardings",
    "skip_input_dist",
]

# ``ShardedEmbeddingBagCollection`` methods the sharded module overrides: the constructor calls both (and
# ``update_shards`` calls ``_create_lookups`` again).
OVERRIDDEN_HOOKS = ("_create_lookups", "_initialize_torch_state")


def shardings(module: ShardedEmbeddingBagCollection) -> list[tuple[str, EmbeddingSharding]]:
    """(sharding type, its ``EmbeddingSharding``), in the order of the module's lookups and output dists."""
    return list(zip(module._sharding_types, module._embedding_shardings))


def local_grouped_configs(sharding: EmbeddingSharding, rank: int) -> list[GroupedEmbeddingConfig]:
    """This rank's grouped configs of one sharding (table_wise and table_row_wise keep only per-rank lists)."""
    local = getattr(sharding, "_grouped_embedding_configs", None)
    return local if local is not None else sharding._grouped_embedding_configs_per_rank[rank]  # type: ignore[attr-defined]


def lookups_by_sharding_type(module: ShardedEmbeddingBagCollection) -> dict[str, nn.Module]:
    """Sharding type → the module's lookup for it (DDP-wrapped for data_parallel)."""
    return dict(zip(module._sharding_types, module._lookups))


def add_lookup(module: ShardedEmbeddingBagCollection, lookup: nn.Module) -> None:
    """What ``_create_lookups`` must do once per sharding, in ``shardings`` order."""
    module._lookups.append(lookup)


def skip_input_dist(module: ShardedEmbeddingBagCollection) -> None:
    """Mark a module whose lookups are called directly, so its input dist is never built (and
    ``TrainPipelineSparseDist``, which checks that every sharded module's input dist ran, accepts it)."""
    module._has_uninitialized_input_dist = False


def set_fused_optimizer(module: ShardedEmbeddingBagCollection, optimizer: KeyedOptimizer) -> None:
    """Replace what ``module.fused_optimizer`` returns (and ``update_shards`` reads)."""
    module._optim = optimizer  # type: ignore[assignment]
