"""The hot-id lists of a collection's ``HotIds`` tables, kept as buffers.

A ``HotIds`` table's id -> row mapping depends on its hot-id list, so the list is model state: it must be
in the state dict (saved and resharded by DCP like any replicated tensor) and a load must restore it. The
buffer *is* the partition's tensor (``HotIds._bind``), so loading copies the saved list straight into the
mapping every lookup uses. The partition stays the source of truth for moves: ``to_empty`` (which DMP and
meta-device initialization use) would leave the buffer uninitialized, so the values are copied back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.modules.partitions import HotIds

__all__ = ["HotIdBuffers"]


class HotIdBuffers(nn.Module):
    """One int64 buffer per ``HotIds`` table, named after the table (state-dict key ``{prefix}{table}``).

    Args:
        tables: a collection's logical table configs; only ``HotIds`` tables get a buffer.
        device: where the buffers live (``meta`` or None: where the partitions keep them, CPU by default;
            a meta module still carries the real list, which the sharded module then takes over).
    """

    def __init__(self, tables: list[EmbeddingBagConfig], device: torch.device | str | None = None) -> None:
        super().__init__()
        self._partitions: dict[str, tuple[HotIds, int]] = {}
        for t in tables:
            if isinstance(t, CompositionalEmbeddingBagConfig) and isinstance(t.partition, HotIds):
                hot = t.partition.hot_ids
                if device is not None and torch.device(device).type != "meta":
                    hot = hot.to(device)
                self.register_buffer(t.name, hot)
                t.partition._bind(hot)
                self._partitions[t.name] = (t.partition, t.num_embeddings)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HotIdBuffers:
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, (partition, _) in self._partitions.items():
            after = self._buffers[name]
            if after is before[name] or after is None or after.is_meta:
                continue
            with torch.no_grad():
                after.copy_(before[name])  # ids are configuration: to_empty() must not drop them
            partition._bind(after)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, (_, num_embeddings) in self._partitions.items():
            loaded = state_dict.get(prefix + name)
            problem = _bad_hot_ids(loaded, num_embeddings) if isinstance(loaded, torch.Tensor) else None
            if problem:  # raised, not appended to error_msgs: DMP's loader drops those
                raise ValueError(
                    f"table {name!r}: the loaded hot-id list {problem}; it cannot come from a HotIds "
                    "table of this size: check the checkpoint matches the model"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, (partition, _) in self._partitions.items():
            if partition.hot_ids is not self._buffers[name]:  # load_state_dict(assign=True) swaps the tensor
                partition._bind(self._buffers[name])


def _bad_hot_ids(hot: torch.Tensor, num_embeddings: int) -> str | None:
    if hot.dim() != 1:
        return f"has shape {tuple(hot.shape)}, not [num_hot]"
    if hot.dtype != torch.int64:
        return f"has dtype {hot.dtype}, not int64"
    if hot.numel() and (int(hot[0]) < 0 or int(hot[-1]) >= num_embeddings):
        return f"has ids outside [0, {num_embeddings})"
    if hot.numel() > 1 and not bool((hot[1:] > hot[:-1]).all()):
        return "is not strictly increasing"
    return None
