"""Drop-in parity, sharded: a feature read by several tables and FP16 sub-tables under DMP (world size 2,
gloo) equal the unsharded module, forward and after fused optimizer steps."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import Wrapper, max_weight_diff, shard
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import CompositionalEmbeddingBagCollection, CompositionalEmbeddingBagConfig, QuotientRemainder
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder

LR = 0.1


def _tables(data_type: DataType) -> list[EmbeddingBagConfig]:
    """Feature ``f`` feeds three tables (two compositional with different partitions, one plain)."""
    return [
        CompositionalEmbeddingBagConfig(
            name="ta",
            num_embeddings=40,
            embedding_dim=8,
            feature_names=["f", "g"],
            partition=QuotientRemainder(7),
            combine="mult",
            data_type=data_type,
        ),
        CompositionalEmbeddingBagConfig(
            name="tb",
            num_embeddings=40,
            embedding_dim=8,
            feature_names=["f"],
            partition=QuotientRemainder(3),
            combine="add",
            pooling=PoolingType.MEAN,
            data_type=data_type,
        ),
        EmbeddingBagConfig(name="tc", num_embeddings=40, embedding_dim=8, feature_names=["f"], data_type=data_type),
    ]


def _batch(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (2 * 4,), generator=g)
    values = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=["f", "g"], values=values, lengths=lengths)


def _sharded_equals_unsharded(rank: int, world_size: int, sharding: str, data_type: DataType) -> dict:
    torch.manual_seed(0)
    ref = CompositionalEmbeddingBagCollection(_tables(data_type))
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    module = CompositionalEmbeddingBagCollection(_tables(data_type), device="meta")
    dmp = shard(module, CompositionalEmbeddingBagCollectionSharder(fused_params=fused), sharding, world_size)
    dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
    ref_model, ref_opt = Wrapper(ref), torch.optim.SGD(ref.parameters(), lr=LR)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]  # data-parallel tables
    dense_opt = torch.optim.SGD(dense, lr=LR) if dense else None
    worst_out = 0.0
    for step in range(2):
        kjts = [_batch(100 * step + r) for r in range(world_size)]
        out = dmp(kjts[rank])
        expected = ref_model(kjts[rank])
        worst_out = max(worst_out, (out - expected).abs().max().item())
        if dense_opt is not None:
            dense_opt.zero_grad()
        out.pow(2).sum().backward()
        if dense_opt is not None:
            dense_opt.step()
        ref_opt.zero_grad()
        # TorchRec divides model-parallel gradients by the world size: the reference averages over ranks.
        (sum(ref_model(k).pow(2).sum() for k in kjts) / world_size).backward()
        ref_opt.step()
    keys = sorted(ref_model.ebc(kjts[0]).keys())
    return {"out": worst_out, "weights": max_weight_diff(dmp, ref.state_dict()), "keys": keys}


@pytest.mark.parametrize("sharding", ["tw", "cw", "dp", "mixed"])
def test_shared_feature_sharded(sharding: str) -> None:
    for result in run_ranks(_sharded_equals_unsharded, 2, sharding, DataType.FP32):
        assert result["keys"] == ["f@ta", "f@tb", "f@tc", "g"]
        assert result["out"] < 1e-5 and result["weights"] < 1e-5, result


def _row_wise_shared(rank: int, world_size: int) -> str:
    try:
        _sharded_equals_unsharded(rank, world_size, "rw", DataType.FP32)
    except ValueError as e:
        return str(e)
    return "no error"


def test_shared_feature_row_wise_is_rejected_clearly() -> None:
    for message in run_ranks(_row_wise_shared, 2):
        assert "feature 'f' is read by tables ['ta', 'tb', 'tc']" in message and "row_wise" in message


def test_fp16_sub_tables_sharded() -> None:
    for result in run_ranks(_sharded_equals_unsharded, 2, "tw", DataType.FP16):
        # FBGEMM rounds fp16 rows after each fused update (stochastic rounding off on CPU): compare loosely.
        assert result["out"] < 1e-2 and result["weights"] < 1e-2, result


def _vbe_batch(seed: int) -> KeyedJaggedTensor:
    """``f`` at 3 bags, ``g`` at 2, read by 4 samples through inverse indices (multi-id and empty bags)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 0, 3, 1, 2])
    values = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    inverse = torch.stack([torch.randint(0, 3, (4,), generator=g), torch.randint(0, 2, (4,), generator=g)])
    return KeyedJaggedTensor(
        keys=["f", "g"],
        values=values,
        lengths=lengths,
        stride_per_key_per_rank=[[3], [2]],
        inverse_indices=(["f", "g"], inverse),
    )


def _vbe_sharded_equals_unsharded(rank: int, world_size: int, sharding: str) -> float:
    torch.manual_seed(0)
    ref = CompositionalEmbeddingBagCollection(_tables(DataType.FP32))
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    module = CompositionalEmbeddingBagCollection(_tables(DataType.FP32), device="meta")
    dmp = shard(module, CompositionalEmbeddingBagCollectionSharder(fused_params=fused), sharding, world_size)
    dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
    kjt = _vbe_batch(rank)
    out = dmp(kjt)
    assert out.shape[0] == 4
    return (out - Wrapper(ref)(kjt)).abs().max().item()


@pytest.mark.parametrize("sharding", ["tw", "cw"])
def test_variable_batch_inputs_sharded(sharding: str) -> None:
    for err in run_ranks(_vbe_sharded_equals_unsharded, 2, sharding):
        assert err < 1e-6
