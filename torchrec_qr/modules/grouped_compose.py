"""Vectorized composition: every logical feature composed in one autograd node, written in place.

Composing feature by feature costs a dozen small ops per feature (slices, products, pooling), and
composing with ordinary autograd ops costs full-size temporaries: views of the lookup output whose backward
is a ``cat`` of the whole lookup width, products and their gradients, a final ``cat`` and permutation. On a
26-feature model those passes over ``[batch, 2 x 26 x D]`` floats outweigh the embedding kernel itself.

Here outputs that compose alike are *grouped* (same per-id-ness, combine op, number of parts, and for per-id
outputs the same width and MEAN-ness), and one ``torch.autograd.Function`` composes every group:

- the forward writes each group's result straight into its final columns of one ``[B, out]`` buffer
  (kernel-pooled groups: one product/sum over views per group; per-id groups of one-id bags: the rows are the
  bags; per-id multi-id bags: per-id products pooled per feature with ``index_add``);
- the backward writes each part's gradient straight into one ``[S, lookup width]`` buffer with ``out=``
  ops: no ``cat``, no zero-filled gradient per view.

With sub-tables laid out sub-table-major (``physical_table_configs``), each sub-table index's columns are one
contiguous run, taken as a view; scattered columns (column-wise shards) are gathered.

Slots the groups do not cover (path functions, pooled-mode ``mult`` on per-id lookups, per-id ``concat``)
are composed by the caller's per-feature code with ordinary autograd and handed in, so their outputs too
land in place. Results are identical to composing feature by feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchrec_qr.modules.composition_inputs import Inputs

__all__ = ["GroupedComposer"]

Columns = slice | torch.Tensor


@dataclass
class _Group:
    per_id: bool
    combine: str  # "none" | "add" | "mult"
    mean: bool
    width: int  # output width of each slot
    slots: list[int] = field(default_factory=list)
    features: list[tuple[str, str]] = field(default_factory=list)  # (logical table, feature) per slot
    part_columns: list[list[int]] = field(default_factory=list)  # per part: looked-up columns
    columns: list[Columns] = field(default_factory=list)
    out_columns: list[int] = field(default_factory=list)  # where each slot's output goes
    out: Columns = field(default_factory=lambda: slice(0, 0))


@dataclass
class _Batch:
    """What one batch tells the composition: sizes, per-feature bags and weights (host ints and tensors)."""

    batch: int
    one_hot: list[bool]  # per group
    bags: dict[tuple[str, str], tuple[torch.Tensor, int]]  # per-id multi-id feature -> (bag of each id, ids)
    weight_start: dict[tuple[str, str], int]  # per-id feature -> where its weights start in the KJT's weights
    lengths: dict[tuple[str, str], torch.Tensor]  # per-id multi-id MEAN feature -> bag lengths


class GroupedComposer:
    """Composes a plan's compose slots in groups; ``fallback(i)`` composes a slot the groups do not cover.

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
        self.lookup_width = starts[-1]
        groups: dict[tuple, _Group] = {}
        self.fallback_slots: list[int] = []
        self._fallback_width: dict[int, int] = {}
        out_at = 0
        out_start: dict[int, int] = {}
        for i, s in enumerate(slots):
            out_start[i] = out_at
            parts = [list(range(starts[b], starts[b + 1])) for b in s.blocks]
            combine = s.combine
            if combine in ("none", "concat"):
                parts, combine = [[c for p in parts for c in p]], "none"
            width = len(parts[0]) if combine == "none" else block_widths[s.blocks[0]]
            out_at += width
            if not handled(s):
                self.fallback_slots.append(i)
                self._fallback_width[i] = width
                continue
            key = (s.per_id, combine, len(parts), s.mean if s.per_id else False, width if s.per_id else 0)
            g = groups.setdefault(key, _Group(s.per_id, combine, key[3], width))
            g.slots.append(i)
            g.features.append((s.table, s.feature))
            g.out_columns.extend(range(out_at - width, out_at))
            if not g.part_columns:
                g.part_columns = [[] for _ in parts]
            for acc, p in zip(g.part_columns, parts):
                acc.extend(p)
        self.out_width = out_at
        self.groups = list(groups.values())
        for g in self.groups:
            g.columns = [_as_range_or_index(c) for c in g.part_columns]
            g.out = _as_range_or_index(g.out_columns)
        self._fallback_out = [slice(out_start[i], out_start[i] + self._fallback_width[i]) for i in self.fallback_slots]
        covered = {c for g in self.groups for cols in g.part_columns for c in cols}
        self._uncovered = _column_runs([c for c in range(self.lookup_width) if c not in covered])

    def __call__(
        self, inputs: Inputs, looked_up: torch.Tensor, fallback: Callable[[int], torch.Tensor]
    ) -> torch.Tensor:
        fallback_outs = [fallback(i) for i in self.fallback_slots]
        if not self.groups:
            return fallback_outs[0] if len(fallback_outs) == 1 else torch.cat(fallback_outs, dim=1)
        info = self._batch_info(inputs)
        weights = inputs.weights if info.weight_start else None
        return _Compose.apply(self, info, looked_up, weights, *fallback_outs)

    def _batch_info(self, inputs: Inputs) -> _Batch:
        batch = inputs.stride
        info = _Batch(batch, [], {}, {}, {})
        weighted = inputs.weights is not None
        per_id_features = {f for g in self.groups if g.per_id for f in g.features}
        if not per_id_features:
            info.one_hot = [False] * len(self.groups)
            return info
        jts = inputs.jts
        sizes = {f: jts[f].values().numel() for f in per_id_features}
        for g in self.groups:
            # Bags of one id each: the per-id rows already are the pooled output. Only checked (one device
            # read) when every feature of the group has exactly one id per sample on average.
            info.one_hot.append(
                g.per_id
                and all(sizes[f] == batch for f in g.features)
                and bool(torch.stack([jts[f].lengths() for f in g.features]).eq(1).all())
            )
            if not g.per_id:
                continue
            for f in g.features:
                jt = jts[f]
                if weighted:
                    info.weight_start[f] = inputs.weight_start[f]
                if not info.one_hot[-1]:
                    lengths = jt.lengths()
                    bag = torch.repeat_interleave(
                        torch.arange(batch, device=lengths.device), lengths.to(torch.int64), output_size=sizes[f]
                    )
                    info.bags[f] = (bag, sizes[f])
                    if g.mean:
                        info.lengths[f] = lengths
        return info


class _Compose(torch.autograd.Function):
    """``[B, out width]``: every group composed from ``looked_up`` and the fallback outputs copied in place."""

    @staticmethod
    def forward(
        ctx: Any,
        composer: GroupedComposer,
        info: _Batch,
        looked_up: torch.Tensor,
        weights: torch.Tensor | None,
        *fallback: torch.Tensor,
    ) -> torch.Tensor:
        ctx.composer, ctx.info = composer, info
        ctx.save_for_backward(looked_up, weights)
        ctx.fallback_columns = composer._fallback_out
        out = looked_up.new_empty(info.batch, composer.out_width)
        for g, one_hot in zip(composer.groups, info.one_hot):
            _forward_group(g, one_hot, info, looked_up, weights, out)
        for cols, t in zip(composer._fallback_out, fallback):
            out[:, cols] = t
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        composer: GroupedComposer = ctx.composer
        info: _Batch = ctx.info
        looked_up, weights = ctx.saved_tensors
        grad = grad.contiguous()
        # Groups write the gradient of every row they read. The other rows of their columns belong to the
        # empty bags that pad each feature to the lookup's stride, whose gradient the TBE ignores; only columns
        # no group reads (fallback slots, which get theirs through autograd) must be zero. A full zero fill of a
        # multi-id lookup's gradient would cost as much as the lookup.
        grad_in = looked_up.new_empty(looked_up.shape)
        for cols in composer._uncovered:
            grad_in[:, cols] = 0
        grad_w = torch.zeros_like(weights) if weights is not None and ctx.needs_input_grad[3] else None
        for g, one_hot in zip(composer.groups, info.one_hot):
            _backward_group(g, one_hot, info, looked_up, weights, grad, grad_in, grad_w)
        return (None, None, grad_in, grad_w, *[grad[:, cols] for cols in ctx.fallback_columns])


def _forward_group(
    g: _Group, one_hot: bool, info: _Batch, looked_up: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor
) -> None:
    if not g.per_id or one_hot:
        parts = [_take(looked_up, c, info.batch) for c in g.columns]
        rows = _combine_into(g.combine, parts, out, g.out)
        if g.per_id and weights is not None:
            _put(out, g.out, rows * _slot_weights(g, info, weights))
        return
    for k, f in enumerate(g.features):
        bag, n = info.bags[f]
        parts = [_take(looked_up, _slot_cols(c, k, g.width), n) for c in g.columns]
        rows = _combine(g.combine, parts)
        if weights is not None:
            rows = rows * _feature_weights(f, n, info, weights).unsqueeze(1)
        pooled = rows.new_zeros(info.batch, g.width).index_add_(0, bag, rows)
        if g.mean:
            pooled = pooled / info.lengths[f].clamp(min=1).unsqueeze(1).to(pooled.dtype)
        _put(out, _slot_cols(g.out, k, g.width), pooled)


def _backward_group(
    g: _Group,
    one_hot: bool,
    info: _Batch,
    looked_up: torch.Tensor,
    weights: torch.Tensor | None,
    grad: torch.Tensor,
    grad_in: torch.Tensor,
    grad_w: torch.Tensor | None,
) -> None:
    if not g.per_id or one_hot:
        g_out = _take(grad, g.out, info.batch)
        parts = [_take(looked_up, c, info.batch) for c in g.columns]
        if g.per_id and weights is not None:
            if grad_w is not None:
                per_slot = (g_out * _combine(g.combine, parts)).view(info.batch, len(g.features), g.width).sum(2)
                for k, f in enumerate(g.features):
                    start = info.weight_start[f]
                    grad_w[start : start + info.batch] += per_slot[:, k].to(grad_w.dtype)
            g_out = g_out * _slot_weights(g, info, weights)
        _part_grads_into(g.combine, parts, g_out, [(grad_in, c, info.batch) for c in g.columns])
        return
    for k, f in enumerate(g.features):
        bag, n = info.bags[f]
        g_out = _take(grad, _slot_cols(g.out, k, g.width), info.batch)
        if g.mean:
            g_out = g_out / info.lengths[f].clamp(min=1).unsqueeze(1).to(g_out.dtype)
        g_rows = g_out.index_select(0, bag)
        cols = [_slot_cols(c, k, g.width) for c in g.columns]
        parts = [_take(looked_up, c, n) for c in cols]
        if weights is not None:
            if grad_w is not None:
                start = info.weight_start[f]
                grad_w[start : start + n] += (g_rows * _combine(g.combine, parts)).sum(1).to(grad_w.dtype)
            g_rows = g_rows * _feature_weights(f, n, info, weights).unsqueeze(1)
        _part_grads_into(g.combine, parts, g_rows, [(grad_in, c, n) for c in cols])


def _column_runs(columns: list[int]) -> list[slice]:
    """Sorted columns as maximal contiguous runs."""
    runs: list[slice] = []
    for c in columns:
        if runs and runs[-1].stop == c:
            runs[-1] = slice(runs[-1].start, c + 1)
        else:
            runs.append(slice(c, c + 1))
    return runs


def _combine(op: str, parts: list[torch.Tensor]) -> torch.Tensor:
    rows = parts[0]
    for p in parts[1:]:
        rows = rows * p if op == "mult" else rows + p
    return rows


def _combine_into(op: str, parts: list[torch.Tensor], out: torch.Tensor, cols: Columns) -> torch.Tensor:
    """Write ``combine(parts)`` into ``out[:, cols]``; returns the written block (a view when ``cols`` is a
    slice)."""
    if isinstance(cols, slice) and len(parts) == 2 and op in ("mult", "add"):
        target = out[:, cols]
        (torch.mul if op == "mult" else torch.add)(parts[0], parts[1], out=target)
        return target
    rows = _combine(op, parts)
    _put(out, cols, rows)
    return rows


def _part_grads_into(
    op: str, parts: list[torch.Tensor], g: torch.Tensor, targets: list[tuple[torch.Tensor, Columns, int]]
) -> None:
    """Each part's gradient (``g`` times the product of the other parts for mult, ``g`` otherwise) written
    into its target columns (first ``rows`` rows)."""
    for j, (buffer, cols, rows) in enumerate(targets):
        others = [p for i, p in enumerate(parts) if i != j]
        if op != "mult" or not others:
            _put_rows(buffer, cols, rows, g)
            continue
        if isinstance(cols, slice) and len(others) == 1:
            torch.mul(g, others[0], out=buffer[:rows, cols])
            continue
        _put_rows(buffer, cols, rows, g * _combine("mult", others))


def _feature_weights(f: tuple[str, str], n: int, info: _Batch, weights: torch.Tensor) -> torch.Tensor:
    start = info.weight_start[f]
    return weights[start : start + n].to(torch.float32)


def _slot_weights(g: _Group, info: _Batch, weights: torch.Tensor) -> torch.Tensor:
    """``[B, m * width]``: each slot's per-sample weight (one-id bags) repeated over its columns."""
    w = torch.stack([_feature_weights(f, info.batch, info, weights) for f in g.features], dim=1)  # [B, m]
    return w.repeat_interleave(g.width, dim=1)


def _take(x: torch.Tensor, cols: Columns, rows: int) -> torch.Tensor:
    """``x[:rows, cols]``: a view for a column range, a gather for scattered columns."""
    if isinstance(cols, slice):
        return x[:rows, cols]
    return x[:rows].index_select(1, cols.to(x.device))


def _put(out: torch.Tensor, cols: Columns, value: torch.Tensor) -> None:
    _put_rows(out, cols, out.shape[0], value)


def _put_rows(out: torch.Tensor, cols: Columns, rows: int, value: torch.Tensor) -> None:
    if isinstance(cols, slice):
        out[:rows, cols] = value
    else:
        out[:rows].index_copy_(1, cols.to(out.device), value)


def _slot_cols(cols: Columns, k: int, width: int) -> Columns:
    """The columns of the k-th slot of a group (each slot ``width`` columns, in slot order)."""
    if isinstance(cols, slice):
        return slice(cols.start + k * width, cols.start + (k + 1) * width)
    return cols[k * width : (k + 1) * width]


def _as_range_or_index(columns: list[int]) -> Columns:
    """A contiguous run of columns is a view (a slice); only scattered ones need a gather."""
    if columns and columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return torch.tensor(columns, dtype=torch.int64)
