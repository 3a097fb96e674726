"""What composition reads from an input KJT: each (logical table, feature)'s bags and weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

__all__ = ["Inputs"]


@dataclass
class Inputs:
    """A KJT's bags by (logical table, feature), and where each one's weights start in the KJT's weights.

    Keyed by table too because one feature may feed several tables, and a sharded lookup's input carries it
    once per table (row-wise shards bucketize its ids per table).
    """

    jts: dict[tuple[str, str], JaggedTensor]
    weight_start: dict[tuple[str, str], int]
    weights: torch.Tensor | None
    stride: int
