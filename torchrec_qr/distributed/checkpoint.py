"""Atomic, reshardable checkpoints of DistributedModelParallel models with torch.distributed.checkpoint (DCP).

DCP writes each rank's shards of the sharded tables (``ShardedTensor`` / ``DTensor`` in ``dmp.state_dict()``)
and of their fused optimizer states, plus one copy of replicated dense tensors; it reads them back into any
other sharding plan or world size, or into an unsharded module. What DCP leaves to the caller is added here:
atomic publication, per-rank extras (data position, RNG states), lazily created optimizer states, plain
(non-keyed) torch optimizers and the step counter of FBGEMM's fused kernels.

Layout of ``root``::

    step_000100/                 complete: this name appears only after every rank finished writing
        .metadata, __*_*.distcp  DCP: "model.*" (model.state_dict()) and "optim.*" (optimizer state)
        extra_rank_00000.pt      per rank: the caller's ``extra`` and the RNG states
        meta.json                step, world size, fused-kernel optimizer step, size and SHA-256 of every file
    .step_000200.tmp/            being written, or left by a crash: never read, removed by the next save

Loading verifies the checksums first (``checksums``): a damaged checkpoint raises ``CheckpointCorrupt``
naming the file, and ``latest_intact_checkpoint`` falls back to the newest intact one with a warning.

Helpers live beside this module, one concern each: ``checksums`` (integrity), ``checkpoint_optim``
(optimizer state), ``checkpoint_checks`` (errors for a checkpoint that does not fit), ``checkpoint_ranks``
(failures reported to every rank) and ``checkpoint_gather`` (``gather_full_state_dict``).

All ranks must see the same ``root`` (a shared file system when there is more than one host). Checkpoints
hold pickled Python objects (extras, optimizer hyper-parameters): load only checkpoints you trust.

Example::

    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    if (path := latest_checkpoint(root)) is not None:
        start = load_checkpoint(path, dmp, optimizer)["batches_seen"]
    ...
    save_checkpoint(root, step, dmp, optimizer, extra={"batches_seen": step}, keep_last=3)

    # later, one process, no process group: the unsharded module
    load_checkpoint(latest_checkpoint(root), model)
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from torchrec_qr.distributed.checkpoint_checks import check_compatible
from torchrec_qr.distributed.checkpoint_gather import gather_full_state_dict
from torchrec_qr.distributed.checkpoint_optim import (
    OptimizerArg,
    fused_kernel_step,
    init_lazy_state,
    keyed_views,
    optimizer_state,
    optimizer_structure,
    saved_state_finder,
    set_fused_kernel_step,
    unwrap_ddp,
)
from torchrec_qr.distributed.checkpoint_ranks import (
    CheckpointWriteError,
    all_gather,
    describe_failures,
    disk_full_hint,
    group_rank,
    group_size,
    on_rank0,
    picklable,
    raise_first,
)
from torchrec_qr.distributed.checksums import (
    CheckpointCorrupt,
    digest_files,
    files_written_by,
    read_meta,
    seal,
    verify_files,
)

__all__ = [
    "CheckpointCorrupt",
    "CheckpointWriteError",
    "checkpoint_step",
    "gather_full_state_dict",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)$")
_META = "meta.json"
_FORMAT = 2  # 2: meta.json records and seals file checksums


# --------------------------------------------------------------------------------------------- public API


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: OptimizerArg = None,
    extra: Mapping[str, Any] | None = None,
    *,
    keep_last: int | None = None,
    overwrite: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically; call on every rank. Returns the checkpoint's path.

    Args:
        root: directory holding the checkpoints (created if needed).
        step: training step; names the checkpoint.
        model: a ``DistributedModelParallel`` model, a DDP-wrapped or a plain module.
        optimizer: ``dmp.fused_optimizer``, a ``KeyedOptimizer`` / ``CombinedOptimizer``, a plain torch
            optimizer over parameters of ``model``, or a mapping name -> any of these. Fused (in-backward)
            optimizer states are only saved if passed here. Pass the same structure to ``load_checkpoint``.
        extra: small picklable per-rank data (data position, scheduler state, ...); RNG states (python,
            numpy, torch, cuda) are stored next to it automatically.
        keep_last: keep only this many complete checkpoints (the newest by step).
        overwrite: replace an existing checkpoint of the same step instead of raising.
        process_group: group for DCP and the barriers (default: the default group).

    Data is written to ``.step_XXXXXX.tmp`` first; after every rank finished, rank 0 renames it. A failure
    (or crash) on any rank before that leaves earlier checkpoints untouched and no ``step_*`` directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.tmp"
    rank, world_size = group_rank(process_group), group_size(process_group)
    optimizers = keyed_views(model, optimizer)  # validates before anything touches the disk

    on_rank0(lambda: _prepare_dir(root, final, tmp, overwrite), process_group)

    state: dict[str, Any] = {"model": unwrap_ddp(model).state_dict()}
    if optimizers is not None:
        state["optim"] = optimizer_state(optimizers)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group)
    except CheckpointException as e:  # a BaseException: `except Exception` in training loops would miss it
        raise CheckpointWriteError(
            f"checkpoint {final} not written (earlier checkpoints are intact): {describe_failures(e, root)}"
        ) from e

    payload = {"step": step, "rank": rank, "world_size": world_size, "extra": dict(extra or {}), "rng": _rng_state()}
    local_error: BaseException | None = None
    digests: dict[str, Any] = {}
    try:
        _write_synced(tmp / _extra_name(rank), payload)
        digests = digest_files(tmp, files_written_by(tmp, rank))
    except OSError as e:  # reported to every rank below, so no rank waits forever for rank 0
        local_error = CheckpointWriteError(
            f"checkpoint {final} not written (earlier checkpoints are intact): "
            f"rank {rank}: {e}{disk_full_hint(e, root)}"
        )
    except Exception as e:
        local_error = e
    gathered = all_gather((picklable(local_error), fused_kernel_step(optimizer), digests), process_group)
    raise_first(gathered, rank, local_error, "writing its extras")
    fused_step = max(s for _, s, _ in gathered)

    meta = {
        "format": _FORMAT,
        "step": step,
        "world_size": world_size,
        "fused_optimizer_step": fused_step,
        "optimizers": optimizer_structure(optimizers),
        "files": {name: d for _, _, rank_digests in gathered for name, d in rank_digests.items()},
    }
    on_rank0(lambda: _publish(root, final, tmp, meta, keep_last), process_group)
    if rank == 0:
        logger.info("saved checkpoint %s (world size %d)", final, world_size)
    return final


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Published checkpoints under ``root``, oldest first (``*.tmp`` directories are never listed).

    A ``step_*`` directory appears only once complete, so one found here is either complete or damaged
    since (``verify_checkpoint`` tells which).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The published checkpoint with the highest step under ``root``, or None (not verified: see
    ``latest_intact_checkpoint``)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: str | os.PathLike[str], process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Check every file of a checkpoint against the sizes and SHA-256 sums recorded when it was saved; call
    on every rank (they share the hashing). Returns its ``meta.json``; raises ``CheckpointCorrupt`` naming
    the damaged file. Checkpoints saved before checksums existed are only checked for their files' presence.
    """
    path = Path(path)
    meta = read_meta(path, _META)
    files = meta.get("files")
    if files is None:
        logger.warning("checkpoint %s has no checksums (saved by an older version): not verified", path)
        files = {}
        if not (path / ".metadata").is_file():
            raise CheckpointCorrupt(f"checkpoint {path} is damaged: {path / '.metadata'} is missing")
    verify_files(
        path,
        files,
        group_rank(process_group),
        group_size(process_group),
        lambda errors: all_gather(errors, process_group),
    )
    return meta


def latest_intact_checkpoint(
    root: str | os.PathLike[str], *, strict: bool = False, process_group: dist.ProcessGroup | None = None
) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None if there is none at all; call on every rank.

    A damaged newer checkpoint is skipped with a warning naming it, or, with ``strict``, raises
    ``CheckpointCorrupt``. If every checkpoint is damaged, raises naming the newest's damage.
    """
    damaged: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, process_group)
        except CheckpointCorrupt as e:
            if strict:
                raise CheckpointCorrupt(
                    f"{e}; not falling back to an older checkpoint (strict): remove {path} "
                    "to resume from the previous one"
                ) from e
            damaged.append(str(e))
            continue
        if damaged and group_rank(process_group) == 0:
            logger.warning("falling back to %s: %s", path, "; ".join(damaged))
        return path
    if damaged:
        raise CheckpointCorrupt(f"no intact checkpoint under {root}: {'; '.join(damaged)}")
    return None


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a checkpoint directory was saved at (from its name)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_000100)")
    return int(m.group(1))


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: OptimizerArg = None,
    *,
    restore_rng: bool = True,
    strict: bool = True,
    verify: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); call on every rank. Returns this rank's ``extra``.

    The world size and sharding plan may differ from the saving run (DCP reshards), and ``model`` may be
    the unsharded module at world size 1, with or without a process group. Wrap with DMP *before* loading:
    DMP does not copy weights from the module it wraps. Optimizer states that appear only at the first step
    (torch Adam, SGD momentum) are created with a zero-gradient, zero-lr step when the checkpoint holds them,
    so they can be loaded in place.

    Args:
        path: a checkpoint directory, e.g. ``latest_checkpoint(root)``.
        model: the model to fill, sharded with any plan or unsharded.
        optimizer: the same structure that was passed to ``save_checkpoint`` (None: weights only).
        restore_rng: restore this rank's RNG states (only when the world size is unchanged).
        strict: raise if the checkpoint has model entries this model lacks.
        verify: check the files' checksums first (``verify_checkpoint``); False if that was just done.
        process_group: group for DCP (default: the default group).

    Limitation (TorchRec 1.8): the row-wise optimizer state of a column-wise sharded table (rowwise Adagrad
    momentum) has one row per (row, column shard), so it cannot be loaded into a plan with a different
    number of column shards for that table; a ValueError says so. Load with ``optimizer=None`` instead.

    Extras are per rank: with a different world size, rank 0's extras are returned on every rank and RNG
    states are left alone.
    """
    path = Path(path)
    if verify:
        meta = verify_checkpoint(path, process_group)
    else:
        meta = read_meta(path, _META) if (path / _META).is_file() else {}
    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint (no DCP .metadata); use latest_intact_checkpoint(root) to find one"
        )
    saved_ws = int(meta.get("world_size", 1))
    rank, world_size = group_rank(process_group), group_size(process_group)

    module = unwrap_ddp(model)
    model_sd = module.state_dict()
    state: dict[str, Any] = {"model": model_sd}
    optimizers = keyed_views(model, optimizer)
    saved_structure = meta.get("optimizers")
    if optimizers is not None and saved_structure != optimizer_structure(optimizers):
        raise ValueError(
            f"{path} holds optimizer state {saved_structure!r} (None: none, []: one optimizer, else the names of "
            f"a mapping), but {optimizer_structure(optimizers)!r} was passed: pass the same structure as when saving, "
            "or optimizer=None to load weights only"
        )
    metadata = dcp.FileSystemReader(path).read_metadata()
    if optimizers is not None:
        in_checkpoint = saved_state_finder(optimizers, metadata)
        for opt in optimizer.values() if isinstance(optimizer, Mapping) else [optimizer]:
            init_lazy_state(opt, in_checkpoint)
        state["optim"] = optimizer_state(optimizers)

    check_compatible(path, metadata, state, strict, process_group)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), process_group=process_group)
    except CheckpointException as e:
        raise RuntimeError(f"loading {path} failed: {e}") from e
    # DMP.load_state_dict may mutate the dict (adds DDP's prefix): give it a copy.
    module.load_state_dict(dict(model_sd), strict=strict)
    if optimizers is not None:
        sds = state["optim"]
        for name, view in optimizers.items():
            view.load_state_dict(sds if name == "" else sds[name])
        set_fused_kernel_step(optimizer, int(meta.get("fused_optimizer_step", 0)))

    source_rank = rank if saved_ws == world_size else 0
    payload = torch.load(path / _extra_name(source_rank), map_location="cpu", weights_only=False)
    if saved_ws != world_size:
        logger.warning(
            "checkpoint %s was saved at world size %d, loading at %d: returning rank 0's extras on every rank "
            "and not restoring RNG states",
            path,
            saved_ws,
            world_size,
        )
    elif restore_rng:
        _set_rng_state(payload["rng"])
    if rank == 0:
        logger.info("loaded checkpoint %s (saved at world size %d, loaded at %d)", path, saved_ws, world_size)
    return payload["extra"]


# ---------------------------------------------------------------------------------------------- files


def _prepare_dir(root: Path, final: Path, tmp: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise ValueError(f"checkpoint {final} exists: pass overwrite=True to replace it, or save another step")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):  # left by crashed saves; no save runs concurrently
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _publish(root: Path, final: Path, tmp: Path, meta: dict[str, Any], keep_last: int | None) -> None:
    with open(tmp / _META, "w") as f:
        json.dump(seal(meta), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = root / f".{final.name}.old.tmp"
    if final.exists():  # overwrite=True (checked before writing)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        for stale in list_checkpoints(root)[:-keep_last]:
            trash = root / f".{stale.name}.old.tmp"
            os.replace(stale, trash)  # gone from listings at once, even if the removal below is interrupted
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(root)


def _extra_name(rank: int) -> str:
    return f"extra_rank_{rank:05d}.pt"


def _write_synced(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning(
                "not restoring CUDA RNG states: saved for %d devices, %d visible",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
