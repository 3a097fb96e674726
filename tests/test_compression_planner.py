"""The compression planner: every rank fits its budget (bytes recomputed here from the plan's shards), a larger
budget never compresses more, infeasible budgets raise with a reachable minimum, plans pass the plan checks,
DMP shards with them (forward equal to the unsharded module), and a world-size-2 training run with
``embeddings.kind=auto`` trains on what it chose."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from dist_harness import run_ranks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sharding_cases import batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr import CompositionalEmbeddingBagCollection, CompositionalEmbeddingBagConfig, QuotientRemainder
from torchrec_qr.distributed import CompressionPlan, CompressionPlanner, parse_bytes
from torchrec_qr.distributed.plan_checks import validate_plan
from torchrec_qr.distributed.planner import default_sharders
from torchrec_qr.plan import main
from torchrec_qr.train.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
STATE_FLOATS = {"sgd": lambda d: 0, "adagrad": lambda d: d, "rowwise_adagrad": lambda d: 1}


def _tables(sizes: list[int], dim: int = 16) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=dim, feature_names=[f"f{i}"])
        for i, n in enumerate(sizes)
    ]


def _table_bytes_per_rank(result: CompressionPlan, optimizer: str, world_size: int) -> dict[int, int]:
    """Parameters and optimizer state each rank holds, from the plan's shards and the stored sub-tables
    (rows x dim x 4 bytes, plus the optimizer's floats per row); row-wise compositional tables split the
    sub-table of the quotient (their ids' blocks) and hold every other sub-table whole."""
    out = dict.fromkeys(range(world_size), 0)
    for table in result.tables:
        ps = result.plan.plan[""][table.name]  # type: ignore[index]
        compositional = isinstance(table, CompositionalEmbeddingBagConfig)
        subs = table.sub_table_configs() if compositional else [table]
        per_sub = [s.num_embeddings * (s.embedding_dim + STATE_FLOATS[optimizer](s.embedding_dim)) * 4 for s in subs]
        if ps.sharding_type == "data_parallel":
            for r in range(world_size):
                out[r] += sum(per_sub)
            continue
        d = table.embedding_dim  # the parameter the planner splits: N x D, or ceil(stored parameters / D) x D
        area = -(-table.num_parameters() // d) * d if compositional else table.num_embeddings * d
        for shard in ps.sharding_spec.shards:
            rows, cols = shard.shard_sizes
            r = shard.placement.rank()
            if ps.sharding_type in ("row_wise", "table_row_wise") and compositional:
                split = table.partition.row_split()[0]
                out[r] += sum(b if j != split else b * rows / table.num_embeddings for j, b in enumerate(per_sub))
            else:
                out[r] += sum(per_sub) * rows * cols / area
    return out


def _collisions(table: EmbeddingBagConfig) -> int:
    if not isinstance(table, CompositionalEmbeddingBagConfig):
        return 1
    return math.ceil(table.num_embeddings / max(table.sub_table_sizes()))


def _full_tables_fit(result: CompressionPlan, threshold: int) -> None:
    for table in result.tables:
        if table.num_embeddings <= threshold:
            assert not isinstance(table, CompositionalEmbeddingBagConfig), table.name


case = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 3_000_000), min_size=1, max_size=7),
        "world_size": st.sampled_from([1, 2, 4]),
        "optimizer": st.sampled_from(["sgd", "adagrad", "rowwise_adagrad"]),
        "budget_mib": st.floats(0.5, 400.0),
        "more": st.floats(1.05, 4.0),
        "threshold": st.sampled_from([0, 1000]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_random_table_sets_fit_grow_monotonically_or_raise(c: dict) -> None:
    tables = _tables(c["sizes"])
    budget = int(c["budget_mib"] * 2**20)
    kwargs = dict(optimizer=c["optimizer"], threshold=c["threshold"])
    planner = CompressionPlanner(c["world_size"], budget, **kwargs)
    try:
        result = planner.plan(tables)
    except ValueError as e:
        needed = int(re.search(r"memory_per_rank >= ([\d,]+) bytes", str(e)).group(1).replace(",", ""))
        assert needed > budget * (1 - planner.headroom)
        result, budget = CompressionPlanner(c["world_size"], needed, **kwargs).plan(tables), needed  # reachable
    usable = budget * (1 - planner.headroom)
    held = _table_bytes_per_rank(result, c["optimizer"], c["world_size"])
    for r, nbytes in held.items():
        assert nbytes <= usable, (r, nbytes, usable)
        assert result.bytes_per_rank.get(r, 0) >= nbytes * (1 - 1e-9) - 1, (r, result.bytes_per_rank, held)
    validate_plan(result.plan, CompositionalEmbeddingBagCollection(result.tables, device="meta"), c["world_size"])
    _full_tables_fit(result, c["threshold"])
    larger = CompressionPlanner(c["world_size"], int(budget * c["more"]), **kwargs).plan(tables)
    for small, big in zip(result.tables, larger.tables):
        assert _collisions(big) <= _collisions(small), (small, big)


def test_mlperf_like_tables_at_two_budgets_and_deterministic() -> None:
    """Large tables are compressed first and at 8x the budget less; the same call gives the same answer."""
    tables = _tables([40_000_000, 30_000_000, 1_500_000, 50_000, 3_000, 10], dim=128)
    tight = CompressionPlanner(8, "2GiB", batch_size=2048).plan(tables)
    again = CompressionPlanner(8, "2GiB", batch_size=2048).plan(tables)
    assert [(c.storage, c.ranks) for c in tight.choices] == [(c.storage, c.ranks) for c in again.choices]
    assert tight.plan.plan == again.plan.plan
    roomy = CompressionPlanner(8, "16GiB", batch_size=2048).plan(tables)
    storage = {c.name: c.storage for c in tight.choices}
    assert storage["t0"].startswith("qr(") and storage["t1"].startswith("qr(") and storage["t5"] == "full"
    assert sum(c.param_bytes for c in roomy.choices) > 2 * sum(c.param_bytes for c in tight.choices)
    assert all(max(r.bytes_per_rank.values()) <= r.memory_per_rank * 0.85 for r in (tight, roomy))
    assert all(c.reason for c in tight.choices)


def test_traffic_shares_protect_the_busier_table() -> None:
    """Two equal tables, one looked up 9x as often: the quieter one takes the collisions."""
    tables = _tables([1_000_000, 1_000_000])
    result = CompressionPlanner(1, "40MiB", threshold=0).plan(tables, traffic={"t0": 9.0, "t1": 1.0})
    c0, c1 = (_collisions(t) for t in result.tables)
    assert c1 > c0, result.choices
    shares = [c.traffic_share for c in result.choices]
    assert shares == pytest.approx([0.9, 0.1])


def test_mixed_radix_only_where_qr_cannot_fit() -> None:
    """QR's smallest for 1M rows stores ~2,000 rows; k=3 mixed radix ~300. A budget between the two needs it."""
    tables = _tables([1_000_000])
    result = CompressionPlanner(1, "100KiB", headroom=0.0, batch_size=1).plan(tables)
    assert result.choices[0].storage.startswith("mixed_radix[100, 100, 100]"), result.choices
    assert "QR at its fewest rows did not fit" in result.choices[0].reason
    roomier = CompressionPlanner(1, "2MiB", headroom=0.0, batch_size=1).plan(tables)
    assert roomier.choices[0].storage.startswith("qr(")
    with pytest.raises(ValueError, match=r"smallest reachable is .* memory_per_rank >= [\d,]+ bytes"):
        CompressionPlanner(1, "100KiB", headroom=0.0, batch_size=1, allow_mixed_radix=False).plan(tables)


def test_infeasible_budget_names_the_smallest_reachable() -> None:
    tables = _tables([5_000_000, 5_000_000, 100])
    with pytest.raises(
        ValueError,
        match=r"memory_per_rank=16\.0 KiB x 2 ranks cannot hold the tables even at the "
        r"largest allowed compression .* memory_per_rank >= [\d,]+ bytes",
    ):
        CompressionPlanner(2, "16KiB").plan(tables)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(world_size=0, memory_per_rank="1GiB"), ValueError, "world_size must be a positive int"),
        (dict(world_size=2, memory_per_rank="8 parsecs"), ValueError, "expected a number and a unit, e.g. 8GiB"),
        (dict(world_size=2, memory_per_rank=-5), ValueError, "must be positive"),
        (dict(world_size=2, memory_per_rank=1.5), TypeError, "an int .bytes. or a string"),
        (dict(world_size=2, memory_per_rank="1GiB", optimizer="lamb"), ValueError, "optimizer 'lamb': use one of"),
        (dict(world_size=2, memory_per_rank="1GiB", combine="concat"), ValueError, "combine 'concat'"),
        (dict(world_size=2, memory_per_rank="1GiB", headroom=1.0), ValueError, r"headroom must be in \[0, 1\)"),
        (dict(world_size=2, memory_per_rank="1GiB", collisions=[8, 2]), ValueError, "ascending distinct ints >= 2"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CompressionPlanner(**kwargs)


def test_bad_tables_and_traffic() -> None:
    planner = CompressionPlanner(2, "1GiB")
    with pytest.raises(ValueError, match="tables: give at least one EmbeddingBagConfig"):
        planner.plan([])
    with pytest.raises(ValueError, match="table names must be unique"):
        planner.plan(_tables([10]) + _tables([20]))
    with pytest.raises(ValueError, match=r"traffic: .* unknown \['t9'\], missing \['t1'\]"):
        planner.plan(_tables([10, 20]), traffic={"t0": 1.0, "t9": 2.0})
    compressed = CompositionalEmbeddingBagCollection(
        [
            CompositionalEmbeddingBagConfig(
                name="t0", num_embeddings=100, embedding_dim=8, feature_names=["f0"], partition=QuotientRemainder(4)
            )
        ],
        device="meta",
    )
    with pytest.raises(TypeError, match="table 't0' is already compositional; give the full"):
        planner.plan(compressed.embedding_bag_configs())


def test_parse_bytes() -> None:
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("1.5 MiB") == 3 * 2**19
    assert parse_bytes("10GB") == 10**10
    assert parse_bytes(4096) == 4096


def test_cli_prints_one_line_per_table_and_a_loadable_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.yaml"
    config = str(ROOT / "configs" / "synthetic_qr_mult.yaml")
    assert main(["--config", config, "--world-size", "2", "--memory-per-rank", "100MiB", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    lines = re.findall(
        r"^# (t_cat_\d+) +([\d,]+) rows +(\S+) +params +[\d.]+ \w+ +optimizer +[\d.]+ \w+ +(\w+) +"
        r"ranks \[[\d, ]+\] +\| \S",
        text,
        re.M,
    )
    assert len(lines) == 26 and any(s.startswith("qr(") for _, _, s, _ in lines), text[:3000]
    assert yaml.safe_load(text)["world_size"] == 2 and out.read_text() == text
    cfg = load_config(config, ["embeddings.kind=auto", "embeddings.memory_per_rank=100MiB"])
    validate(cfg, 2, cuda_available=False)
    assert main(["--config", config, "--world-size", "2", "--memory-per-rank", "1KiB"]) == 2
    assert "smallest reachable" in capsys.readouterr().err


def test_config_rules_for_auto() -> None:
    config = str(ROOT / "configs" / "synthetic_qr_mult.yaml")
    with pytest.raises(ConfigError, match="embeddings.memory_per_rank: embeddings.kind=auto needs a budget"):
        validate(load_config(config, ["embeddings.kind=auto"]), 2, cuda_available=False)
    with pytest.raises(ConfigError, match="embeddings.memory_per_rank: memory size 'lots'"):
        validate(load_config(config, ["embeddings.kind=auto", "embeddings.memory_per_rank=lots"]), 2, False)
    with pytest.raises(ConfigError, match="embeddings.memory_per_rank: applies to embeddings.kind=auto"):
        validate(load_config(config, ["embeddings.memory_per_rank=1GiB"]), 2, cuda_available=False)


def _dmp_forward(rank: int, world_size: int, result: CompressionPlan) -> float:
    """DMP over the bare collection with the planner's plan (module path ""), weights from an unsharded copy:
    the largest difference of the pooled outputs on this rank's batch."""
    torch.manual_seed(0)
    ref = CompositionalEmbeddingBagCollection(result.tables)
    dmp = DistributedModelParallel(
        CompositionalEmbeddingBagCollection(result.tables, device="meta"),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=result.plan,
        sharders=default_sharders(),
    )
    dmp.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()})
    kjt = batch(rank, weighted=False, tabs=result.tables)
    out, expected = dmp(kjt), ref(kjt)
    return max((out[k] - expected[k]).abs().max().item() for k in expected.keys())


def test_plan_shards_with_dmp_at_world_size_2() -> None:
    result = CompressionPlanner(2, "2MiB", threshold=100, batch_size=4).plan(_tables([200_000, 30_000, 5_000, 50]))
    kinds = {c.name: (c.storage, c.sharding_type) for c in result.choices}
    assert kinds["t0"][0].startswith("qr(") and kinds["t3"][0] == "full", kinds
    assert max(run_ranks(_dmp_forward, 2, result)) < 1e-6


def test_training_app_with_kind_auto_at_world_size_2(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks, tiny synthetic data: the run trains the tables the planner chose, on its plan."""
    sizes = [
        10,
        12,
        15,
        20,
        30,
        40,
        50,
        70,
        100,
        130,
        170,
        220,
        300,
        400,
        500,
        700,
        900,
        1200,
        1600,
        2000,
        3000,
        4000,
        5000,
        7000,
        9000,
        120000,
    ]
    args = [
        f"run.output_dir={tmp_path}",
        "run.name=auto",
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "data.synthetic.num_rows=3000",
        "data.synthetic.num_days=3",
        f"data.synthetic.cardinalities={sizes}",
        "data.global_batch_size=256",
        "data.eval_batch_size=1024",
        "model.dense_arch_layer_sizes=[32,16]",
        "model.over_arch_layer_sizes=[32,1]",
        "train.max_steps=6",
        "train.eval_max_batches=1",
        "embeddings.kind=auto",
        "embeddings.memory_per_rank=6MiB",
    ]
    planned = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrec_qr.plan",
            "--config",
            str(ROOT / "configs" / "synthetic_qr_mult.yaml"),
            "--world-size",
            "2",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert planned.returncode == 0, planned.stderr
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "torchrec_qr.train",
            "--config",
            str(ROOT / "configs" / "synthetic_qr_mult.yaml"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary_file = tmp_path / "auto" / "summary.json"
    assert summary_file.exists(), run.stderr[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["metrics"]["test"]["log_loss"])
    stored = {t["table"]: t["stored_as"] for t in summary["tables"]}
    chosen = dict(re.findall(r"^# (t_cat_\d+) +[\d,]+ rows +(\S+)", planned.stdout, re.M))
    assert stored == chosen and stored["t_cat_25"].startswith("qr(")
    plan_used = yaml.safe_load((tmp_path / "auto" / "plan.yaml").read_text())
    assert plan_used["modules"] == yaml.safe_load(planned.stdout)["modules"]
