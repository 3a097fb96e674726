"""Sharded compositional collections equal the unsharded module: forward, optimizer steps, bytes sent.

World size 2, gloo on 127.0.0.1. Each rank feeds its own batch; the reference sees every rank's batch and
averages the loss over ranks (TorchRec divides model-parallel gradients by the world size, as DDP does).
"""

from __future__ import annotations

import pytest
import torch
from conftest import plain_configs
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import (
    TABLE_SETS,
    Wrapper,
    batch,
    max_weight_diff,
    reference,
    row_wise_capable,
    shard,
    tables,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from benchmarks.common import CollectiveCounter
from torchrec_qr import CompositionalEmbeddingBagCollection
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder

LR = 0.1
STEPS = 2


def _optimizers(kind: str, dense_params: list, ref_params: list):
    if kind in ("sgd", "sgd_in_backward"):
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
        make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    else:
        fused = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": LR, "eps": 1e-8}
        make = lambda ps: torch.optim.Adagrad(ps, lr=LR, eps=1e-8)  # noqa: E731
    return fused, make


def _coef(step: int, rank: int, width: int) -> torch.Tensor:
    return torch.randn(4, width, generator=torch.Generator().manual_seed(7 + 31 * step + rank))


def _equal_to_unsharded(
    rank: int, world_size: int, sharding: str, optimizer: str, table_set: str = "default"
) -> list[dict]:
    report = []
    tabs = TABLE_SETS[table_set]()
    for weighted in (False, True):
        ref = reference(weighted, table_set=table_set)
        fused, make_opt = _optimizers(optimizer, [], [])
        module = CompositionalEmbeddingBagCollection(tabs, is_weighted=weighted, device="meta")
        if optimizer == "sgd_in_backward":  # the optimizer comes from the tables, not the sharder
            apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": LR})
            fused = None
        dmp = shard(module, CompositionalEmbeddingBagCollectionSharder(fused_params=fused), sharding, world_size)
        dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
        dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        dense_opt = make_opt(dense) if dense else None
        ref_opt = make_opt(list(ref.parameters()))
        ref_model = Wrapper(ref)
        errors = {"weighted": weighted}
        for step in range(STEPS):
            kjts = [batch(1000 * step + r, weighted, tabs) for r in range(world_size)]
            out = dmp(kjts[rank])
            errors[f"forward_{step}"] = (out - ref_model(kjts[rank])).abs().max().item()
            (out * _coef(step, rank, out.shape[1])).sum().backward()
            if dense_opt:
                dense_opt.step()
                dense_opt.zero_grad()
            ref_opt.zero_grad()
            ref_loss = sum((ref_model(k) * _coef(step, r, out.shape[1])).sum() for r, k in enumerate(kjts))
            (ref_loss / world_size).backward()
            ref_opt.step()
            errors[f"weights_{step}"] = max_weight_diff(dmp, ref.state_dict())
        report.append(errors)
    return report


@pytest.mark.parametrize(
    "sharding,optimizer",
    [
        ("tw", "sgd"),
        ("cw", "sgd"),
        ("dp", "sgd"),
        ("rw", "sgd"),
        ("twrw", "sgd"),
        ("rw+twrw", "sgd"),
        ("mixed", "sgd"),
        ("mixed", "adagrad"),
        ("mixed", "sgd_in_backward"),
    ],
)
def test_sharded_equals_unsharded(sharding: str, optimizer: str) -> None:
    for rank_report in run_ranks(_equal_to_unsharded, 2, sharding, optimizer):
        for case in rank_report:
            for name, err in case.items():
                if name != "weighted":
                    assert err < 1e-6, f"{sharding}/{optimizer} weighted={case['weighted']}: {name} differs by {err}"


@pytest.mark.parametrize("sharding", ["rw", "twrw"])
def test_every_partition_scheme_shards_row_wise_exactly(sharding: str) -> None:
    for rank, rank_report in enumerate(run_ranks(_equal_to_unsharded, 2, sharding, "adagrad", "any_partition")):
        for case in rank_report:
            for name, err in case.items():
                if name != "weighted":
                    assert err < 1e-6, f"rank {rank} {sharding} weighted={case['weighted']}: {name} differs by {err}"


def _count_bytes(rank: int, world_size: int, sharding: str) -> dict[str, int]:
    """Bytes handed to collectives during one forward+backward, for a plain EBC and the compositional one."""
    with CollectiveCounter() as counter:
        # Row-wise: only tables both collections can shard row-wise, so the two plans are the same.
        tabs = [t for t in tables() if sharding != "rw" or row_wise_capable(t)]
        plain_tables = plain_configs(tabs)
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
        result = {}
        for label, module, sharder in [
            (
                "plain",
                EmbeddingBagCollection(plain_tables, device=torch.device("meta")),
                EmbeddingBagCollectionSharder(fused_params=fused),
            ),
            (
                "compositional",
                CompositionalEmbeddingBagCollection(tabs, device="meta"),
                CompositionalEmbeddingBagCollectionSharder(fused_params=fused),
            ),
        ]:
            dmp = shard(module, sharder, sharding, world_size)
            dmp(batch(5, False, tabs)).sum().backward()  # first call sets up the dists
            counter.bytes.clear()
            dmp(batch(6 + rank, False, tabs)).sum().backward()
            result[label] = counter.total
        return result


@pytest.mark.parametrize("sharding", ["tw", "cw", "rw"])
def test_bytes_sent_equal_plain_ebc(sharding: str) -> None:
    for rank, counts in enumerate(run_ranks(_count_bytes, 2, sharding)):
        assert counts["plain"] > 0, "no collective traffic was counted: the counter is not wired"
        assert counts["compositional"] == counts["plain"], f"rank {rank} {sharding}: {counts}"
