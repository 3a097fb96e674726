"""Sharding of compositional collections with TorchRec's DistributedModelParallel and planner."""

from torchrec_qr.distributed.compositional_embeddingbag import (
    CompositionalEmbeddingBagCollectionSharder,
    ShardedCompositionalEmbeddingBagCollection,
)
from torchrec_qr.distributed.compression_planner import CompressionPlan, CompressionPlanner, TableChoice, parse_bytes

__all__ = [
    "CompositionalEmbeddingBagCollectionSharder",
    "CompressionPlan",
    "CompressionPlanner",
    "ShardedCompositionalEmbeddingBagCollection",
    "TableChoice",
    "parse_bytes",
]
