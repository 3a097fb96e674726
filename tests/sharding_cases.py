"""Shared pieces of the sharding tests: tables, batches, DMP construction, and the unsharded reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    ExplicitPartitions,
    HotIds,
    MixedRadix,
    QuotientRemainder,
)
from torchrec_qr.modules.composition import pools_first

BATCH = 4


def tables() -> list[EmbeddingBagConfig]:
    """Every combine op, both poolings, both composition modes, a plain table, multi-feature tables, k=2 and 3."""
    return [
        CompositionalEmbeddingBagConfig(
            name="t_mult",
            num_embeddings=50,
            embedding_dim=8,
            feature_names=["f0", "f1"],
            partition=QuotientRemainder(7),
            combine="mult",
        ),
        EmbeddingBagConfig(name="t_plain", num_embeddings=20, embedding_dim=8, feature_names=["f2"]),
        CompositionalEmbeddingBagConfig(
            name="t_concat",
            num_embeddings=30,
            embedding_dim=8,
            feature_names=["f3"],
            partition=ChineseRemainder((5, 7)),
            combine="concat",
            sub_dims=[4, 4],
        ),
        CompositionalEmbeddingBagConfig(
            name="t_add",
            num_embeddings=40,
            embedding_dim=8,
            feature_names=["f4"],
            partition=QuotientRemainder(3),
            combine="add",
            pooling=PoolingType.MEAN,
        ),
        CompositionalEmbeddingBagConfig(
            name="t_mult3",
            num_embeddings=60,
            embedding_dim=8,
            feature_names=["f5"],
            partition=MixedRadix((4, 4, 4)),
            combine="mult",
            pooling=PoolingType.MEAN,
        ),
        CompositionalEmbeddingBagConfig(
            name="t_pooled",
            num_embeddings=45,
            embedding_dim=8,
            feature_names=["f6"],
            partition=QuotientRemainder(5),
            combine="mult",
            composition="pooled",
        ),
    ]


def any_partition_tables() -> list[EmbeddingBagConfig]:
    """Schemes without a row split (Chinese remainder, explicit maps) next to QR: row-wise replicates their
    sub-tables and composes on the rank owning each id block."""
    perm = torch.randperm(61, generator=torch.Generator().manual_seed(3))
    return [
        CompositionalEmbeddingBagConfig(
            name="t_crt",
            num_embeddings=34,
            embedding_dim=8,
            feature_names=["f0", "f1"],
            partition=ChineseRemainder((5, 7)),
            combine="mult",
        ),
        CompositionalEmbeddingBagConfig(
            name="t_crt_add",
            num_embeddings=35,
            embedding_dim=8,
            feature_names=["f2"],
            partition=ChineseRemainder((5, 7)),
            combine="add",
            pooling=PoolingType.MEAN,
        ),
        CompositionalEmbeddingBagConfig(
            name="t_explicit",
            num_embeddings=61,
            embedding_dim=8,
            feature_names=["f3"],
            partition=ExplicitPartitions((perm // 8, perm % 8)),
            combine="mult",
            pooling=PoolingType.MEAN,
        ),
        CompositionalEmbeddingBagConfig(
            name="t_crt_concat",
            num_embeddings=30,
            embedding_dim=8,
            feature_names=["f4"],
            partition=ChineseRemainder((5, 7)),
            combine="concat",
            sub_dims=[4, 4],
        ),
        CompositionalEmbeddingBagConfig(
            name="t_qr",
            num_embeddings=50,
            embedding_dim=8,
            feature_names=["f5"],
            partition=QuotientRemainder(7),
            combine="mult",
        ),
    ]


TABLE_SETS = {"default": tables, "any_partition": any_partition_tables}


def batch(seed: int, weighted: bool, tabs: list[EmbeddingBagConfig] | None = None) -> KeyedJaggedTensor:
    """Multi-hot bags of 0-3 ids (empty bags included)."""
    tabs = tabs or tables()
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in tabs for f in t.feature_names]
    sizes = [t.num_embeddings for t in tabs for _ in t.feature_names]
    lengths = torch.randint(0, 4, (len(keys) * BATCH,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, n, (int(lengths[i * BATCH : (i + 1) * BATCH].sum()),), generator=g)
            for i, n in enumerate(sizes)
        ]
    )
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


class Wrapper(nn.Module):
    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt)
        return torch.cat([kt[k] for k in sorted(kt.keys())], dim=1)


def row_wise_capable(t: EmbeddingBagConfig) -> bool:
    """Row-wise composes per id (not pooled-mode mult); HotIds' own rows follow no id block."""
    if not isinstance(t, CompositionalEmbeddingBagConfig):
        return True
    return not pools_first(t) and not isinstance(t.partition, HotIds)


def plan_generators(sharding: str, world_size: int, tabs: list[EmbeddingBagConfig]) -> dict:
    """Per-table generators: one sharding type for all tables, or a cycle ('mixed': tw / cw / dp / rw).

    Tables that cannot be row-wise sharded (pooled-mode mult, HotIds) fall back to table-wise.
    """

    def one(kind: str, i: int, t: EmbeddingBagConfig):
        if kind == "rw" and row_wise_capable(t):
            return row_wise(compute_kernel="fused")
        if kind == "twrw" and row_wise_capable(t):
            return table_row_wise(host_index=0)
        if kind in ("tw", "rw", "twrw"):
            return table_wise(rank=i % world_size, compute_kernel="fused")
        if kind == "cw":
            return column_wise(ranks=list(range(world_size)), compute_kernel="fused")
        return data_parallel()

    kinds = ["tw", "cw", "dp", "rw"] if sharding == "mixed" else sharding.split("+")
    return {t.name: one(kinds[i % len(kinds)], i, t) for i, t in enumerate(tabs)}


def shard(
    module: nn.Module, sharder: EmbeddingBagCollectionSharder, sharding: str, world_size: int
) -> DistributedModelParallel:
    tabs = module.embedding_bag_configs()
    plan = construct_module_sharding_plan(
        module,
        per_param_sharding=plan_generators(sharding, world_size, tabs),
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return DistributedModelParallel(
        Wrapper(module),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder],
    )


def reference(weighted: bool, seed: int = 0, table_set: str = "default") -> CompositionalEmbeddingBagCollection:
    torch.manual_seed(seed)
    return CompositionalEmbeddingBagCollection(TABLE_SETS[table_set](), is_weighted=weighted)


def max_weight_diff(dmp: DistributedModelParallel, ref_state: dict[str, torch.Tensor]) -> float:
    """Largest difference between this rank's shards (or replicas) and the reference's full tensors."""
    worst = 0.0
    for key, value in dmp.state_dict().items():
        full = ref_state[key.removeprefix("ebc.")]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                worst = max(worst, (shard.tensor - full[r : r + h, c : c + w]).abs().max().item())
        else:
            worst = max(worst, (value - full).abs().max().item())
    return worst
