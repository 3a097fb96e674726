"""Bad ids in the sharded module: float ids are rejected on every rank before any communication, and with
``validate_ids=False`` an id past a sub-table raises in the lookup, as in the unsharded module, instead of
silently reading some row (FBGEMM's default would read row 0). World size 2, gloo."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import Wrapper
from torchrec.distributed.sharding_plan import table_wise
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr import CompositionalEmbeddingBagCollection, CompositionalEmbeddingBagConfig, QuotientRemainder
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder


def _tables() -> list[EmbeddingBagConfig]:
    return [
        CompositionalEmbeddingBagConfig(
            name=f"q{i}", num_embeddings=38, embedding_dim=8, feature_names=[f"f{i}"], partition=QuotientRemainder(4)
        )
        for i in range(2)
    ]


def _kjt(ids: list, dtype: torch.dtype = torch.int64) -> KeyedJaggedTensor:
    """One bag per feature (f0, f1) holding ``ids[i]``, batch size 1."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor(ids, dtype=dtype), lengths=torch.tensor([1, 1])
    )


def _outcome(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def _worker(rank: int, world_size: int) -> dict[str, str]:
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    sharder = CompositionalEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    )
    module = CompositionalEmbeddingBagCollection(_tables(), device="meta", validate_ids=False)
    plan = construct_module_sharding_plan(  # one table per rank: every rank computes a lookup
        module,
        per_param_sharding={
            "q0": table_wise(rank=0, compute_kernel="fused"),
            "q1": table_wise(rank=1, compute_kernel="fused"),
        },
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        Wrapper(module),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder],
    )
    return {
        "valid": _outcome(lambda: dmp(_kjt([37, 5]))),
        "float": _outcome(lambda: dmp(_kjt([1.7, 2.0], torch.float32))),
        "past_sub_table": _outcome(lambda: dmp(_kjt([1000, 1000]))),
    }


def test_unsharded_reference_raises_for_an_id_past_its_sub_tables() -> None:
    module = CompositionalEmbeddingBagCollection(_tables(), validate_ids=False)
    with pytest.raises(RuntimeError, match="out of bounds"):
        module(_kjt([1000, 1000]))


def test_sharded_module_rejects_float_ids_and_never_reads_a_row_for_an_id_past_its_tables() -> None:
    for rank, result in enumerate(run_ranks(_worker, 2, timeout=180.0)):
        assert result["valid"] == "ok", (rank, result)
        assert result["float"].startswith("TypeError: KeyedJaggedTensor values are ids and must be torch.int64"), (
            rank,
            result,
        )
        assert result["past_sub_table"].startswith("RuntimeError"), (rank, result)
