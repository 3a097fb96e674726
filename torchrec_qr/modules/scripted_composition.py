"""The inference path of ``CompositionalEmbeddingBagCollection``: TorchScript-able, fx-traceable, exportable.

Why it exists: the training path (``composition.py`` + ``grouped_compose.py``) is tuned for eager autograd:
dataclasses and dicts keyed by (table, feature), one custom autograd Function composing every group, host
reads choosing fast paths. TorchScript compiles none of it and ``torch.export`` stops at its data-dependent
branches. This file restates the same function (expand ids to sub-table lookups, one storage call, compose)
with everything structural precomputed into int / bool / str lists at construction, plain tensor ops, and
no Python control flow on data. Semantics are those of the eager module (per id then pool, pooled mode,
per-id weights, MEAN divided by the bag length); ``tests/test_scripted_composition.py`` pins its outputs to
the eager module on the same weights. It is differentiable but not tuned for training.

Under fx symbolic tracing the data-dependent steps are ``torch.fx.wrap`` leaves (free functions TorchScript
compiles), the partition indexers are traced through, and the storage and each path table's functions become
one ``call_module`` node each, so the traced graph scripts with whatever storage module (dense, fused or
quantized TBE) the collection holds. Path functions serve through their own per-id branch (``PathFunctions``).
"""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.modules.composition import LookupComposer, _combine, _pool
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig

__all__ = ["ScriptedComposition"]


class ScriptedComposition(nn.Module):
    """The precomputed structure of a ``LookupComposer`` (unsharded) and the partitions' indexers.

    Args:
        plan: the collection's eager plan (``LookupComposer.for_tables``).
        tables: the logical table configs.
        feature_names: the collection's input features, each once.
        storage_feature_names: the storage's input features, in its order.
        is_weighted: whether inputs carry per-id weights.
        device: where the indexers' buffers live.

    ``unsupported`` says why a collection cannot take this path (empty when it can); ``check_supported``
    raises it.
    """

    # Attribute types for TorchScript (a list may be empty, so its element type cannot be inferred); real
    # types, not strings: this file has no ``from __future__ import annotations``.
    features: List[str]
    lookup_keys: List[str]
    class_inputs: List[int]
    class_indexers: List[int]
    slot_input: List[int]
    slot_classes: List[int]
    slot_partition: List[int]
    slot_per_id: List[bool]
    slot_unit_weights: List[bool]
    block_start: List[int]
    block_width: List[int]
    out_input: List[int]
    out_combine: List[str]
    out_blocks: List[List[int]]
    out_per_id: List[bool]
    out_mean: List[bool]
    out_pool_first: List[bool]
    out_path: List[int]
    path_tables: List[str]
    path_classes: List[int]
    path_inputs: List[int]
    path_columns: List[int]

    def __init__(
        self,
        plan: LookupComposer,
        tables: List[EmbeddingBagConfig],
        feature_names: List[str],
        storage_feature_names: List[str],
        is_weighted: bool,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        indexers, self.unsupported = _indexers(tables, device)
        self.features = list(feature_names)
        self.weighted = is_weighted
        self.lookup_keys = list(storage_feature_names)
        self.indexers = nn.ModuleList(indexers.values())
        # One class computation per compositional (table, feature): the input it reads, its table's indexer.
        self.class_inputs = []
        self.class_indexers = []
        class_of: dict[tuple[str, str], int] = {}
        for s in plan.expand_slots:
            key = (s.table, s.feature)
            if s.partition_index is None or key in class_of or s.table not in indexers:
                continue
            class_of[key] = len(self.class_inputs)
            self.class_inputs.append(self.features.index(s.feature))
            self.class_indexers.append(list(indexers).index(s.table))
        # Expand slots, in the storage's order.
        self.slot_input = [self.features.index(s.feature) for s in plan.expand_slots]
        self.slot_classes = [class_of.get((s.table, s.feature), -1) for s in plan.expand_slots]
        self.slot_partition = [s.partition_index or 0 for s in plan.expand_slots]
        self.slot_per_id = [s.per_id for s in plan.expand_slots]
        # Pooled mult: per-id weights weight the first sub-table's pool only.
        self.slot_unit_weights = [
            (s.table, s.feature) in plan.pooled_mult and bool(s.partition_index) for s in plan.expand_slots
        ]
        # Compose slots, in output order; blocks are column ranges of the storage output.
        self.block_start = [sum(plan.block_widths[:b]) for b in range(len(plan.block_widths))]
        self.block_width = list(plan.block_widths)
        self.out_input = [self.features.index(s.feature) for s in plan.compose_slots]
        self.out_combine = [s.combine for s in plan.compose_slots]
        self.out_blocks = [list(s.blocks) for s in plan.compose_slots]
        self.out_per_id = [s.per_id for s in plan.compose_slots]
        self.out_mean = [s.mean for s in plan.compose_slots]
        self.out_pool_first = [s.pool_first for s in plan.compose_slots]
        # Path outputs: their table (whose functions the collection holds) and class computation.
        path_slots = [i for i, s in enumerate(plan.compose_slots) if s.combine == "path"]
        self.out_path = [path_slots.index(i) if i in path_slots else -1 for i in range(len(plan.compose_slots))]
        self.path_tables = [plan.compose_slots[i].table for i in path_slots]
        self.path_classes = [
            class_of.get((plan.compose_slots[i].table, plan.compose_slots[i].feature), -1) for i in path_slots
        ]
        self.path_inputs = [self.out_input[i] for i in path_slots]
        self.path_columns = [plan.compose_slots[i].blocks[0] for i in path_slots]

    @torch.jit.unused
    def check_supported(self) -> None:
        if self.unsupported:
            raise TypeError(self.unsupported)

    def inputs(
        self, features: KeyedJaggedTensor
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], int]:
        """Per input feature: ids, bag lengths, weights (none when unweighted); and the batch size."""
        return _split_features(features, self.features, self.weighted)

    def lookup_input(
        self, values: List[torch.Tensor], lengths: List[torch.Tensor], weights: List[torch.Tensor], batch: int
    ) -> Tuple[KeyedJaggedTensor, List[torch.Tensor]]:
        """The storage's input KJT (as ``LookupComposer.expand``) and each class computation's classes."""
        classes: List[torch.Tensor] = []
        for i in range(len(self.class_inputs)):
            for k, indexer in enumerate(self.indexers):  # a module list is indexed by unrolling only
                if self.class_indexers[i] == k:
                    classes.append(indexer(values[self.class_inputs[i]]))
        ids: List[torch.Tensor] = []
        for s in range(len(self.slot_input)):
            c = self.slot_classes[s]
            ids.append(values[self.slot_input[s]] if c < 0 else classes[c][self.slot_partition[s]])
        lookup = _lookup_kjt(
            self.lookup_keys,
            ids,
            self.slot_input,
            self.slot_per_id,
            self.slot_unit_weights,
            lengths,
            weights,
            self.weighted,
            batch,
        )
        return lookup, classes

    def path_input(
        self, p: int, looked_up: torch.Tensor, values: List[torch.Tensor], classes: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Path output p's per-id rows of partition 1 and its ids' classes ``[k, n]``."""
        b = self.path_columns[p]
        rows = _per_id_rows(looked_up, values[self.path_inputs[p]], self.block_start[b], self.block_width[b])
        return rows, classes[self.path_classes[p]]

    def compose(
        self,
        looked_up: torch.Tensor,
        values: List[torch.Tensor],
        lengths: List[torch.Tensor],
        weights: List[torch.Tensor],
        batch: int,
        path_rows: List[torch.Tensor],
    ) -> torch.Tensor:
        """``[batch, sum of output dims]`` from the storage output (as ``LookupComposer.compose``), given
        each path output's per-id rows (``path_input`` passed through the table's functions)."""
        return _compose(
            looked_up,
            values,
            lengths,
            weights,
            batch,
            self.block_start,
            self.block_width,
            self.out_input,
            self.out_combine,
            self.out_blocks,
            self.out_per_id,
            self.out_mean,
            self.out_pool_first,
            self.out_path,
            path_rows,
        )


def _indexers(tables: List[EmbeddingBagConfig], device: torch.device | str | None) -> tuple[dict[str, nn.Module], str]:
    """Each compositional table's indexer by table name, and why the collection cannot be served ("" if it can)."""
    indexers: dict[str, nn.Module] = {}
    for t in tables:
        if not isinstance(t, CompositionalEmbeddingBagConfig):
            continue
        assert t.partition is not None
        try:
            indexers[t.name] = t.partition.indexer().to(device)
        except NotImplementedError as e:
            return {}, f"table {t.name!r}: {e}"
    return indexers, ""


@torch.fx.wrap
def _split_features(
    features: KeyedJaggedTensor, names: List[str], weighted: bool
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], int]:
    if features.variable_stride_per_key():
        raise ValueError("variable-batch (VBE) inputs are served by the eager module only; give one batch size")
    keys = features.keys()
    batch = features.stride()
    offsets = features.offset_per_key()
    all_values = features.values()
    all_lengths = features.lengths().view(len(keys), batch)
    all_weights = features.weights_or_none()
    if weighted and all_weights is None:
        raise ValueError("the module is weighted (is_weighted=True) but the input KeyedJaggedTensor has no weights")
    if not weighted and all_weights is not None:
        raise ValueError("the input has per-id weights but the module is unweighted: build it with is_weighted=True")
    values: List[torch.Tensor] = []
    lengths: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    for name in names:
        if name not in keys:
            raise ValueError(f"feature {name} is missing from the input KeyedJaggedTensor (keys: {keys})")
        k = keys.index(name)
        values.append(all_values[offsets[k] : offsets[k + 1]])
        lengths.append(all_lengths[k])
        if all_weights is not None:
            weights.append(all_weights[offsets[k] : offsets[k + 1]])
    return values, lengths, weights, batch


@torch.fx.wrap
def _lookup_kjt(
    keys: List[str],
    ids: List[torch.Tensor],
    slot_input: List[int],
    per_id: List[bool],
    unit_weights: List[bool],
    lengths: List[torch.Tensor],
    weights: List[torch.Tensor],
    weighted: bool,
    batch: int,
) -> KeyedJaggedTensor:
    """Per-id slots get one bag per id; every slot is padded with empty bags to one stride."""
    stride = batch
    for s in range(len(ids)):
        if per_id[s]:
            stride = max(stride, ids[s].numel())
    out_lengths: List[torch.Tensor] = []
    out_weights: List[torch.Tensor] = []
    for s in range(len(ids)):
        n = ids[s].numel()
        if per_id[s]:
            bags = torch.ones(n, dtype=torch.int64, device=ids[s].device)
        else:
            bags = lengths[slot_input[s]].to(torch.int64)
        out_lengths.append(torch.cat([bags, bags.new_zeros(stride - bags.numel())]))
        if weighted:
            if per_id[s] or unit_weights[s]:
                out_weights.append(torch.ones(n, dtype=torch.float32, device=ids[s].device))
            else:
                out_weights.append(weights[slot_input[s]].to(torch.float32))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([i.to(torch.int64) for i in ids]),
        lengths=torch.cat(out_lengths),
        weights=torch.cat(out_weights) if weighted else None,
        stride=stride,
    )


@torch.fx.wrap
def _per_id_rows(looked_up: torch.Tensor, ids: torch.Tensor, start: int, width: int) -> torch.Tensor:
    return looked_up[: ids.numel(), start : start + width]


@torch.fx.wrap
def _compose(
    looked_up: torch.Tensor,
    values: List[torch.Tensor],
    lengths: List[torch.Tensor],
    weights: List[torch.Tensor],
    batch: int,
    block_start: List[int],
    block_width: List[int],
    out_input: List[int],
    out_combine: List[str],
    out_blocks: List[List[int]],
    out_per_id: List[bool],
    out_mean: List[bool],
    out_pool_first: List[bool],
    out_path: List[int],
    path_rows: List[torch.Tensor],
) -> torch.Tensor:
    outs: List[torch.Tensor] = []
    for s in range(len(out_input)):
        blocks = [looked_up[:, block_start[b] : block_start[b] + block_width[b]] for b in out_blocks[s]]
        if not out_per_id[s]:
            outs.append(_combine(out_combine[s], [b[:batch] for b in blocks]))
            continue
        i = out_input[s]
        n = values[i].numel()
        w: Optional[torch.Tensor] = weights[i] if len(weights) > 0 else None
        parts = [b[:n] for b in blocks]
        if out_path[s] >= 0:
            outs.append(_pool(path_rows[out_path[s]], lengths[i], w, batch, out_mean[s]))
        elif out_pool_first[s]:  # per-id weights enter the first factor only, as on the kernel-pooled path
            pooled: List[torch.Tensor] = []
            for j in range(len(parts)):
                pooled.append(_pool(parts[j], lengths[i], w if j == 0 else None, batch, out_mean[s]))
            outs.append(_combine(out_combine[s], pooled))
        else:
            outs.append(_pool(_combine(out_combine[s], parts), lengths[i], w, batch, out_mean[s]))
    return torch.cat(outs, dim=1)
