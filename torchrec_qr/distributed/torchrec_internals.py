"""Every private TorchRec 1.8 member the sharded compositional module uses, in one place.

``ShardedCompositionalEmbeddingBagCollection`` subclasses ``ShardedEmbeddingBagCollection`` and replaces its
``_create_lookups`` hook; what that hook reads (the per-type shardings, each sharding's local grouped configs)
and writes (the lookups) has no public name. Each accessor here has a test in ``tests/test_torchrec_internals.py``,
so a TorchRec upgrade that renames one fails there, by name, instead of deep inside a sharded forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_sharding import EmbeddingSharding
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

__all__ = [
    "IN_BACKWARD_ATTRIBUTES",
    "OVERRIDDEN_HOOKS",
    "add_lookup",
    "copy_in_backward_optimizer",
    "local_grouped_configs",
    "lookups_by_sharding_type",
    "set_fused_optimizer",
    "set_in_backward_optimizer",
    "shardings",
    "skip_input_dist",
    "split_tbes",
]

# What ``apply_optimizer_in_backward`` sets on a parameter, and TorchRec's sharders and planner read from the
# tables they shard (the fused optimizer, and the optimizer state the planner counts).
IN_BACKWARD_ATTRIBUTES = ("_optimizer_classes", "_optimizer_kwargs")

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


def split_tbes(lookup: nn.Module) -> list[nn.Module] | None:
    """The FBGEMM TBE of each group of a pooled lookup, in its grouped configs' (and tables') order; None for
    any other module."""
    if not isinstance(lookup, GroupedPooledEmbeddingsLookup):
        return None
    return [kernel.emb_module for kernel in lookup._emb_modules]


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


def copy_in_backward_optimizer(sources: Iterable[nn.Parameter], params: Iterable[nn.Parameter]) -> None:
    """Give ``params`` the in-backward optimizer of the first of ``sources`` that has one (if any)."""
    source = next((p for p in sources if hasattr(p, IN_BACKWARD_ATTRIBUTES[0])), None)
    if source is None:
        return
    for param in params:
        for attribute in IN_BACKWARD_ATTRIBUTES:
            setattr(param, attribute, getattr(source, attribute))


def set_in_backward_optimizer(
    params: Iterable[nn.Parameter], optimizer_class: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    """Mark ``params`` as ``apply_optimizer_in_backward`` would, without building the optimizers (for a
    planner that only reads the class)."""
    for param in params:
        param._optimizer_classes = [optimizer_class]  # type: ignore[attr-defined]
        param._optimizer_kwargs = [kwargs]  # type: ignore[attr-defined]
