"""Expand logical ids into sub-table lookups, then compose the looked-up rows into pooled embeddings.

This is the one piece of logic shared by the unsharded module and every sharded layout, so the sharded
module computes exactly what the unsharded one does, on whichever rank owns the rows:

1. ``expand``: a KJT of *logical* features becomes one KJT of *physical* features (a plain table's feature
   as it is; ``f__pj`` carrying ``partition.indices(ids)[j]`` for each sub-table j). Sub-tables whose
   rows are combined per id (``mult``, ``per_id``) get one bag per id, so the lookup returns each id's
   row; the others keep the original bags and are pooled by the TBE kernel itself. All physical features
   share one batch stride ``S = max(B, ids of the largest per-id feature)`` (shorter ones padded with
   empty bags), so a single TBE call serves them all.
2. ``compose``: given the lookup's ``[S, sum of widths]`` output, each logical feature's embedding:
   per-id rows combined (or, for ``path``, partition 1's rows passed through the classes' functions), then
   pooled (weighted ``sum_i w_i x_i``, divided by the bag length for MEAN); or pooled sub-table embeddings
   combined (exact for add/concat).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_qr.modules.batched_embedding_bags import group_by_pooling
from torchrec_qr.modules.composition_inputs import Inputs
from torchrec_qr.modules.embedding_configs import (
    SUB_TABLE_SEPARATOR,
    CompositionalEmbeddingBagConfig,
    physical_table_configs,
    sub_feature_name,
)
from torchrec_qr.modules.grouped_compose import GroupedComposer
from torchrec_qr.modules.partitions import Partition
from torchrec_qr.modules.path_functions import PathFunctions

__all__ = ["ComposeSlot", "ExpandSlot", "Inputs", "LocalTable", "LookupComposer", "looks_up_per_id", "pools_first"]


def looks_up_per_id(table: EmbeddingBagConfig, is_weighted: bool) -> bool:
    """Whether a table's lookups return each id's row (bags of one id) instead of kernel-pooled bags.

    Per-id ``mult`` needs it for exactness. Weighted MEAN bags need it too: FBGEMM 1.8's CPU backward for
    weighted MEAN pooling does not divide by the bag length (the forward does), so kernel-pooled weighted
    MEAN bags of L ids get L times the gradient; with one-id bags we pool ``sum_i w_i x_i / L`` ourselves.
    """
    if is_weighted and table.pooling == PoolingType.MEAN:
        return True
    return isinstance(table, CompositionalEmbeddingBagConfig) and table.per_id


def pools_first(table: EmbeddingBagConfig) -> bool:
    """Pooled-mode ``mult`` (the DLRM reference's approximation): pool each sub-table, then multiply."""
    return isinstance(table, CompositionalEmbeddingBagConfig) and table.combine == "mult" and not table.per_id


@dataclass(frozen=True)
class LocalTable:
    """A table, or a column shard of one, that a lookup serves (or a lookup's output holds) on this rank."""

    name: str
    feature_names: list[str]
    col_offset: int
    width: int

    @staticmethod
    def whole(table: EmbeddingBagConfig) -> LocalTable:
        return LocalTable(table.name, list(table.feature_names), 0, table.embedding_dim)


@dataclass(frozen=True)
class ExpandSlot:
    """One physical feature of the lookup KJT: fed by ``feature``'s ids, mapped through ``partition``."""

    feature: str
    partition_index: int | None  # None: a plain table, ids pass through
    per_id: bool
    source: int = 0  # which lookup serves it (a sharded rank may compose from several)
    table: str = ""  # the logical table (a feature may be read by several)
    local_table: int = 0  # position of its physical table (or shard) among its source's tables


@dataclass(frozen=True)
class ComposeSlot:
    """One logical output: combine the physical output ``blocks`` of ``feature`` with ``combine``."""

    feature: str
    combine: str  # "mult" | "add" | "concat" | "path" | "none"
    per_id: bool
    mean: bool
    blocks: tuple[int, ...]
    pool_first: bool = False  # pooled-mode mult: pool each sub-table's rows, then combine
    table: str = ""  # the logical table (a feature may be read by several)


class LookupComposer:
    """Expands a set of logical tables' inputs into sub-table lookups and composes their outputs back.

    (Named ``CompositionPlan`` before; that name still works and warns.)

    Args:
        tables: the logical table configs (plain and compositional) whose features are composed here.
        expand_slots: the physical features of the lookup, in the order the lookup expects them.
        block_widths: the width of each physical output block (one per expand slot, same order).
        compose_slots: the logical outputs, in the order they are concatenated.
        path_functions: table name -> its ``PathFunctions``, for every ``path`` table among ``tables``.
        path_grad_scale: multiplies the path functions' gradients (see ``scale_grad``).
        input_order: the (logical table, feature) each key of the input KJT carries, by position (a sharded
            lookup's input repeats a feature once per table reading it, with ids bucketized per table); None:
            the input's keys are feature names, each read by every table listing it.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        expand_slots: list[ExpandSlot],
        block_widths: list[int],
        compose_slots: list[ComposeSlot],
        path_functions: Mapping[str, PathFunctions] | None = None,
        path_grad_scale: float = 1.0,
        input_order: list[tuple[str, str]] | None = None,
    ) -> None:
        self.input_order = input_order
        self._used = list(
            dict.fromkeys([(s.table, s.feature) for s in expand_slots] + [(s.table, s.feature) for s in compose_slots])
        )
        # Keyed by (logical table, feature): one feature may be read by several tables.
        self.partitions: dict[tuple[str, str], Partition] = {}
        self.paths: dict[tuple[str, str], PathFunctions] = {}
        self.path_grad_scale = path_grad_scale
        # Pooled mult multiplies k pooled sub-tables: per-id weights go into the first one only, else a
        # one-id bag would come out as w**k * x instead of w * x.
        self.pooled_mult: set[tuple[str, str]] = set()
        for t in tables:
            if isinstance(t, CompositionalEmbeddingBagConfig):
                assert t.partition is not None
                for f in t.feature_names:
                    self.partitions[(t.name, f)] = t.partition
                    if pools_first(t):
                        self.pooled_mult.add((t.name, f))
                    if t.combine == "path":
                        if path_functions is None or t.name not in path_functions:
                            raise ValueError(f"table {t.name!r} has combine='path' but no path functions were given")
                        self.paths[(t.name, f)] = path_functions[t.name]
        self.expand_slots = expand_slots
        self.block_widths = block_widths
        self.compose_slots = compose_slots
        self.has_per_id = any(s.per_id for s in expand_slots)
        sources = [s.source for s in expand_slots]
        if sources != sorted(sources):
            raise ValueError("expand slots must be ordered by source: block indices follow the lookups' order")
        self.num_sources = max(sources, default=0) + 1
        self._grouped = GroupedComposer(compose_slots, block_widths, _groupable)

    @staticmethod
    def for_tables(
        tables: list[EmbeddingBagConfig],
        is_weighted: bool,
        path_functions: Mapping[str, PathFunctions] | None = None,
    ) -> LookupComposer:
        """The plan of an unsharded collection: every table local and whole; physical features in the
        storage's order (tables grouped by pooling, as ``BatchedEmbeddingBags`` lays them out)."""
        storage = [t for group in group_by_pooling(physical_table_configs(tables)) for t in group]
        return LookupComposer.for_local_tables(
            tables,
            [LocalTable.whole(t) for t in tables],
            [[LocalTable.whole(t) for t in storage]],
            is_weighted,
            path_functions=path_functions,
        )

    @staticmethod
    def for_local_tables(
        tables: list[EmbeddingBagConfig],
        outputs: list[LocalTable],
        sources: list[list[LocalTable]],
        is_weighted: bool,
        mean_after_output_dist: bool = False,
        path_functions: Mapping[str, PathFunctions] | None = None,
        path_grad_scale: float = 1.0,
        sharded_input: bool = False,
    ) -> LookupComposer:
        """The plan of the logical tables (or column shards) ``outputs`` composed from the physical tables
        (or shards) each lookup in ``sources`` serves, in their output order.

        ``mean_after_output_dist``: MEAN is applied after the output dist (row-wise partial sums).
        ``sharded_input``: the input KJT is a sharded lookup's, one key per feature of each table in
        ``outputs`` (in that order) rather than one per feature name.
        """
        by_name = {t.name: t for t in tables}
        origin: dict[str, tuple[EmbeddingBagConfig, int | None]] = {}
        for t in tables:
            if isinstance(t, CompositionalEmbeddingBagConfig):
                origin.update({sub.name: (t, j) for j, sub in enumerate(t.sub_table_configs())})
            else:
                origin[t.name] = (t, None)
        expand: list[ExpandSlot] = []
        widths: list[int] = []
        # (logical table, feature, partition, col offset) -> block
        block_of: dict[tuple[str, str, int | None, int], int] = {}
        for source, local_tables in enumerate(sources):
            for position, shard in enumerate(local_tables):
                logical, j = origin[shard.name]
                per_id = looks_up_per_id(logical, is_weighted)
                for phys_feature in shard.feature_names:
                    feature = phys_feature if j is None else phys_feature.rsplit(SUB_TABLE_SEPARATOR, 1)[0]
                    block_of[(logical.name, feature, j, shard.col_offset)] = len(expand)
                    expand.append(ExpandSlot(feature, j, per_id, source, logical.name, position))
                    widths.append(shard.width)
        compose: list[ComposeSlot] = []
        for shard in outputs:
            t = by_name[shard.name]
            start, width = shard.col_offset, shard.width
            per_id = looks_up_per_id(t, is_weighted)
            mean = t.pooling == PoolingType.MEAN and not mean_after_output_dist
            for f in shard.feature_names:
                if not isinstance(t, CompositionalEmbeddingBagConfig):
                    compose.append(
                        ComposeSlot(f, "none", per_id, mean, (block_of[(t.name, f, None, start)],), table=t.name)
                    )
                    continue
                if t.combine == "concat":
                    blocks, sub_start = [], 0
                    for j, d in enumerate(t.sub_embedding_dims()):
                        lo, hi = max(start, sub_start), min(start + width, sub_start + d)
                        if lo < hi:
                            blocks.append(block_of[(t.name, f, j, lo - sub_start)])
                        sub_start += d
                else:
                    blocks = [block_of[(t.name, f, j, start)] for j in range(t.num_sub_tables)]
                compose.append(ComposeSlot(f, t.combine, per_id, mean, tuple(blocks), pools_first(t), t.name))
        order = [(shard.name, f) for shard in outputs for f in shard.feature_names] if sharded_input else None
        return LookupComposer(tables, expand, widths, compose, path_functions, path_grad_scale, order)

    def physical_feature_names(self, source: int = 0) -> list[str]:
        return [
            s.feature if s.partition_index is None else sub_feature_name(s.feature, s.partition_index)
            for s in self.expand_slots
            if s.source == source
        ]

    def inputs(self, features: KeyedJaggedTensor) -> Inputs:
        """The input's bags by (logical table, feature) (see ``input_order``)."""
        weights = features.weights_or_none()
        if self.input_order is None:
            jts = features.to_dict()
            starts = dict(zip(features.keys(), features.offset_per_key()))
            return Inputs(
                {k: jts[k[1]] for k in self._used}, {k: starts[k[1]] for k in self._used}, weights, features.stride()
            )
        if len(features.keys()) != len(self.input_order):
            raise ValueError(f"a lookup input with keys {features.keys()} does not match its plan {self.input_order}")
        stride, offsets = features.stride(), features.offset_per_key()
        values, lengths = features.values(), features.lengths()
        jts, starts = {}, {}
        for i, key in enumerate(self.input_order):
            if key in jts:  # a table's column shards read the same ids
                continue
            a, b = offsets[i], offsets[i + 1]
            jts[key] = JaggedTensor(
                values=values[a:b],
                lengths=lengths[i * stride : (i + 1) * stride],
                weights=weights[a:b] if weights is not None else None,
            )
            starts[key] = a
        return Inputs(jts, starts, weights, stride)

    def expand(self, inputs: Inputs, weighted: bool) -> list[KeyedJaggedTensor]:
        """One lookup KJT per source (see module docstring) from ``inputs(features)``. ``weighted``: whether
        lookups take weights."""
        jts = inputs.jts
        stride = inputs.stride
        if self.has_per_id:
            for s in self.expand_slots:
                if s.per_id:
                    stride = max(stride, jts[(s.table, s.feature)].values().numel())
        sub_ids: dict[tuple[str, str], torch.Tensor] = {}
        parts: list[tuple[list, list, list]] = [([], [], []) for _ in range(self.num_sources)]
        for s in self.expand_slots:
            values, lengths, weights = parts[s.source]
            jt = jts[(s.table, s.feature)]
            ids = jt.values()
            if s.partition_index is not None:
                key = (s.table, s.feature)
                if key not in sub_ids:
                    sub_ids[key] = self.partitions[key].indices(ids)
                ids = sub_ids[key][s.partition_index]
            values.append(ids)
            if s.per_id:
                n = ids.numel()
                lengths.append(_pad(torch.ones(n, dtype=jt.lengths().dtype, device=ids.device), stride))
                if weighted:
                    weights.append(torch.ones(n, dtype=torch.float32, device=ids.device))
            else:
                lengths.append(_pad(jt.lengths(), stride))
                if weighted:
                    w = jt.weights_or_none()
                    if w is None or ((s.table, s.feature) in self.pooled_mult and s.partition_index):
                        w = torch.ones(ids.numel(), device=ids.device)
                    weights.append(w)
        return [
            KeyedJaggedTensor(
                keys=self.physical_feature_names(source),
                values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
                lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int32),
                weights=torch.cat(weights) if weighted and weights else None,
                stride=stride,
            )
            for source, (values, lengths, weights) in enumerate(parts)
        ]

    def compose(self, inputs: Inputs, looked_up: torch.Tensor) -> torch.Tensor:
        """``[B, sum of output dims]``: each compose slot's pooled embedding, concatenated in slot order
        (``inputs``: the same ``inputs(features)`` that ``expand`` took)."""
        blocks: list[torch.Tensor] = []

        def one_slot(i: int) -> torch.Tensor:
            if not blocks:
                blocks.extend(torch.split(looked_up, self.block_widths, dim=1))
            return self._compose_slot(self.compose_slots[i], inputs.stride, blocks, inputs.jts)

        return self._grouped(inputs, looked_up, one_slot)

    def _compose_slot(
        self, s: ComposeSlot, batch: int, blocks: list[torch.Tensor], jts: dict[tuple[str, str], JaggedTensor]
    ) -> torch.Tensor:
        """One slot on its own: what ``GroupedComposer`` does not group (and its reference semantics)."""
        if not s.per_id:
            return _combine(s.combine, [blocks[b][:batch] for b in s.blocks])
        jt = jts[(s.table, s.feature)]
        n, lengths, weights = jt.values().numel(), jt.lengths(), jt.weights_or_none()
        if s.pool_first:  # per-id weights enter the first factor only, as on the kernel-pooled path
            parts = [
                _pool(blocks[b][:n], lengths, weights if i == 0 else None, batch, s.mean)
                for i, b in enumerate(s.blocks)
            ]
            return _combine(s.combine, parts)
        if s.combine == "path":
            classes = self.partitions[(s.table, s.feature)].indices(jt.values())
            rows = self.paths[(s.table, s.feature)](blocks[s.blocks[0]][:n], classes, self.path_grad_scale)
        else:
            rows = _combine(s.combine, [blocks[b][:n] for b in s.blocks])
        return _pool(rows, lengths, weights, batch, s.mean)


def _groupable(s: ComposeSlot) -> bool:
    """Slots ``GroupedComposer`` composes: all but path functions (their functions need autograd) and
    pooled-mode mult on per-id lookups (weighted MEAN bags: each sub-table pooled, then multiplied)."""
    return s.combine != "path" and not (s.per_id and s.pool_first)


def _pad(lengths: torch.Tensor, stride: int) -> torch.Tensor:
    if lengths.numel() == stride:
        return lengths
    return torch.cat([lengths, lengths.new_zeros(stride - lengths.numel())])


def _combine(op: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if op == "none":
        return parts[0]
    if op == "concat":
        return torch.cat(parts, dim=1)
    out = parts[0]
    for p in parts[1:]:
        out = out * p if op == "mult" else out + p
    return out


def _pool(
    rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, batch: int, mean: bool
) -> torch.Tensor:
    """Bag-pool per-id rows: ``sum_i w_i x_i`` (``/ length`` for MEAN, as the TBE kernel does)."""
    bag = torch.repeat_interleave(
        torch.arange(batch, device=rows.device), lengths.to(torch.int64), output_size=rows.shape[0]
    )
    if weights is not None:
        rows = rows * weights.unsqueeze(1).to(rows.dtype)
    pooled = rows.new_zeros(batch, rows.shape[1]).index_add_(0, bag, rows)
    if mean:
        pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
    return pooled


def __getattr__(name: str) -> object:
    if name == "CompositionPlan":  # the former name, easily confused with sharding plans and the plan CLI
        warnings.warn("CompositionPlan is now LookupComposer", DeprecationWarning, stacklevel=2)
        return LookupComposer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
