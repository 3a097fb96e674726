"""The lookup of one logical sharding of ``ShardedCompositionalEmbeddingBagCollection``.

Kept apart from the sharded module: it sees only local tables (``LocalTable``) and the modules it reads
sub-table rows from, never TorchRec's sharding objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.distributed.torchrec_internals import split_tbes
from torchrec_qr.modules.composition import LocalTable, LookupComposer
from torchrec_qr.modules.fused_compose import FusedCompose
from torchrec_qr.modules.partitions import Partition
from torchrec_qr.modules.path_functions import PathFunctions, scale_grad

__all__ = ["CompositionalLookup", "GradScaled", "row_wise_mean_divisor", "sharded_tables"]


def _col_offset(table: Any) -> int:
    meta = table.local_metadata
    return meta.shard_offsets[1] if meta is not None and len(meta.shard_offsets) > 1 else 0


def sharded_tables(grouped: list[GroupedEmbeddingConfig]) -> list[LocalTable]:
    """The local tables (name, features, column offset, width) of one sharding's grouped configs, in order."""
    return [
        LocalTable(t.name, t.feature_names, _col_offset(t), t.local_cols)
        for group in grouped
        for t in group.embedding_tables
    ]


class CompositionalLookup(nn.Module):
    """The lookup of one logical sharding: expand → physical lookups → compose.

    The physical lookups are held outside the module tree: they belong to ``_embedding_bag_collection``
    (TorchRec's TBE lookups, registering parameters and fused optimizers once) and, for row-wise tables, to
    ``_replicated_embedding_bags`` (the replicated small sub-tables); so are the path functions.

    Gradient scales: replicated sub-tables (row-wise, source 1) and, in model-parallel shardings, path
    functions are used on the rank composing an id, where their gradient arrives divided by the world size
    (TorchRec's gradient division); DDP then averages over ranks, dividing again. The ranks' contributions
    are disjoint, so the right total is their sum: ``replicated_grad_scale`` undoes one division. In
    data_parallel, each rank composes its own batch with no division: there DDP's average is already right.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        logical_grouped: list[GroupedEmbeddingConfig],
        sources: list[tuple[nn.Module, list[LocalTable]]],
        is_weighted: bool,
        mean_after_output_dist: bool = False,
        replicated_grad_scale: int = 1,
        path_functions: Mapping[str, PathFunctions] | None = None,
        data_parallel: bool = False,
        partitions: Mapping[tuple[str, str], Partition] | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["_sources"] = [module for module, _ in sources]
        self._is_weighted = is_weighted
        self.replicated_grad_scale = replicated_grad_scale
        self.composer = LookupComposer.for_local_tables(
            tables,
            sharded_tables(logical_grouped),
            [local for _, local in sources],
            is_weighted,
            mean_after_output_dist,
            path_functions,
            1 if data_parallel else replicated_grad_scale,
            sharded_input=True,
        )
        self.composer.partitions.update(partitions or {})  # (table, feature) -> the scheme this rank's ids go through
        # The native kernel composes straight from the TBEs' weights (see ``FusedCompose``). Row-wise shards
        # (partial sums, replicated sub-tables) and data-parallel (dense) lookups keep the reference path.
        tbes = split_tbes(sources[0][0]) if len(sources) == 1 and not mean_after_output_dist else None
        self._fused_compose = (
            FusedCompose.build(self.composer, tbes) if tbes is not None and self.composer.compose_slots else None
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        inputs = self.composer.inputs(features)
        if self._fused_compose is not None and self._fused_compose.serves(inputs):
            return self._fused_compose(inputs)
        lookup_inputs = self.composer.expand(inputs, weighted=self._is_weighted)
        outputs = [lookup(kjt) for lookup, kjt in zip(self._sources, lookup_inputs)]
        if len(outputs) > 1 and self.replicated_grad_scale != 1:
            outputs[1] = scale_grad(outputs[1], self.replicated_grad_scale)
        if not self.composer.compose_slots:
            return outputs[0]  # an empty rank: the physical lookup's placeholder
        looked_up = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return self.composer.compose(inputs, looked_up)


class GradScaled(nn.Module):
    """A replicated lookup whose gradient is multiplied by ``scale`` (see ``CompositionalLookup``); holds
    ``bags`` outside the module tree, like the lookups' other sources."""

    def __init__(self, bags: nn.Module, scale: int) -> None:
        super().__init__()
        self.__dict__["_bags"] = bags
        self.scale = scale

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return scale_grad(self._bags(features), self.scale)


def row_wise_mean_divisor(
    features: KeyedJaggedTensor, mean_features: set[str], names: list[str], dims: list[int]
) -> torch.Tensor:
    """``[B, sum(dims)]``: each row-wise MEAN feature's bag lengths (at least 1) under its columns, else 1: row-wise
    lookups return partial sums (``mean_after_output_dist``), divided by this after the output dist."""
    batch = features.stride()
    lengths = features.lengths().view(-1, batch)
    row_of = {k: i for i, k in enumerate(features.keys())}
    ones = torch.ones(batch, device=lengths.device)
    columns = [lengths[row_of[n]].clamp(min=1).float() if n in mean_features else ones for n in names]
    repeats = torch.tensor(dims, device=lengths.device)
    return torch.repeat_interleave(torch.stack(columns, dim=1), repeats, dim=1, output_size=sum(dims))
