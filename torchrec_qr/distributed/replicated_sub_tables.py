"""Row-wise tables' replicated sub-tables: where the sharded module keeps them, and their state-dict keys.

The sub-tables a row-wise compositional table does not split (see ``sub_table_plan``) are dense parameters on
every rank, held in ``_replicated_embedding_bags`` (one ``BatchedEmbeddingBags`` per row sharding type, called
by that sharding's lookup only) and kept in sync by DMP's data-parallel wrapper. In the state dict they appear
under the keys the unsharded module uses (``_embedding_bag_collection.embedding_bags.{sub-table}.weight``), so
checkpoints move between sharded and unsharded modules and between plans.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ParameterSharding
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr.modules.batched_embedding_bags import BatchedEmbeddingBags
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig

__all__ = ["PHYSICAL", "REPLICATED", "register_state_dict_keys", "replicated_bags"]

REPLICATED = "_replicated_embedding_bags"
PHYSICAL = "_embedding_bag_collection"


def replicated_bags(
    tables: list[EmbeddingBagConfig],
    logical_plan: dict[str, ParameterSharding],
    replicated: list[EmbeddingBagConfig],
    device: torch.device | None,
) -> dict[str, BatchedEmbeddingBags]:
    """Sharding type → the replicated sub-tables of the tables sharded that way."""
    owner = {
        sub.name: t.name
        for t in tables
        if isinstance(t, CompositionalEmbeddingBagConfig)
        for sub in t.sub_table_configs()
    }
    by_type: dict[str, list[EmbeddingBagConfig]] = {}
    for c in replicated:
        by_type.setdefault(logical_plan[owner[c.name]].sharding_type, []).append(c)
    return {sharding_type: BatchedEmbeddingBags(configs, device=device) for sharding_type, configs in by_type.items()}


def register_state_dict_keys(module: nn.Module) -> None:
    """Save and load ``module``'s replicated sub-tables under the unsharded module's keys."""
    module._register_state_dict_hook(_replicated_as_physical_keys)
    module._register_load_state_dict_pre_hook(_physical_keys_to_replicated, with_module=True)


def _replicated_as_physical_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Present replicated sub-tables (``_replicated_embedding_bags.{sharding type}.embedding_bags.X``) under
    the keys the unsharded module uses."""
    old = f"{prefix}{REPLICATED}."
    for key in [k for k in state_dict if k.startswith(old)]:
        _, rest = key[len(old) :].split(".", 1)
        state_dict[f"{prefix}{PHYSICAL}.{rest}"] = state_dict.pop(key)


def _physical_keys_to_replicated(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for sharding_type, bags in getattr(module, REPLICATED).items():
        for t in bags.tables:
            key = f"{prefix}{PHYSICAL}.embedding_bags.{t.name}.weight"
            if key in state_dict:
                state_dict[f"{prefix}{REPLICATED}.{sharding_type}.embedding_bags.{t.name}.weight"] = state_dict.pop(key)
