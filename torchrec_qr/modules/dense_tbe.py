"""FBGEMM's dense TBE made servable: a forward ``torch.jit.save`` accepts and a fake kernel for ``torch.export``.

``DenseTableBatchedEmbeddingBagsCodegen.forward`` builds its variable-batch metadata in a ``@torch.jit.ignore``
Python method, so a scripted module holding it runs but cannot be saved; and fbgemm-gpu-cpu 1.8 registers no
fake kernel for its lookup op, so ``torch.export`` stops with ``UnsupportedOperatorException``. Fixed-batch
lookups (all this package issues) need neither: ``ServableDenseTBE.forward`` is the parent's call with the
metadata it builds for a fixed batch (none), and the fake kernel gives the pooled output's shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

__all__ = ["ServableDenseTBE"]

_OP = "fbgemm::dense_embedding_codegen_lookup_function"


class ServableDenseTBE(DenseTableBatchedEmbeddingBagsCodegen):
    """``DenseTableBatchedEmbeddingBagsCodegen`` with a fixed-batch forward that TorchScript can save."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pooling_mode_int = int(self.pooling_mode)

    def forward(  # type: ignore[override]
        self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.fbgemm.dense_embedding_codegen_lookup_function(
            dev_weights=self.weights,
            weights_offsets=self.weights_offsets,
            D_offsets=self.D_offsets,
            total_D=self.total_D,
            max_D=self.max_D,
            hash_size_cumsum=self.hash_size_cumsum,
            total_hash_size_bits=self.total_hash_size_bits,
            indices=indices,
            offsets=offsets.to(dtype=indices.dtype),
            pooling_mode=self.pooling_mode_int,
            indice_weights=per_sample_weights.float() if per_sample_weights is not None else None,
            feature_requires_grad=None,
            output_dtype=self.output_dtype,
        )


def _dense_lookup_fake(
    dev_weights: torch.Tensor,
    weights_offsets: torch.Tensor,
    D_offsets: torch.Tensor,
    total_D: int,
    max_D: int,
    hash_size_cumsum: torch.Tensor,
    total_hash_size_bits: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    pooling_mode: int,
    indice_weights: torch.Tensor | None,
    feature_requires_grad: torch.Tensor | None,
    output_dtype: int = 0,
    B_offsets: torch.Tensor | None = None,
    vbe_output_offsets_feature_rank: torch.Tensor | None = None,
    vbe_B_offsets_rank_per_feature: torch.Tensor | None = None,
    max_B: int = -1,
    max_B_feature_rank: int = -1,
    vbe_output_size: int = -1,
) -> torch.Tensor:
    """``[B, total_D]`` for T features, ``B = (offsets.numel() - 1) / T`` (pooled, fixed batch)."""
    if pooling_mode == PoolingMode.NONE or B_offsets is not None:
        raise NotImplementedError("the fake dense TBE lookup covers pooled, fixed-batch lookups only")
    batch = (offsets.numel() - 1) // (D_offsets.numel() - 1)
    return dev_weights.new_empty(batch, total_D, dtype=SparseType.from_int(output_dtype).as_dtype())


if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "Meta"):  # a later FBGEMM may bring its own
    torch.library.register_fake(_OP)(_dense_lookup_fake)
