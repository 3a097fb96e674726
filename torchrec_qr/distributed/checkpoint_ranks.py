"""Collectives of checkpointing: every rank learns of any rank's failure instead of waiting forever.

Each helper also works without a process group (one process, world size 1).
"""

from __future__ import annotations

import errno
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

__all__ = [
    "CheckpointWriteError",
    "all_gather",
    "describe_failures",
    "disk_full_hint",
    "distributed",
    "group_rank",
    "group_size",
    "on_rank0",
    "picklable",
    "raise_first",
]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are intact."""


def disk_full_hint(error: BaseException, root: Path) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f" (ENOSPC: the disk holding {root} is full; free space, keep fewer checkpoints with "
            "keep_last, or write them elsewhere)"
        )
    return ""


def describe_failures(e: CheckpointException, root: Path) -> str:
    """Each failed rank's error, not DCP's tracebacks."""
    return "; ".join(
        f"rank {r}: {type(err).__name__}: {err}{disk_full_hint(err, root)}"
        for r, (err, _) in sorted(e.failures.items())
    ) or str(e)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if distributed() else 0


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if distributed() else 1


def picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def all_gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_first(gathered: list[tuple[Any, ...]], rank: int, own: BaseException | None, what: str) -> None:
    if own is not None:
        raise own
    for r, (error, *_rest) in enumerate(gathered):
        if error is not None:
            raise CheckpointWriteError(f"checkpoint not published: rank {r} failed {what}: {error}") from error


def on_rank0(fn: Callable[[], None], group: dist.ProcessGroup | None) -> None:
    """Run ``fn`` on rank 0; every rank raises if it failed (instead of waiting at the next collective)."""
    error: BaseException | None = None
    if group_rank(group) == 0:
        try:
            fn()
        except Exception as e:
            error = e
    if distributed():
        box = [picklable(error)]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(box, src=src, group=group)
        if error is None and box[0] is not None:
            raise box[0]
    if error is not None:
        raise error
