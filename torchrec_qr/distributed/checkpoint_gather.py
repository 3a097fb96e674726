"""The whole unsharded state dict of a sharded model, gathered on rank 0."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.shards_wrapper import LocalShardsWrapper

from torchrec_qr.distributed.checkpoint_optim import unwrap_ddp
from torchrec_qr.distributed.checkpoint_ranks import group_rank, group_size

__all__ = ["gather_full_state_dict"]


def gather_full_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """The whole unsharded ``state_dict`` as plain CPU tensors on rank 0, None on other ranks.

    Keys are those of the unsharded module (DMP and DDP prefixes are not in them). Every rank must call it
    (sharded tables are gathered collectively); rank 0 needs memory for the full model. Useful to export a
    trained model or compare it with a reference.
    """
    sd = unwrap_ddp(model).state_dict()
    rank = group_rank(None)
    out: dict[str, Any] | None = {} if rank == 0 else None
    for key, value in sd.items():
        if isinstance(value, ShardedTensor):
            full = None
            if rank == 0:
                full = torch.empty(value.size(), dtype=value.dtype, device=_collective_device(value))
            value.gather(dst=0, out=full, dtype=value.dtype)
        elif isinstance(value, DTensor) and isinstance(value.to_local(), LocalShardsWrapper):
            full = _gather_local_shards(value, rank)
        elif isinstance(value, DTensor):
            full = value.full_tensor()
        elif isinstance(value, torch.Tensor):
            full = value.detach()
        else:
            full = value
        if out is not None:
            out[key] = full.cpu().clone() if isinstance(full, torch.Tensor) else full
    return out


def _gather_local_shards(value: DTensor, rank: int) -> torch.Tensor | None:
    """TorchRec's DTensors (``env.output_dtensor=True``) hold a LocalShardsWrapper, which supports too few
    ops for ``full_tensor()``: send each shard with its offsets to rank 0 instead."""
    local: LocalShardsWrapper = value.to_local()  # type: ignore[assignment]
    pieces = [(tuple(o), t.detach().cpu()) for o, t in zip(local.local_offsets(), local.local_shards())]
    gathered: list[Any] | None = [None] * group_size(None) if rank == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    full = torch.empty(value.size(), dtype=value.dtype)
    for offsets, t in (piece for rank_pieces in gathered for piece in rank_pieces):
        full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return full


def _collective_device(st: ShardedTensor) -> torch.device:
    """Where ShardedTensor.gather puts its buffers (CPU for gloo, the current GPU for NCCL)."""
    if dist.get_backend(st._process_group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
