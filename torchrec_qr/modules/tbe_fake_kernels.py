"""Shape-only ("fake") kernel of FBGEMM's dense TBE lookup, so ``torch.export`` can trace the storage.

fbgemm-gpu-cpu 1.8 registers no fake kernel for ``fbgemm::dense_embedding_codegen_lookup_function``: export
of any module calling it stops with ``UnsupportedOperatorException``. The output of a pooled lookup is
``[B, total_D]`` with ``B = (offsets.numel() - 1) / T`` for T features. Registered on import, only where
FBGEMM has none.
"""

from __future__ import annotations

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

__all__: list[str] = []

_OP = "fbgemm::dense_embedding_codegen_lookup_function"


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
    if pooling_mode == PoolingMode.NONE or B_offsets is not None:
        raise NotImplementedError("the fake dense TBE lookup covers pooled, fixed-batch lookups only")
    num_features = D_offsets.numel() - 1
    batch = (offsets.numel() - 1) // num_features
    return dev_weights.new_empty(batch, total_D, dtype=SparseType.from_int(output_dtype).as_dtype())


if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "Meta"):
    torch.library.register_fake(_OP)(_dense_lookup_fake)
