"""``FusedCompose``: lookup, composition, pooling and the fused optimizer step in one native kernel.

The reference path (``LookupComposer.expand`` → TBE → ``compose``) materializes every id's sub-table rows: a
per-id ``mult`` lookup returns ``[ids, k x D]`` floats, its backward writes as many gradient rows, and the
product and its gradients are three more passes over them. With ``L`` ids per bag that is ``2L`` times the
pooled output a plain EBC writes. The kernel (``torchrec_qr/ops/compose_*.cpp``) instead reads each id's
rows straight from the TBE's weights, composes and pools them into the output columns, and in the backward
sums each touched row's gradient and applies the TBE's own optimizer (SGD, row-wise Adagrad, Adagrad, FBGEMM's
update rules) to the TBE's weights and state: same parameters, same state-dict keys, same fused optimizer
(learning-rate changes reach it), nothing per id materialized.

It serves lookups whose every table lives in FP32 CPU split TBEs with one of those optimizers (no weight
decay, clipping or max-norm) and whose outputs compose by ``none``/``concat``/``add``/``mult`` (per id or
pooled); anything else (dense TBEs, path tables, row-wise shards with replicated sub-tables, GPU tables) keeps
the reference path. ``TORCHREC_QR_COMPOSE_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

from torchrec_qr.modules.composition import LookupComposer
from torchrec_qr.modules.composition_inputs import Inputs
from torchrec_qr.modules.partition_indexers import DivModIndexer
from torchrec_qr.modules.partitions import Partition
from torchrec_qr.ops import compose_ops_available

__all__ = ["MAX_POOLED_IDS_PER_BAG", "FusedCompose"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = {EmbOptimType.EXACT_SGD: 0, EmbOptimType.EXACT_ROWWISE_ADAGRAD: 1, EmbOptimType.EXACT_ADAGRAD: 2}
_CONCAT, _ADD, _MULT, _POOLED_MULT = 0, 1, 2, 3
_OPS = {"none": _CONCAT, "concat": _CONCAT, "add": _ADD, "mult": _MULT}
_PART_FIELDS = 4  # table, output column, divisor, modulus
# Kernel-pooled outputs of one part (plain tables) or of three or more parts with more ids per bag than this,
# on average, go through FBGEMM's pooled lookups: the kernel's generic path is faster at 1 id per bag only.
# Two-part outputs stay on the kernel at any bag length (`benchmarks/bench_compose_kernel.py --ids-per-bag N`;
# 8 ids: add 0.97x, concat 0.91x, pooled mult 1.09x the plain step, FBGEMM's pooled lookups 1.18x, 1.47x,
# 1.22x; 2 ids: pooled mult 1.08x vs 1.64x).
MAX_POOLED_IDS_PER_BAG = 1.5


class FusedCompose:
    """Composes a ``LookupComposer``'s outputs from split TBEs' weights with the native kernel; build with
    ``FusedCompose.build`` (None where the kernel does not apply), call with ``composer.inputs(features)``.

    Args:
        composer: the lookup's composer (one source: the TBEs).
        tbes: the split TBEs holding the source's tables, in the composer's table order.

    Example::

        ebc = FusedCompositionalEmbeddingBagCollection(tables, torchrec.optim.RowWiseAdagrad, {"lr": 0.05})
        kernel = FusedCompose.build(ebc._composer, list(ebc._embedding_bag_collection._emb_modules))
        inputs = ebc._composer.inputs(kjt)
        if kernel is not None and kernel.serves(inputs):
            kernel(inputs).sum().backward()  # the TBEs' rows are updated here
    """

    def __init__(self, composer: LookupComposer, tbes: Sequence[SplitTableBatchedEmbeddingBagsCodegen]) -> None:
        self._composer = composer
        self._tbes = list(tbes)
        dims = [dim for tbe in self._tbes for _, dim, _, _ in tbe.embedding_specs]
        slots: list[int] = []
        parts: list[int] = []
        # Per slot: its (table, feature) and, per part, None where the kernel reads the ids themselves (a plain
        # table, or classes it computes as (id // divisor) % modulus), else the partition index of the classes
        # computed here.
        self._slot_inputs: list[tuple[tuple[str, str], list[int | None]]] = []
        out_col = 0
        for s in composer.compose_slots:
            expand = [composer.expand_slots[b] for b in s.blocks]
            op = _POOLED_MULT if s.pool_first else _OPS[s.combine]
            slots += [op, int(s.mean), len(parts) // _PART_FIELDS, len(expand), out_col]
            divmod_ = _div_mod(composer.partitions.get((s.table, s.feature)))
            col = out_col
            sources: list[int | None] = []
            for e in expand:
                j = e.partition_index
                divisor, modulus = (1, 0) if j is None or divmod_ is None else (divmod_[0][j], divmod_[1][j])
                parts += [e.local_table, col, divisor, modulus]
                sources.append(None if j is None or divmod_ is not None else j)
                if op == _CONCAT:
                    col += dims[e.local_table]
            out_col = col if op == _CONCAT else out_col + dims[expand[0].local_table]
            self._slot_inputs.append(((s.table, s.feature), sources))
        self._slots, self._parts, self._width = slots, parts, out_col
        # The backward reads the rows the forward computed: every part's rows given (divisor 1, modulus 0).
        self._given_parts = [
            1 if i % _PART_FIELDS == 2 else 0 if i % _PART_FIELDS == 3 else v for i, v in enumerate(parts)
        ]
        # Whether the kernel serves bags of any length: the reference path would look up every id's rows
        # (per-id products, weighted MEAN bags), or every output has two parts.
        self._any_length = any(s.per_id for s in composer.compose_slots) or all(
            len(s.blocks) == 2 for s in composer.compose_slots
        )
        self._optimizers = [_OPTIMIZERS[tbe.optimizer] for tbe in self._tbes for _ in tbe.embedding_specs]
        # Autograd reaches the backward through this (as FBGEMM's TBE does through its placeholder).
        self._placeholder = torch.zeros(0, requires_grad=True)
        self._storage: tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._row_slots: list[torch.Tensor] = []

    @staticmethod
    def build(composer: LookupComposer, tbes: Sequence[Any]) -> FusedCompose | None:
        """A kernel for ``composer`` over ``tbes`` (holding its source's tables in order), or None (logged
        at INFO with the reason) where it does not apply."""
        reason = _unsupported(composer, tbes)
        if reason is None and not compose_ops_available():
            reason = "the native kernel is off or could not be built"
        if reason is not None:
            logger.info("reference composition: %s", reason)
            return None
        return FusedCompose(composer, tbes)

    def serves(self, inputs: Inputs) -> bool:
        """Whether the kernel computes this batch: not when its per-id weights need a gradient (the kernel
        gives none; the reference path does), nor, where no output is composed per id and not all have two
        parts, for bags of more than ``MAX_POOLED_IDS_PER_BAG`` ids on average: FBGEMM's pooled lookups then
        cost less than the kernel."""
        if inputs.weights is not None and inputs.weights.requires_grad:
            return False
        if self._any_length:
            return True
        ids = sum(inputs.jts[key].values().numel() for key, _ in self._slot_inputs)
        return ids <= MAX_POOLED_IDS_PER_BAG * inputs.stride * len(self._slot_inputs)

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        indices: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        sub_ids: dict[tuple[str, str], torch.Tensor] = {}
        weighted = inputs.weights is not None
        for key, partition_indices in self._slot_inputs:
            jt = inputs.jts[key]
            ids = jt.values()
            lengths.append(jt.lengths())
            if weighted:
                weights.append(jt.weights().to(torch.float32))
            for j in partition_indices:
                if j is None:
                    indices.append(ids.to(torch.int64))  # a no-op for int64 ids: every part shares them
                    continue
                if key not in sub_ids:
                    sub_ids[key] = self._composer.partitions[key].indices(ids)
                indices.append(sub_ids[key][j])
        return _FusedComposeFunction.apply(self._placeholder, self, inputs.stride, indices, lengths, weights)

    def tables_and_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each table's ``[rows, D]`` weights and optimizer state (views into the TBEs), rebuilt only when a
        TBE's buffers were replaced."""
        key = tuple(p for tbe in self._tbes for p in (tbe.weights_host.data_ptr(), tbe.momentum1_host.data_ptr()))
        if self._storage is None or self._storage[0] != key:
            tables: list[torch.Tensor] = []
            states: list[torch.Tensor] = []
            for tbe in self._tbes:
                tables += tbe.split_embedding_weights()
                if tbe.optimizer == EmbOptimType.EXACT_SGD:
                    states += [torch.empty(0)] * len(tbe.embedding_specs)
                else:
                    states += [table_states[0] for table_states in tbe.split_optimizer_states()]
            self._storage = (key, tables, states)
        return self._storage[1], self._storage[2]

    def apply_update(self, grad: torch.Tensor, batch: int, *inputs: list[torch.Tensor]) -> None:
        """The backward: every touched row's gradient, then the TBEs' optimizer applied in place. ``inputs``:
        each part's rows as the forward returned them, the lengths, the weights and the forward's pooled parts
        of pooled products."""
        rows, lengths, weights, pooled = inputs
        tables, states = self.tables_and_states()
        if len(self._row_slots) != len(tables):
            # Each table's row -> index map (int32 per row, -1 between batches: 1/64 of an FP32 D=64
            # table), kept so a batch costs its reads, not its tables' rows.
            self._row_slots = [torch.full((t.shape[0],), -1, dtype=torch.int32) for t in tables]
        lrs = [tbe.get_learning_rate() for tbe in self._tbes for _ in tbe.embedding_specs]
        eps = [float(tbe.optimizer_args.eps) for tbe in self._tbes for _ in tbe.embedding_specs]
        torch.ops.torchrec_qr.compose_backward_update(
            grad,
            tables,
            states,
            self._row_slots,
            rows,
            lengths,
            weights,
            pooled,
            self._slots,
            self._given_parts,
            self._optimizers,
            lrs,
            eps,
            batch,
        )


class _FusedComposeFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        placeholder: torch.Tensor,
        kernel: FusedCompose,
        batch: int,
        indices: list[torch.Tensor],
        lengths: list[torch.Tensor],
        weights: list[torch.Tensor],
    ) -> torch.Tensor:
        tables, _ = kernel.tables_and_states()
        out, rows, pooled = torch.ops.torchrec_qr.compose_forward(
            tables, indices, lengths, weights, kernel._slots, kernel._parts, batch, kernel._width
        )
        ctx.kernel, ctx.batch, ctx.inputs = kernel, batch, (rows, lengths, weights, pooled)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        ctx.kernel.apply_update(grad.contiguous(), ctx.batch, *ctx.inputs)
        return (None,) * 6


def _div_mod(partition: Partition | None) -> tuple[list[int], list[int]] | None:
    """The divisors and moduli of a scheme whose classes are ``(id // divisor) % modulus`` (quotient-remainder,
    mixed radix, Chinese remainder), which the kernel computes itself; None for any other."""
    if partition is None:
        return None
    try:
        indexer = partition.indexer()
    except NotImplementedError:
        return None
    return (indexer.divisors, indexer.moduli) if isinstance(indexer, DivModIndexer) else None


def _unsupported(composer: LookupComposer, tbes: Sequence[Any]) -> str | None:
    """Why the kernel cannot serve this lookup, or None."""
    if composer.num_sources != 1:
        return "sub-tables come from more than one lookup"
    for tbe in tbes:
        if not isinstance(tbe, SplitTableBatchedEmbeddingBagsCodegen):
            return f"{type(tbe).__name__} is not a split TBE with a fused optimizer"
        if not tbe.use_cpu or tbe.weights_precision != SparseType.FP32:
            return "tables are not FP32 on CPU"
        if tbe.optimizer not in _OPTIMIZERS:
            return f"optimizer {tbe.optimizer} (the kernel applies SGD, row-wise Adagrad and Adagrad)"
        args = tbe.optimizer_args
        if args.weight_decay != 0 or args.gradient_clipping or args.max_norm != 0:
            return "weight decay, gradient clipping or max-norm is set"
        if getattr(tbe, "_global_weight_decay", None) is not None or getattr(tbe, "use_writeback_bwd_prehook", False):
            return "global weight decay or a write-back hook is set"
    num_tables = sum(len(tbe.embedding_specs) for tbe in tbes)
    if any(e.local_table >= num_tables for e in composer.expand_slots):
        return "the TBEs hold fewer tables than the lookup reads"
    for s in composer.compose_slots:
        if s.combine == "path":
            return f"table {s.table!r} composes with path functions"
    return None
