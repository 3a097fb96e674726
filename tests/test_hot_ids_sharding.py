"""HotIds tables sharded by DMP equal the unsharded module (table-wise, column-wise, data-parallel, mixed; forward
and fused optimizer steps), row-wise is refused with the reason, and DCP checkpoints carry the hot-id list into
another plan and into the unsharded module. World size 2, gloo on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharding_cases import Wrapper, batch, max_weight_diff, shard
from torchrec.distributed.sharding_plan import row_wise
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_qr import (
    ChineseRemainder,
    CompositionalEmbeddingBagCollection,
    CompositionalEmbeddingBagConfig,
    HotIds,
    MixedRadix,
    QuotientRemainder,
)
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.planner import sharder_rejects, sharding_constraints
from torchrec_qr.distributed.sub_table_plan import logical_row_wise_sharding

LR = 0.1
HOT = {"h_mult": [3, 17, 40, 41], "h_add": [0, 29], "h_concat": [5, 6, 7, 12, 22]}


def hot_tables(placeholder: bool = False) -> list[EmbeddingBagConfig]:
    """Every combine op over three bases, SUM and MEAN, a two-feature table and a plain one. ``placeholder``:
    the same shapes with other hot ids (what a checkpoint load must overwrite)."""

    def ids(name: str) -> torch.Tensor:
        return torch.arange(len(HOT[name])) if placeholder else torch.tensor(HOT[name])

    return [
        CompositionalEmbeddingBagConfig(
            name="h_mult",
            num_embeddings=50,
            embedding_dim=8,
            feature_names=["f0", "f1"],
            partition=HotIds(ids("h_mult"), base=QuotientRemainder(7)),
            combine="mult",
        ),
        EmbeddingBagConfig(name="t_plain", num_embeddings=20, embedding_dim=8, feature_names=["f2"]),
        CompositionalEmbeddingBagConfig(
            name="h_add",
            num_embeddings=30,
            embedding_dim=8,
            feature_names=["f3"],
            partition=HotIds(ids("h_add"), base=MixedRadix((4, 7))),
            combine="add",
            pooling=PoolingType.MEAN,
        ),
        CompositionalEmbeddingBagConfig(
            name="h_concat",
            num_embeddings=35,
            embedding_dim=8,
            feature_names=["f4"],
            partition=HotIds(ids("h_concat"), base=ChineseRemainder((5, 7))),
            combine="concat",
            sub_dims=[4, 4],
        ),
    ]


def _hot_batch(seed: int, weighted: bool):
    """Random bags with every hot id of f0 in the batch."""
    kjt = batch(seed, weighted, hot_tables())
    values = kjt.values().clone()
    f0 = kjt.length_per_key()[0]
    values[: min(f0, 4)] = torch.tensor(HOT["h_mult"])[: min(f0, 4)]
    return type(kjt)(keys=kjt.keys(), values=values, lengths=kjt.lengths(), weights=kjt.weights_or_none())


def _equal_to_unsharded(rank: int, world_size: int, shardings: list[str]) -> dict[str, float]:
    errors: dict[str, float] = {}
    for sharding in shardings:
        for weighted in (False, True):
            torch.manual_seed(0)
            ref = CompositionalEmbeddingBagCollection(hot_tables(), is_weighted=weighted)
            optimizer = EmbOptimType.EXACT_ADAGRAD if sharding == "mixed" else EmbOptimType.EXACT_SGD
            fused = {"optimizer": optimizer, "learning_rate": LR, "eps": 1e-8}
            module = CompositionalEmbeddingBagCollection(
                hot_tables(placeholder=True), is_weighted=weighted, device="meta"
            )
            dmp = shard(module, CompositionalEmbeddingBagCollectionSharder(fused_params=fused), sharding, world_size)
            dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})  # hot ids included
            make = (
                (lambda ps: torch.optim.Adagrad(ps, lr=LR, eps=1e-8))
                if sharding == "mixed"
                else (lambda ps: torch.optim.SGD(ps, lr=LR))
            )
            dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
            dense_opt, ref_opt = (make(dense) if dense else None), make(list(ref.parameters()))
            case = f"{sharding}/weighted={weighted}"
            for step in range(2):
                kjts = [_hot_batch(100 * step + r, weighted) for r in range(world_size)]
                out = dmp(kjts[rank])
                errors[f"{case}/forward_{step}"] = (out - Wrapper(ref)(kjts[rank])).abs().max().item()
                coef = [torch.randn(out.shape, generator=torch.Generator().manual_seed(9 + step + r)) for r in range(2)]
                (out * coef[rank]).sum().backward()
                if dense_opt:
                    dense_opt.step()
                    dense_opt.zero_grad()
                ref_opt.zero_grad()
                (sum((Wrapper(ref)(k) * coef[r]).sum() for r, k in enumerate(kjts)) / world_size).backward()
                ref_opt.step()
                errors[f"{case}/weights_{step}"] = max_weight_diff(dmp, ref.state_dict())
            errors[f"{case}/hot_ids_restored"] = float(
                not torch.equal(dmp.state_dict()["ebc._hot_ids.h_mult"], torch.tensor(HOT["h_mult"]))
            )
    return errors


def test_sharded_equals_unsharded() -> None:
    for rank_errors in run_ranks(_equal_to_unsharded, 2, ["tw", "cw", "dp", "mixed"], timeout=300.0):
        assert len(rank_errors) == 4 * 2 * 5, "not every case ran"
        for name, err in rank_errors.items():
            assert err < 1e-6, f"{name} differs by {err}"


def test_row_wise_is_refused_with_the_reason_and_the_planner_avoids_it() -> None:
    table = hot_tables()[0]
    param = torch.nn.Parameter(torch.empty(table.num_embeddings, 8, device="meta"), requires_grad=False)
    ps = row_wise()(param, 2, 2, "cpu", CompositionalEmbeddingBagCollectionSharder())
    with pytest.raises(ValueError, match="table 'h_mult': row_wise.*HotIds.*hot ids keep rows of their own"):
        logical_row_wise_sharding(table, ps, 2, 2)
    assert "table_wise" in sharder_rejects(table, ps, 2, 2)  # the fix is named
    model = Wrapper(CompositionalEmbeddingBagCollection(hot_tables(), device="meta"))
    constraints = sharding_constraints(model, world_size=2, sharders=[CompositionalEmbeddingBagCollectionSharder()])
    allowed = constraints["h_mult"].sharding_types
    assert "row_wise" not in allowed and "table_row_wise" not in allowed and "table_wise" in allowed


def _checkpoint_worker(rank: int, world_size: int, root: str) -> dict:
    from torchrec_qr.distributed.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    ref = CompositionalEmbeddingBagCollection(hot_tables())
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": LR}
    sharder = CompositionalEmbeddingBagCollectionSharder(fused_params=fused)
    dmp = shard(CompositionalEmbeddingBagCollection(hot_tables(), device="meta"), sharder, "tw", world_size)
    dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
    dmp(_hot_batch(3 + rank, False)).pow(2).sum().backward()  # a fused update: weights differ from the initial ones
    path = save_checkpoint(Path(root), 1, dmp, dmp.fused_optimizer)
    probe = _hot_batch(77, False)
    out = dmp(probe).detach()
    # Another plan, built with placeholder hot ids: the load must bring the saved lists and outputs.
    other = shard(
        CompositionalEmbeddingBagCollection(hot_tables(placeholder=True), device="meta"), sharder, "cw", world_size
    )
    before = (other(probe) - out).abs().max().item()
    load_checkpoint(path, other)  # weights only: rowwise Adagrad state cannot change column shard counts
    return {
        "path": str(path),
        "out": out,
        "before": before,
        "after": (other(probe) - out).abs().max().item(),
        "hot": other.state_dict()["ebc._hot_ids.h_concat"].clone(),
    }


def test_checkpoint_round_trip_keeps_the_hot_ids(tmp_path: Path) -> None:
    from torchrec_qr.distributed.checkpoint import load_checkpoint

    results = run_ranks(_checkpoint_worker, 2, str(tmp_path), timeout=180.0)
    for r in results:
        assert r["before"] > 1e-3, "placeholder hot ids gave the saved outputs: the check cannot fail"
        assert r["after"] < 1e-6 and torch.equal(r["hot"], torch.tensor(HOT["h_concat"]))
    tables = hot_tables(placeholder=True)
    model = Wrapper(CompositionalEmbeddingBagCollection(tables))
    load_checkpoint(results[0]["path"], model)
    assert {t.name: t.partition.hot_ids.tolist() for t in tables if hasattr(t, "partition")} == HOT
    torch.testing.assert_close(model(_hot_batch(77, False)), results[0]["out"], atol=1e-6, rtol=0)
