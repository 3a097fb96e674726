"""Vectorized composition: every logical feature of a kind composed by a handful of tensor ops.

Composing feature by feature costs a dozen small ops per feature (slices, products, pooling), which on a
26-feature model outweighs the embedding kernel itself. Here outputs that compose alike are grouped:

- kernel-pooled outputs (plain tables, ``add``/``concat``, pooled-mode ``mult``): one view per sub-table
  and one combine for the whole group;
- per-id outputs of equal width (``mult``/``add``, weighted MEAN tables) when every bag holds one id (the
  usual DLRM input): one combine, and the rows already are the pooled output. Multi-id bags are pooled
  feature by feature, which measured faster here than any grouped scatter.

With sub-tables laid out sub-table-major (``physical_table_configs``), each sub-table's columns are one
contiguous run, taken as a view from a single split; scattered columns would need a (slow) gather.

Anything else (path functions, pooled-mode ``mult`` on per-id lookups, per-id ``concat``) is left to the
caller's per-feature code. Results are identical to composing feature by feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["GroupedComposer"]


@dataclass
class _Group:
    per_id: bool
    combine: str  # "none" | "add" | "mult"
    mean: bool
    width: int  # output width of each slot (per-id groups)
    slots: list[int] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    part_columns: list[list[int]] = field(default_factory=list)  # per sub-table: looked-up columns
    columns: list[slice | torch.Tensor] = field(default_factory=list)


class GroupedComposer:
    """Composes the slots it can in groups; ``fallback(i)`` composes slot i alone.

    Args:
        slots: the plan's compose slots (``feature``, ``combine``, ``per_id``, ``mean``, ``blocks``,
            ``pool_first``), in output order.
        block_widths: width of each looked-up block.
        handled: which slots may be grouped.
    """

    def __init__(self, slots: Sequence, block_widths: list[int], handled: Callable[[object], bool]) -> None:
        starts = [0]
        for w in block_widths:
            starts.append(starts[-1] + w)
        groups: dict[tuple, _Group] = {}
        self.fallback_slots: list[int] = []
        pieces: list[list[tuple[int, int]]] = []  # per output piece: (slot, width) in piece column order
        widths: list[int] = []
        for i, s in enumerate(slots):
            if not handled(s):
                self.fallback_slots.append(i)
                widths.append(0)
                continue
            parts = [list(range(starts[b], starts[b + 1])) for b in s.blocks]
            combine = s.combine
            if combine in ("none", "concat"):
                parts, combine = [[c for p in parts for c in p]], "none"
            width = len(parts[0])
            widths.append(width)
            key = (s.per_id, combine, len(parts), s.mean if s.per_id else False, width if s.per_id else 0)
            g = groups.setdefault(key, _Group(s.per_id, combine, key[3], width))
            g.slots.append(i)
            g.features.append(s.feature)
            if not g.part_columns:
                g.part_columns = [[] for _ in parts]
            for acc, p in zip(g.part_columns, parts):
                acc.extend(p)
        self.groups = list(groups.values())
        for g in self.groups:
            g.columns = [_as_range_or_index(c) for c in g.part_columns]
            pieces.append([(i, widths[i]) for i in g.slots])
        self._chunks = _split_plan([c for g in self.groups for c in g.columns], starts[-1])
        # Output columns arrive group by group, then fallback slots; this permutation restores slot order.
        offset, where = 0, {}
        for piece in pieces:
            for i, w in piece:
                where[i] = (offset, w)
                offset += w
        self._fallback_start = offset
        self._slot_count = len(slots)
        self._where = where
        self._permutation: torch.Tensor | None = None

    def __call__(
        self, features: KeyedJaggedTensor, looked_up: torch.Tensor, fallback: Callable[[int], torch.Tensor]
    ) -> torch.Tensor:
        batch = features.stride()
        # Contiguous column runs become views from one split (its backward is one cat, where slicing
        # would zero-fill a full-size gradient per slice).
        views = {}
        if self._chunks is not None:
            sizes, keys = self._chunks
            views = {k: v for k, v in zip(keys, torch.split(looked_up, sizes, dim=1)) if k is not None}
        outs = [self._compose_group(g, features, looked_up, views, batch, fallback) for g in self.groups]
        fallback_outs = [fallback(i) for i in self.fallback_slots]
        out = torch.cat(outs + fallback_outs, dim=1) if len(outs) + len(fallback_outs) > 1 else (outs + fallback_outs)[0]
        permutation = self._output_permutation([t.shape[1] for t in fallback_outs], looked_up.device)
        return out if permutation is None else out.index_select(1, permutation)

    def _output_permutation(self, fallback_widths: list[int], device: torch.device) -> torch.Tensor | None:
        if self._permutation is None or self._permutation.device != device:
            where = dict(self._where)
            offset = self._fallback_start
            for i, w in zip(self.fallback_slots, fallback_widths):
                where[i] = (offset, w)
                offset += w
            order = [c for i in range(self._slot_count) for c in range(where[i][0], where[i][0] + where[i][1])]
            identity = order == list(range(len(order)))
            self._permutation = torch.empty(0, dtype=torch.int64) if identity else torch.tensor(order, device=device)
        return None if self._permutation.numel() == 0 else self._permutation

    def _compose_group(
        self,
        g: _Group,
        features: KeyedJaggedTensor,
        looked_up: torch.Tensor,
        views: dict[tuple[int, int], torch.Tensor],
        batch: int,
        fallback: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        if g.per_id and not _all_one_hot(features, g.features, batch):
            # Multi-id bags: pooling feature by feature measured faster than any grouped scatter here.
            return torch.cat([fallback(i) for i in g.slots], dim=1)
        parts = [
            views[(c.start, c.stop)] if isinstance(c, slice) and (c.start, c.stop) in views
            else looked_up.index_select(1, _as_index(c).to(looked_up.device))
            for c in g.columns
        ]
        if not g.per_id:
            parts = [_first_rows(p, batch) for p in parts]
        rows = parts[0]
        for p in parts[1:]:
            rows = rows * p if g.combine == "mult" else rows + p
        return _weighted_one_hot(rows, features, g, batch) if g.per_id else rows


def _split_plan(columns: list[slice | torch.Tensor], total: int) -> tuple[list[int], list] | None:
    """Split sizes covering ``[0, total)`` and the column range each chunk serves (None for gaps), when the
    contiguous ranges are disjoint; None when they overlap (then they are gathered)."""
    ranges = sorted({(c.start, c.stop) for c in columns if isinstance(c, slice)})
    sizes, keys, at = [], [], 0
    for start, stop in ranges:
        if start < at:
            return None
        if start > at:
            sizes.append(start - at)
            keys.append(None)
        sizes.append(stop - start)
        keys.append((start, stop))
        at = stop
    if at < total:
        sizes.append(total - at)
        keys.append(None)
    return (sizes, keys) if ranges else None


def _as_index(columns: slice | torch.Tensor) -> torch.Tensor:
    return torch.arange(columns.start, columns.stop) if isinstance(columns, slice) else columns


def _first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x[:n]`` as a split view (no zero-filled gradient), or x itself when it has n rows."""
    return x if x.shape[0] == n else torch.split(x, [n, x.shape[0] - n])[0]


def _as_range_or_index(columns: list[int]) -> slice | torch.Tensor:
    """A contiguous run of columns is a view (a slice); only scattered ones need a gather."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return torch.tensor(columns, dtype=torch.int64)


def _all_one_hot(features: KeyedJaggedTensor, names: list[str], batch: int) -> bool:
    keys = features.keys()
    key_index = torch.tensor([keys.index(f) for f in names], device=features.lengths().device)
    return bool((features.lengths().view(len(keys), batch).index_select(0, key_index) == 1).all())


def _weighted_one_hot(rows: torch.Tensor, features: KeyedJaggedTensor, g: _Group, batch: int) -> torch.Tensor:
    """``[B, m*D]`` bags of one id each: the rows are already in bag order; only weights apply (MEAN
    divides by 1)."""
    pooled = _first_rows(rows, batch)
    weights = features.weights_or_none()
    if weights is None:
        return pooled
    m, d = len(g.features), g.width
    keys = features.keys()
    starts = features.offset_per_key()
    offsets = torch.tensor([starts[keys.index(f)] for f in g.features], device=rows.device)
    positions = offsets.unsqueeze(0) + torch.arange(batch, device=rows.device).unsqueeze(1)  # [B, m]
    w = weights.index_select(0, positions.reshape(-1)).view(batch, m, 1).to(pooled.dtype)
    return (pooled.view(batch, m, d) * w).reshape(batch, m * d)
