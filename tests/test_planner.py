"""TorchRec's planner on compositional collections: estimates from stored bytes, constraints by logical
name, balanced automatic plans, row-wise shards over ids, and the CLI. (The collective plan at world size 2
is tested with the DMP run in test_plan_io.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sharding_cases import Wrapper, tables
from torch import nn
from torchrec.distributed.planner import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_qr import CompositionalEmbeddingBagCollection, CompositionalEmbeddingBagConfig, QuotientRemainder
from torchrec_qr.distributed.plan_checks import validate_plan
from torchrec_qr.distributed.planner import propose_plan
from torchrec_qr.plan import main

ROOT = Path(__file__).resolve().parents[1]
D = 16


class TwoCollections(nn.Module):
    def __init__(self, compositional: list[EmbeddingBagConfig], plain: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.qr = CompositionalEmbeddingBagCollection(compositional, device="meta")
        self.full = EmbeddingBagCollection(plain, device=torch.device("meta"))


def _qr(name: str, n: int, collisions: int) -> CompositionalEmbeddingBagConfig:
    return CompositionalEmbeddingBagConfig(
        name=name,
        num_embeddings=n,
        embedding_dim=D,
        feature_names=[f"f_{name}"],
        partition=QuotientRemainder(collisions),
        combine="mult",
    )


def _plain(name: str, n: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=D, feature_names=[f"f_{name}"])


def test_storage_estimate_is_the_stored_sub_tables() -> None:
    """A 100k-id QR table (1000 + 100 stored rows) is estimated exactly as a plain 1100-row table, and a
    full 100k-row table costs exactly its extra rows' bytes more: estimates follow stored bytes, not N x D."""
    model = TwoCollections([_qr("t_qr", 100_000, 100)], [_plain("t_same_bytes", 1100), _plain("t_full", 100_000)])
    tw = ParameterConstraints(sharding_types=["table_wise"])
    proposal = propose_plan(model, 2, constraints={n: tw for n in ("t_qr", "t_same_bytes", "t_full")})
    option = {o.name: o for o in proposal.options}
    assert tuple(option["t_qr"].tensor.shape) == (1100, D)
    storage = {name: o.total_storage.ddr for name, o in option.items()}
    assert storage["t_qr"] == storage["t_same_bytes"]
    assert storage["t_full"] - storage["t_same_bytes"] == (100_000 - 1100) * D * 4


def test_constraints_by_logical_table_name() -> None:
    constraints = {
        "t_mult": ParameterConstraints(sharding_types=["column_wise"]),
        "t_add": ParameterConstraints(sharding_types=["table_wise"]),
        "t_plain": ParameterConstraints(sharding_types=["row_wise"]),
    }
    plan = propose_plan(
        Wrapper(CompositionalEmbeddingBagCollection(tables(), device="meta")), 2, constraints=constraints
    ).plan.plan["ebc"]
    assert {n: plan[n].sharding_type for n in constraints} == {
        "t_mult": "column_wise",
        "t_add": "table_wise",
        "t_plain": "row_wise",
    }
    # Chinese remainder has no row split: row-wise replicates its sub-tables (sub_table_plan).
    plan = propose_plan(
        Wrapper(CompositionalEmbeddingBagCollection(tables(), device="meta")),
        2,
        constraints={"t_concat": ParameterConstraints(sharding_types=["row_wise"])},
    ).plan.plan["ebc"]
    assert plan["t_concat"].sharding_type == "row_wise"


@pytest.mark.parametrize("world_size", [2, 4])
def test_automatic_plan_balances_ranks(world_size: int) -> None:
    """Eight compositional tables of 20k..2.6M ids: the ranks' estimated step times (what TorchRec balances)
    within 10%; row-wise shards of compositional tables split their ids; a table that cannot go row-wise
    does not."""
    sizes = [20_000 * 2**i for i in range(8)]
    pooled = CompositionalEmbeddingBagConfig(  # pooled-mode mult: row-wise is impossible for it
        name="t_pooled",
        num_embeddings=500_000,
        embedding_dim=D,
        feature_names=["f_pooled"],
        partition=QuotientRemainder(50),
        composition="pooled",
    )
    model = TwoCollections([_qr(f"t{i}", n, 50) for i, n in enumerate(sizes)] + [pooled], [_plain("t_small", 100)])
    proposal = propose_plan(model, world_size, batch_size=2048)
    perf = proposal.perf_per_rank()
    assert len(perf) == world_size and max(perf.values()) <= 1.1 * min(perf.values()), perf
    qr_plan = proposal.plan.plan["qr"]
    assert qr_plan["t_pooled"].sharding_type not in ("row_wise", "table_row_wise")
    assert any(ps.sharding_type == "row_wise" for ps in qr_plan.values())
    for name, n in zip([f"t{i}" for i in range(8)], sizes):
        ps = qr_plan[name]
        if ps.sharding_type == "row_wise":
            assert sum(s.shard_sizes[0] for s in ps.sharding_spec.shards) == n
    validate_plan(proposal.plan, model, world_size)


def test_cli_prints_a_plan_for_a_training_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchrec_qr.plan", "--config", "configs/synthetic_qr_mult.yaml", "--world-size", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# 26 tables (19 compositional): 20,716,384 stored parameters, 82,837,728 as full tables" in out
    per_rank = [float(m) for m in re.findall(r"^# rank \d: tables ([\d.,]+) MB; planner estimate", out, re.M)]
    assert len(per_rank) == 2 and max(per_rank) <= 1.1 * min(per_rank), per_rank  # row-wise big tables: even
    data = yaml.safe_load(out)
    assert data["world_size"] == 2
    tables_planned = data["modules"]["model.sparse_arch.embedding_bag_collection"]
    assert sorted(tables_planned) == sorted(f"t_cat_{i}" for i in range(26))
    assert tables_planned["t_cat_25"]["sharding_type"] in ("row_wise", "table_wise", "column_wise", "table_row_wise")


def test_cli_checks_a_plan_file(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", str(ROOT / "configs" / "synthetic_crt.yaml"), "--world-size", "2", "--plan"]
    assert main(args + [str(ROOT / "configs/plans/table_wise_ws2.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# plan checked: " in out and "t_cat_25:\n      sharding_type: table_wise" in out
    assert main(args + [str(ROOT / "configs/plans/mixed_ws2.yaml")]) == 0  # row-wise Chinese remainder too
    assert "t_cat_25:\n      sharding_type: row_wise" in capsys.readouterr().out
