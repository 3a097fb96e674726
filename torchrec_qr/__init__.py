"""torchrec_qr: compositional embedding-bag collections (Shi et al., KDD 2020) for TorchRec.

Large tables are stored as k small sub-tables of complementary partitions of the id set; an id's embedding
combines one row of each, or (path-based) passes one row through per-class functions of the others.
``CompositionalEmbeddingBagCollection`` is a drop-in EmbeddingBagCollection.
"""

from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.embedding_configs import (
    CompositionalEmbeddingBagConfig,
    compress,
    most_frequent_ids,
    physical_table_configs,
)
from torchrec_qr.modules.fused_compositional_embedding_modules import FusedCompositionalEmbeddingBagCollection
from torchrec_qr.modules.partitions import (
    ChineseRemainder,
    ExplicitPartitions,
    HotIds,
    MixedRadix,
    Partition,
    QuotientRemainder,
    balanced_radices,
    coprime_moduli,
)
from torchrec_qr.modules.path_functions import PathFunction

__all__ = [
    "ChineseRemainder",
    "CompositionalEmbeddingBagCollection",
    "CompositionalEmbeddingBagConfig",
    "ExplicitPartitions",
    "FusedCompositionalEmbeddingBagCollection",
    "HotIds",
    "MixedRadix",
    "Partition",
    "PathFunction",
    "QuotientRemainder",
    "balanced_radices",
    "compress",
    "coprime_moduli",
    "most_frequent_ids",
    "physical_table_configs",
]
