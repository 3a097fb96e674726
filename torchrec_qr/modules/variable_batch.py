"""Variable-batch (VBE) inputs: each feature's bags re-read in the output batch's order.

A VBE ``KeyedJaggedTensor`` carries each feature at its own batch size (``stride_per_key_per_rank``) and, in
``inverse_indices``, which of its bags each output sample takes; TorchRec's EBC pools each feature at its own
batch, then expands the pooled rows by the inverse indices. Composition is per id, so the same function is
had by first expanding the bags (a bag read by several samples is composed once per sample): exact, at the
cost of the deduplication VBE would save.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["fixed_batch"]


def fixed_batch(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same input at one batch size: feature f's bag for sample b is its bag ``inverse_indices[f][b]``."""
    inverse_keys, inverse = features.inverse_indices()
    row_of = {k: i for i, k in enumerate(inverse_keys)}
    strides = features.stride_per_key()
    lengths, values, weights = features.lengths(), features.values(), features.weights_or_none()
    out_lengths, out_values, out_weights = [], [], []
    bag_at, id_at = 0, 0
    for key, stride in zip(features.keys(), strides):
        key_lengths = lengths[bag_at : bag_at + stride]
        starts = torch.cumsum(key_lengths, 0) - key_lengths + id_at
        picked = inverse[row_of[key]].to(torch.int64)
        new_lengths = key_lengths[picked]
        total = int(new_lengths.sum())
        # Position of every id of every picked bag: its bag's start plus its rank within the bag.
        bag_starts = torch.repeat_interleave(starts[picked], new_lengths, output_size=total)
        first = torch.repeat_interleave(torch.cumsum(new_lengths, 0) - new_lengths, new_lengths, output_size=total)
        positions = bag_starts + torch.arange(total, device=values.device) - first
        out_lengths.append(new_lengths)
        out_values.append(values[positions])
        if weights is not None:
            out_weights.append(weights[positions])
        bag_at += stride
        id_at += int(key_lengths.sum())
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=torch.cat(out_values),
        lengths=torch.cat(out_lengths),
        weights=torch.cat(out_weights) if weights is not None else None,
    )
