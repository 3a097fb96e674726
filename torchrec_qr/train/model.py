"""The model: TorchRec's DLRM / DLRM_DCN over the embedding collection the config asks for.

Tables are built on the ``meta`` device: DistributedModelParallel allocates and initializes the shards,
so no rank ever holds a full copy of a large table.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_qr import ChineseRemainder, CompositionalEmbeddingBagCollection, MixedRadix, QuotientRemainder, compress
from torchrec_qr.modules.partitions import Partition
from torchrec_qr.train.config import CRITEO_NUM_DENSE, EmbeddingsConfig, TrainingConfig

__all__ = ["build_model", "hash_rows", "logical_tables", "partition_factory", "table_configs"]


def logical_tables(num_embeddings: list[int], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One full table per Criteo categorical feature, named ``t_<feature>``."""
    if len(num_embeddings) != len(DEFAULT_CAT_NAMES):
        raise ValueError(f"need {len(DEFAULT_CAT_NAMES)} table sizes, got {len(num_embeddings)}")
    return [
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=embedding_dim, feature_names=[f])
        for f, n in zip(DEFAULT_CAT_NAMES, num_embeddings)
    ]


def hash_rows(num_embeddings: int, e: EmbeddingsConfig) -> int:
    """Rows of a hashed table: ``ceil(N / collisions)`` above the threshold, N otherwise."""
    return num_embeddings if num_embeddings <= e.threshold else math.ceil(num_embeddings / e.collisions)


def partition_factory(e: EmbeddingsConfig):
    """``num_embeddings -> Partition`` for the configured scheme."""

    def make(n: int) -> Partition:
        if e.scheme == "qr":
            return QuotientRemainder(collisions=e.collisions)
        if e.scheme == "mixed_radix":
            return MixedRadix.balanced(n, e.num_partitions)
        return ChineseRemainder.balanced(n, e.num_partitions)

    return make


def table_configs(
    cfg: TrainingConfig, num_embeddings: list[int], id_counts: list[np.ndarray] | None = None
) -> list[EmbeddingBagConfig]:
    """The tables the model stores: full, hashed (shrunk) or compositional; with ``embeddings.hot_rows``, each
    compressed table's most frequent ids (by ``id_counts``, one array per feature) keep rows of their own.
    Without counts the hot ids are placeholders (the first ids): right shapes for plans and plan checks, which
    need no data; training passes the counts, and a checkpoint load restores its saved lists."""
    e = cfg.embeddings
    if e.kind == "auto":
        raise ValueError(
            "embeddings.kind=auto: the tables depend on the world size and budget; use torchrec_qr.plan.budget_plan"
        )
    full = logical_tables(num_embeddings, cfg.model.embedding_dim)
    if e.kind == "full":
        return full
    if e.kind == "hash":
        for t in full:
            t.num_embeddings = hash_rows(t.num_embeddings, e)
        return full
    hot = None
    if e.hot_rows:
        counts = id_counts or [np.zeros(t.num_embeddings, dtype=np.int64) for t in full]
        hot = {t.name: torch.from_numpy(np.asarray(c)) for t, c in zip(full, counts)}
    return compress(
        full,
        partition=partition_factory(e),
        combine=e.combine,
        threshold=e.threshold,
        composition=e.composition,
        path=e.path if e.combine == "path" else None,
        hot_ids=hot,
        hot_rows=e.hot_rows,
    )


def build_model(cfg: TrainingConfig, tables: list[EmbeddingBagConfig], dense_device: torch.device) -> DLRMTrain:
    """DLRMTrain (DLRM + BCE-with-logits loss) with embedding tables on ``meta``."""
    meta = torch.device("meta")
    if cfg.embeddings.kind in ("compositional", "auto"):
        ebc = CompositionalEmbeddingBagCollection(tables, is_weighted=False, device=meta)
    else:
        ebc = EmbeddingBagCollection(tables=tables, is_weighted=False, device=meta)
    m = cfg.model
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=CRITEO_NUM_DENSE,
        dense_arch_layer_sizes=m.dense_arch_layer_sizes,
        over_arch_layer_sizes=m.over_arch_layer_sizes,
        dense_device=dense_device,
    )
    if m.arch == "dcn":
        return DLRMTrain(DLRM_DCN(**common, dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim))
    return DLRMTrain(DLRM(**common))
