"""Optimizer state in checkpoints: optimizers as name-keyed views (which survive resharding), states that
appear only at the first step, and the step counter of FBGEMM's fused kernels."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.nn.parallel import DistributedDataParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper

__all__ = [
    "OptimizerArg",
    "fused_kernel_step",
    "init_lazy_state",
    "keyed_views",
    "optimizer_state",
    "optimizer_structure",
    "saved_state_finder",
    "set_fused_kernel_step",
    "unwrap_ddp",
]

OptimizerArg = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """DDP adds ``module.`` to keys; DMP strips its own prefixes in state_dict/named_parameters."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def keyed_views(model: nn.Module, optimizer: OptimizerArg) -> dict[str, KeyedOptimizer] | None:
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
    names = {id(p): n for n, p in unwrap_ddp(model).named_parameters()}
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


def optimizer_structure(views: dict[str, KeyedOptimizer] | None) -> list[str] | None:
    return None if views is None else sorted(k for k in views if k)


def optimizer_state(views: dict[str, KeyedOptimizer]) -> dict[str, Any]:
    if "" in views:
        return views[""].state_dict()
    return {name: view.state_dict() for name, view in views.items()}


def saved_state_finder(views: dict[str, KeyedOptimizer], metadata: Metadata) -> Callable[[torch.Tensor], bool]:
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


def init_lazy_state(optimizer: torch.optim.Optimizer, in_checkpoint: Callable[[torch.Tensor], bool]) -> None:
    """Create optimizer states that appear only at the first step, so a checkpoint can be loaded in place.

    Only states the checkpoint holds are created: an optimizer saved before its first step stays fresh.

    Only plain torch optimizers (also inside KeyedOptimizerWrapper / CombinedOptimizer) lacking state are
    stepped, with zero gradients and lr 0 so no parameter moves. Other KeyedOptimizers, such as DMP's fused
    ones, create their state up front; stepping them with lr 0 would push lr 0 into the FBGEMM kernel.
    """
    if isinstance(optimizer, CombinedOptimizer):
        for _, child in optimizer.optimizers:
            init_lazy_state(child, in_checkpoint)
        return
    if isinstance(optimizer, (KeyedOptimizerWrapper, OptimizerWrapper)):
        init_lazy_state(optimizer._optimizer, in_checkpoint)
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


def fused_kernel_step(optimizer: OptimizerArg) -> int:
    """FBGEMM's own step counter (Adam/LAMB bias correction, counter-based weight decay), which no TorchRec
    state dict holds; every kernel steps once per training batch."""
    return max((int(k.iter.max()) for k in _fused_kernels(optimizer)), default=0)


def set_fused_kernel_step(optimizer: OptimizerArg, step: int) -> None:
    with torch.no_grad():
        for kernel in _fused_kernels(optimizer):
            kernel.iter.fill_(step)
            kernel.iter_cpu.fill_(step)
