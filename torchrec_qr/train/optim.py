"""Optimizers: fused FBGEMM optimizers for sharded tables, a torch optimizer for everything else.

The sparse optimizer is given to the sharders as ``fused_params`` (it runs inside the backward of the
TBE kernels, never materializing table gradients); the dense one wraps the remaining parameters, and
``CombinedOptimizer`` presents both as one keyed optimizer with one state dict for checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_qr.train.config import DenseOptimizerConfig, SparseOptimizerConfig

__all__ = ["SPARSE_OPTIMIZERS", "build_optimizer", "fused_params", "optimizer_state_floats_per_row"]

# "Exact" variants: duplicate ids in a batch are coalesced before the update (deterministic).
SPARSE_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}


def fused_params(cfg: SparseOptimizerConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "optimizer": SPARSE_OPTIMIZERS[cfg.type],
        "learning_rate": cfg.lr,
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
    }
    if cfg.type == "adam":
        params.update(beta1=cfg.beta1, beta2=cfg.beta2)
    return params


def optimizer_state_floats_per_row(optimizer: str, dim: int) -> int:
    """Optimizer state a row of width ``dim`` carries (fp32 values), for the memory report."""
    return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1, "adam": 2 * dim, "amsgrad": 3 * dim}[optimizer]


def _dense_factory(cfg: DenseOptimizerConfig):
    if cfg.type == "sgd":
        return lambda params: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.type == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return lambda params: torch.optim.Adam(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        amsgrad=cfg.type == "amsgrad",
    )


def build_optimizer(model: DistributedModelParallel, dense: DenseOptimizerConfig) -> CombinedOptimizer:
    """The fused optimizer of the sharded tables combined with ``dense`` over all other parameters."""
    dense_params: dict[str, nn.Parameter] = dict(in_backward_optimizer_filter(model.named_parameters()))
    return CombinedOptimizer([model.fused_optimizer, KeyedOptimizerWrapper(dense_params, _dense_factory(dense))])
