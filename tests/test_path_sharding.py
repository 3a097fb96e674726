"""Sharded path tables equal the unsharded module: forward, then one optimizer step (world size 2, gloo).

Each rank feeds its own batch; the reference sees every rank's batch and averages the loss over ranks.
Sharded tables use fused SGD; path functions (and data-parallel tables) use torch SGD over
``in_backward_optimizer_filter(dmp.named_parameters())``, as the training app's dense optimizer does.
All plans run in one spawn of two ranks to keep the test short.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import Wrapper, batch, max_weight_diff, shard
from torchrec.distributed.types import ParameterSharding, ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    MixedRadix,
    PathFunction,
    QuotientRemainder,
)
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.sub_table_plan import physical_parameter_shardings, row_split_stride

LR = 0.1
# Per table, cycling (sharding_cases.plan_generators): "tw" puts every path table on rank 0, so rank 1
# owns none and must still touch their functions for DDP; "rw+tw+dp" row-splits the QR path table.
PLANS = ("tw", "dp", "rw+tw+dp")


def tables() -> list[EmbeddingBagConfig]:
    return [
        CompositionalEmbeddingBagConfig(
            name="p_qr",
            num_embeddings=50,
            embedding_dim=8,
            feature_names=["f0", "f1"],
            partition=QuotientRemainder(7),
            combine="path",
            path=PathFunction.linear(bias=True),
        ),
        EmbeddingBagConfig(name="plain", num_embeddings=20, embedding_dim=8, feature_names=["f2"]),
        CompositionalEmbeddingBagConfig(
            name="p_mr",
            num_embeddings=60,
            embedding_dim=8,
            feature_names=["f3"],
            partition=MixedRadix((4, 4, 4)),
            combine="path",
            pooling=PoolingType.MEAN,
            path=PathFunction.mlp((8,), activation="tanh"),
        ),
        CompositionalEmbeddingBagConfig(
            name="mult",
            num_embeddings=45,
            embedding_dim=8,
            feature_names=["f4"],
            partition=QuotientRemainder(5),
            combine="mult",
        ),
        CompositionalEmbeddingBagConfig(
            name="p_crt",
            num_embeddings=30,
            embedding_dim=8,
            feature_names=["f5"],
            partition=ChineseRemainder((5, 7)),
            combine="path",
            path=PathFunction.mlp((12,)),
        ),
    ]


def _coef(step: int, rank: int, width: int) -> torch.Tensor:
    return torch.randn(4, width, generator=torch.Generator().manual_seed(7 + 31 * step + rank))


def _run(rank: int, world_size: int) -> list[dict]:
    report = []
    for plan in PLANS:
        for weighted in (False, True):
            torch.manual_seed(0)
            ref = CompositionalEmbeddingBagCollection(tables(), is_weighted=weighted)
            sharder = CompositionalEmbeddingBagCollectionSharder(
                fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
            )
            dmp = shard(
                CompositionalEmbeddingBagCollection(tables(), is_weighted=weighted, device="meta"),
                sharder,
                plan,
                world_size,
            )
            dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
            state = dmp.state_dict()
            case: dict = {
                "plan": plan,
                "weighted": weighted,
                "same_keys": {k.removeprefix("ebc.") for k in state} == set(ref.state_dict()),
            }
            # Path functions are replicated plain tensors, not shards.
            case["replicated"] = all(
                not isinstance(v, ShardedTensor) for k, v in state.items() if "_path_functions." in k
            )
            dense_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=LR)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
            ref_model = Wrapper(ref)
            for step in range(2):
                kjts = [batch(1000 * step + r, weighted, tables()) for r in range(world_size)]
                out = dmp(kjts[rank])
                case[f"forward_{step}"] = (out - ref_model(kjts[rank])).abs().max().item()
                if step == 1:
                    break
                case["touches_all_functions"] = _reaches(out, list(dmp.module.ebc._path_functions.parameters()))
                (out * _coef(step, rank, out.shape[1])).sum().backward()
                dense_opt.step()
                dense_opt.zero_grad()
                ref_opt.zero_grad()
                ref_loss = sum((ref_model(k) * _coef(step, r, out.shape[1])).sum() for r, k in enumerate(kjts))
                (ref_loss / world_size).backward()
                ref_opt.step()
                case["weights_after_step"] = max_weight_diff(dmp, ref.state_dict())
            report.append(case)
    return report


def _reaches(out: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether ``out``'s autograd graph uses every one of ``params`` (walked, not run: running a backward
    here would enter collectives). DDP without a static graph needs every rank to use every path
    function; DMP's default static graph would also tolerate unused ones."""
    found, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return all(id(p) in found for p in params)


def test_sharded_path_tables_equal_unsharded() -> None:
    for rank, rank_report in enumerate(run_ranks(_run, 2, timeout=300)):
        assert len(rank_report) == 2 * len(PLANS), f"rank {rank} did not run every plan"
        for case in rank_report:
            where = f"rank {rank} plan {case['plan']} weighted={case['weighted']}"
            assert case["same_keys"] and case["replicated"] and case["touches_all_functions"], where
            for name in ("forward_0", "weights_after_step", "forward_1"):
                assert case[name] < 1e-6, f"{where}: {name} differs by {case[name]}"


def test_column_wise_and_non_leading_row_split_are_refused() -> None:
    by_name = {t.name: t for t in tables()}
    cw = ParameterSharding(sharding_type="column_wise", compute_kernel="fused")
    with pytest.raises(ValueError, match="'p_qr': column_wise cannot compose combine='path'"):
        physical_parameter_shardings([by_name["p_qr"]], {"p_qr": cw})
    with pytest.raises(ValueError, match="'p_mr': row_wise for combine='path' needs the row-split partition"):
        row_split_stride(by_name["p_mr"])
    assert row_split_stride(by_name["p_qr"]) == (0, 7)
