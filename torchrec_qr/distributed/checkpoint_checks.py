"""Actionable errors before DCP's own when a checkpoint does not fit the model or optimizer it is loaded into."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchrec_qr.distributed.checkpoint_ranks import all_gather

__all__ = ["check_compatible"]


def _tensor_leaves(obj: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Size]:
    """Global sizes of the tensors in a nested dict, keyed the way DCP flattens keys."""
    out: dict[str, torch.Size] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_tensor_leaves(v, key))
        elif isinstance(v, torch.Tensor):  # ShardedTensor and DTensor report their global size
            out[key] = torch.Size(v.size())
    return out


def check_compatible(
    path: Path, metadata: Metadata, state: dict[str, Any], strict: bool, group: dist.ProcessGroup | None
) -> None:
    """Actionable errors before DCP's own (which name neither the cause nor a way out), raised on every rank.

    Ranks hold different optimizer keys (a fused optimizer knows only its rank's tables), so entries of the
    checkpoint that nobody wants are found from the union over ranks.
    """
    saved = metadata.state_dict_metadata
    wanted = _tensor_leaves(state)
    local_error: str | None = None
    try:
        _check_wanted(path, saved, wanted)
    except ValueError as e:
        local_error = str(e)
    gathered = all_gather((local_error, sorted(wanted)), group)
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise ValueError(errors[0])
    # Optimizer entries are always checked: a state missing here would silently restart.
    prefixes = tuple(p for p in ("model." if strict else "", "optim." if "optim" in state else "") if p)
    anyone = {k for _, keys in gathered for k in keys}
    unexpected = [
        k
        for k, v in saved.items()
        if prefixes and k.startswith(prefixes) and k not in anyone and isinstance(v, TensorStorageMetadata)
    ]
    if unexpected:
        raise ValueError(
            f"{path} has {len(unexpected)} entries the model / optimizer here lacks, e.g. {unexpected[:5]}: pass "
            "the same model and optimizer structure as when saving (strict=False ignores extra model entries)"
        )


def _check_wanted(path: Path, saved: Mapping[str, Any], wanted: dict[str, torch.Size]) -> None:
    missing = [k for k in wanted if k not in saved]
    if missing:
        hint = (
            "optimizer entries differ: pass the same optimizer structure as when saving (fused optimizers "
            "exist only for DMP models; load with optimizer=None to restore weights only)"
            if all(k.startswith("optim.") for k in missing)
            else "was it saved from the same model?"
        )
        raise ValueError(f"{path} lacks {len(missing)} entries this model expects, e.g. {missing[:5]}: {hint}")
    for key, size in wanted.items():
        md = saved[key]
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"{path}: {key} is not a tensor in the checkpoint")
        if tuple(md.size) == tuple(size):
            continue
        msg = f"{path}: {key} has shape {tuple(md.size)} in the checkpoint, {tuple(size)} here"
        if key.startswith("optim.") and len(size) == 1 == len(md.size):
            msg += (
                ". TorchRec keeps one row-wise optimizer state (e.g. rowwise Adagrad momentum) per column "
                "shard of a column-wise sharded table, so it cannot move to a plan with a different number "
                "of column shards: keep that table's column shard count, or load with optimizer=None "
                "(weights only) and start the optimizer state afresh"
            )
        raise ValueError(msg)
