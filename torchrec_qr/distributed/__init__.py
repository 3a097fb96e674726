"""Sharding of compositional collections with TorchRec's DistributedModelParallel and planner."""

from torchrec_qr.distributed.compositional_embeddingbag import (
    CompositionalEmbeddingBagCollectionSharder,
    ShardedCompositionalEmbeddingBagCollection,
)

__all__ = ["CompositionalEmbeddingBagCollectionSharder", "ShardedCompositionalEmbeddingBagCollection"]
