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

import bisect
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.shards_wrapper import LocalShardsWrapper
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper

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

class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are intact."""


def _disk_full_hint(error: BaseException, root: Path) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (f" (ENOSPC: the disk holding {root} is full; free space, keep fewer checkpoints with "
                "keep_last, or write them elsewhere)")
    return ""


def _describe_failures(e: CheckpointException, root: Path) -> str:
    """Each failed rank's error, not DCP's tracebacks."""
    return "; ".join(f"rank {r}: {type(err).__name__}: {err}{_disk_full_hint(err, root)}"
                     for r, (err, _) in sorted(e.failures.items())) or str(e)


OptimizerArg = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None

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
    rank, world_size = _rank(process_group), _world_size(process_group)
    optimizers = _keyed_views(model, optimizer)  # validates before anything touches the disk

    _on_rank0(lambda: _prepare_dir(root, final, tmp, overwrite), process_group)

    state: dict[str, Any] = {"model": _unwrap_ddp(model).state_dict()}
    if optimizers is not None:
        state["optim"] = _optimizer_state(optimizers)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group)
    except CheckpointException as e:  # a BaseException: `except Exception` in training loops would miss it
        raise CheckpointWriteError(f"checkpoint {final} not written (earlier checkpoints are intact): "
                                   f"{_describe_failures(e, root)}") from e

    payload = {"step": step, "rank": rank, "world_size": world_size, "extra": dict(extra or {}), "rng": _rng_state()}
    local_error: BaseException | None = None
    digests: dict[str, Any] = {}
    try:
        _write_synced(tmp / _extra_name(rank), payload)
        digests = digest_files(tmp, files_written_by(tmp, rank))
    except OSError as e:  # reported to every rank below, so no rank waits forever for rank 0
        local_error = CheckpointWriteError(f"checkpoint {final} not written (earlier checkpoints are intact): "
                                           f"rank {rank}: {e}{_disk_full_hint(e, root)}")
    except Exception as e:
        local_error = e
    gathered = _all_gather((_picklable(local_error), _fused_kernel_step(optimizer), digests), process_group)
    _raise_first(gathered, rank, local_error, "writing its extras")
    fused_step = max(s for _, s, _ in gathered)

    meta = {
        "format": _FORMAT,
        "step": step,
        "world_size": world_size,
        "fused_optimizer_step": fused_step,
        "optimizers": _structure(optimizers),
        "files": {name: d for _, _, rank_digests in gathered for name, d in rank_digests.items()},
    }
    _on_rank0(lambda: _publish(root, final, tmp, meta, keep_last), process_group)
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
    verify_files(path, files, _rank(process_group), _world_size(process_group),
                 lambda errors: _all_gather(errors, process_group))
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
                raise CheckpointCorrupt(f"{e}; not falling back to an older checkpoint (strict): remove {path} "
                                        "to resume from the previous one") from e
            damaged.append(str(e))
            continue
        if damaged and _rank(process_group) == 0:
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
    rank, world_size = _rank(process_group), _world_size(process_group)

    module = _unwrap_ddp(model)
    model_sd = module.state_dict()
    state: dict[str, Any] = {"model": model_sd}
    optimizers = _keyed_views(model, optimizer)
    saved_structure = meta.get("optimizers")
    if optimizers is not None and saved_structure != _structure(optimizers):
        raise ValueError(
            f"{path} holds optimizer state {saved_structure!r} (None: none, []: one optimizer, else the names of "
            f"a mapping), but {_structure(optimizers)!r} was passed: pass the same structure as when saving, "
            "or optimizer=None to load weights only"
        )
    metadata = dcp.FileSystemReader(path).read_metadata()
    if optimizers is not None:
        in_checkpoint = _saved_state_finder(optimizers, metadata)
        for opt in optimizer.values() if isinstance(optimizer, Mapping) else [optimizer]:
            _init_lazy_state(opt, in_checkpoint)
        state["optim"] = _optimizer_state(optimizers)

    _check_compatible(path, metadata, state, strict, process_group)
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
        _set_fused_kernel_step(optimizer, int(meta.get("fused_optimizer_step", 0)))

    source_rank = rank if saved_ws == world_size else 0
    payload = torch.load(path / _extra_name(source_rank), map_location="cpu", weights_only=False)
    if saved_ws != world_size:
        logger.warning(
            "checkpoint %s was saved at world size %d, loading at %d: returning rank 0's extras on every rank "
            "and not restoring RNG states",
            path, saved_ws, world_size,
        )
    elif restore_rng:
        _set_rng_state(payload["rng"])
    if rank == 0:
        logger.info("loaded checkpoint %s (saved at world size %d, loaded at %d)", path, saved_ws, world_size)
    return payload["extra"]


def gather_full_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """The whole unsharded ``state_dict`` as plain CPU tensors on rank 0, None on other ranks.

    Keys are those of the unsharded module (DMP and DDP prefixes are not in them). Every rank must call it
    (sharded tables are gathered collectively); rank 0 needs memory for the full model. Useful to export a
    trained model or compare it with a reference.
    """
    sd = _unwrap_ddp(model).state_dict()
    rank = _rank(None)
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
    gathered: list[Any] | None = [None] * _world_size(None) if rank == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    full = torch.empty(value.size(), dtype=value.dtype)
    for offsets, t in (piece for rank_pieces in gathered for piece in rank_pieces):
        full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return full


# ----------------------------------------------------------------------------------- optimizer handling


def _keyed_views(model: nn.Module, optimizer: OptimizerArg) -> dict[str, KeyedOptimizer] | None:
    """Each optimizer as a KeyedOptimizer (state keyed by parameter name): "" for a single one."""
    if optimizer is None:
        return None
    if isinstance(optimizer, Mapping):
        if not optimizer or not all(isinstance(k, str) and k for k in optimizer):
            raise ValueError("an optimizer mapping needs at least one entry and non-empty string names")
        return {k: _keyed_view(model, v) for k, v in optimizer.items()}
    return {"": _keyed_view(model, optimizer)}


def _keyed_view(model: nn.Module, optimizer: torch.optim.Optimizer) -> KeyedOptimizer:
    if isinstance(optimizer, KeyedOptimizer):
        return optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"expected a torch.optim.Optimizer or KeyedOptimizer, got {type(optimizer).__name__}")
    # A plain optimizer's state is keyed by parameter position; a view keyed by name survives resharding
    # and rebuilding the optimizer. It shares state and param_groups with the optimizer (loads in place).
    names = {id(p): n for n, p in _unwrap_ddp(model).named_parameters()}
    params: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"{type(optimizer).__name__} holds a parameter of shape {tuple(p.shape)} that is not a "
                    "parameter of the model: pass the model it optimizes, or wrap the optimizer in "
                    "torchrec.optim.keyed.KeyedOptimizerWrapper with your own parameter names"
                )
            params[names[id(p)]] = p
    view = KeyedOptimizer(params, optimizer.state, optimizer.param_groups)
    view.save_param_groups(True)  # lr etc. (changed by schedulers) are part of a plain optimizer's state
    return view


def _structure(views: dict[str, KeyedOptimizer] | None) -> list[str] | None:
    return None if views is None else sorted(k for k in views if k)


def _optimizer_state(views: dict[str, KeyedOptimizer]) -> dict[str, Any]:
    if "" in views:
        return views[""].state_dict()
    return {name: view.state_dict() for name, view in views.items()}


def _saved_state_finder(views: dict[str, KeyedOptimizer], metadata: Metadata) -> Callable[[torch.Tensor], bool]:
    """Whether the checkpoint holds optimizer state for a parameter (it does not if saved before a step)."""
    saved = sorted(metadata.state_dict_metadata)
    prefix_of: dict[int, str] = {}
    for name, view in views.items():
        base = f"optim.{name}.state." if name else "optim.state."
        for key, param in view.params.items():
            prefix_of[id(param)] = f"{base}{key}."

    def in_checkpoint(param: torch.Tensor) -> bool:
        prefix = prefix_of.get(id(param))
        if prefix is None:
            return False
        i = bisect.bisect_left(saved, prefix)
        return i < len(saved) and saved[i].startswith(prefix)

    return in_checkpoint


def _init_lazy_state(optimizer: torch.optim.Optimizer, in_checkpoint: Callable[[torch.Tensor], bool]) -> None:
    """Create optimizer states that appear only at the first step, so a checkpoint can be loaded in place.

    Only states the checkpoint holds are created: an optimizer saved before its first step stays fresh.

    Only plain torch optimizers (also inside KeyedOptimizerWrapper / CombinedOptimizer) lacking state are
    stepped, with zero gradients and lr 0 so no parameter moves. Other KeyedOptimizers, such as DMP's fused
    ones, create their state up front; stepping them with lr 0 would push lr 0 into the FBGEMM kernel.
    """
    if isinstance(optimizer, CombinedOptimizer):
        for _, child in optimizer.optimizers:
            _init_lazy_state(child, in_checkpoint)
        return
    if isinstance(optimizer, (KeyedOptimizerWrapper, OptimizerWrapper)):
        _init_lazy_state(optimizer._optimizer, in_checkpoint)
        return
    if isinstance(optimizer, KeyedOptimizer):
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    missing = [p for p in params if not optimizer.state.get(p) and in_checkpoint(p)]  # .get: a defaultdict
    if not missing:
        return
    with_grad = {p for p in params if p.grad is not None}
    for p in missing:
        if p not in with_grad:
            p.grad = torch.zeros_like(p)
    lrs = [g.get("lr") for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        if "lr" in g:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p in params:
            if p not in with_grad:
                p.grad = None


def _fused_kernels(optimizer: OptimizerArg) -> list[SplitTableBatchedEmbeddingBagsCodegen]:
    """The FBGEMM kernels behind fused optimizers (the kernels sit outside the module tree)."""
    if optimizer is None:
        return []
    if isinstance(optimizer, Mapping):
        return [k for opt in optimizer.values() for k in _fused_kernels(opt)]
    if isinstance(optimizer, CombinedOptimizer):
        return [k for _, opt in optimizer.optimizers for k in _fused_kernels(opt)]
    if isinstance(optimizer, (KeyedOptimizerWrapper, OptimizerWrapper)):
        return _fused_kernels(optimizer._optimizer)
    kernel = getattr(optimizer, "_emb_module", None)  # EmbeddingFusedOptimizer
    return [kernel] if isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen) else []


def _fused_kernel_step(optimizer: OptimizerArg) -> int:
    """FBGEMM's own step counter (Adam/LAMB bias correction, counter-based weight decay), which no TorchRec
    state dict holds; every kernel steps once per training batch."""
    return max((int(k.iter.max()) for k in _fused_kernels(optimizer)), default=0)


def _set_fused_kernel_step(optimizer: OptimizerArg, step: int) -> None:
    with torch.no_grad():
        for kernel in _fused_kernels(optimizer):
            kernel.iter.fill_(step)
            kernel.iter_cpu.fill_(step)


# ---------------------------------------------------------------------------------------- load checks


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


def _check_compatible(
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
    gathered = _all_gather((local_error, sorted(wanted)), group)
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise ValueError(errors[0])
    # Optimizer entries are always checked: a state missing here would silently restart.
    prefixes = tuple(p for p in ("model." if strict else "", "optim." if "optim" in state else "") if p)
    anyone = {k for _, keys in gathered for k in keys}
    unexpected = [k for k, v in saved.items() if prefixes and k.startswith(prefixes) and k not in anyone
                  and isinstance(v, TensorStorageMetadata)]
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


# ------------------------------------------------------------------------------------- files and ranks


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
            logger.warning("not restoring CUDA RNG states: saved for %d devices, %d visible",
                           len(state["cuda"]), torch.cuda.device_count())


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """DDP adds ``module.`` to keys; DMP strips its own prefixes in state_dict/named_parameters."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if _distributed() else 0


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def _collective_device(st: ShardedTensor) -> torch.device:
    """Where ShardedTensor.gather puts its buffers (CPU for gloo, the current GPU for NCCL)."""
    if dist.get_backend(st._process_group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _all_gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_first(gathered: list[tuple[Any, ...]], rank: int, own: BaseException | None, what: str) -> None:
    if own is not None:
        raise own
    for r, (error, *_rest) in enumerate(gathered):
        if error is not None:
            raise CheckpointWriteError(f"checkpoint not published: rank {r} failed {what}: {error}") from error


def _on_rank0(fn: Callable[[], None], group: dist.ProcessGroup | None) -> None:
    """Run ``fn`` on rank 0; every rank raises if it failed (instead of waiting at the next collective)."""
    error: BaseException | None = None
    if _rank(group) == 0:
        try:
            fn()
        except Exception as e:
            error = e
    if _distributed():
        box = [_picklable(error)]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(box, src=src, group=group)
        if error is None and box[0] is not None:
            raise box[0]
    if error is not None:
        raise error
