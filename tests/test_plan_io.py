"""YAML sharding plans: round trip, compact entries, rejections that name what is wrong, example plans, and
at world size 2 a loaded plan applied with DMP giving the unsharded module's outputs (plus the planner's
collective plan, in the same processes to keep the suite short)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from dist_harness import run_ranks
from sharding_cases import Wrapper, batch, reference, tables
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan
from torchrec.distributed.types import BoundsCheckMode, DataType, ShardingEnv

from torchrec_qr import CompositionalEmbeddingBagCollection
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.plan_io import load_plan_yaml, plan_from_yaml_dict, plan_to_yaml_dict, save_plan_yaml
from torchrec_qr.distributed.planner import plan_model, propose_plan
from torchrec_qr.plan import num_embeddings
from torchrec_qr.train.config import load_config
from torchrec_qr.train.model import build_model, table_configs

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def model() -> Wrapper:
    return Wrapper(CompositionalEmbeddingBagCollection(tables(), device="meta"))


def stored_rows(name: str) -> int:
    """Rows of the parameter the sharder shows the planner for a compositional table."""
    return CompositionalEmbeddingBagCollectionSharder().shardable_parameters(model().ebc)[name].shape[0]


# Every sharding type, compact and explicit entries; t_concat's column boundary is its sub-table boundary.
MIXED = {
    "world_size": WORLD,
    "modules": {
        "ebc": {
            "t_mult": {"sharding_type": "row_wise"},
            "t_plain": {"sharding_type": "table_wise", "ranks": [1]},
            "t_concat": {
                "sharding_type": "column_wise",
                "shards": [
                    {"rank": 1, "offsets": [0, 0], "sizes": [stored_rows("t_concat"), 4]},
                    {"rank": 0, "offsets": [0, 4], "sizes": [stored_rows("t_concat"), 4]},
                ],
            },
            "t_add": {"sharding_type": "table_column_wise", "ranks": [0, 1]},
            "t_mult3": {"sharding_type": "data_parallel"},
            "*": {"sharding_type": "column_wise", "ranks": [1, 0]},
        }
    },
}


def test_round_trip(tmp_path: Path) -> None:
    """save -> load gives equal ParameterShardings, for a planner's plan and optional fields."""
    constraints = {
        "t_mult": ["row_wise"],
        "t_plain": ["table_wise"],
        "t_concat": ["column_wise"],
        "t_add": ["table_column_wise"],
        "t_mult3": ["data_parallel"],
        "t_pooled": ["column_wise"],
    }
    plan = propose_plan(
        model(), WORLD, constraints={n: ParameterConstraints(sharding_types=t) for n, t in constraints.items()}
    ).plan
    ebc_plan = plan.plan["ebc"]
    ebc_plan["t_plain"] = replace(
        ebc_plan["t_plain"],
        stochastic_rounding=False,
        output_dtype=DataType.FP16,
        bounds_check_mode=BoundsCheckMode.FATAL,
    )
    save_plan_yaml(plan, tmp_path / "plan.yaml", world_size=WORLD)
    text = (tmp_path / "plan.yaml").read_text()
    assert "- {rank: 0, offsets: [0, 0], sizes: [25, 8]}" in text  # one shard per line; t_mult splits its 50 ids
    loaded = load_plan_yaml(tmp_path / "plan.yaml", model(), WORLD)
    assert loaded.plan == plan.plan
    assert {n: ps.sharding_type for n, ps in loaded.plan["ebc"].items()} == {n: t[0] for n, t in constraints.items()}


def test_compact_entries_expand_like_torchrec_helpers() -> None:
    plan = plan_from_yaml_dict(MIXED, model(), WORLD).plan["ebc"]
    sharder = CompositionalEmbeddingBagCollectionSharder()
    expected = construct_module_sharding_plan(
        model().ebc,
        {t.name: column_wise(ranks=[1, 0], compute_kernel="fused") for t in tables()},
        sharder=sharder,
        local_size=WORLD,
        world_size=WORLD,
        device_type="cpu",
    )
    assert plan["t_pooled"] == expected["t_pooled"]  # the "*" entry
    assert plan["t_plain"].ranks == [1] and plan["t_plain"].compute_kernel == "fused"
    assert plan["t_mult3"].ranks == [0, 1] and plan["t_mult3"].compute_kernel == "dense"
    rows = [(s.shard_offsets[0], s.shard_sizes[0]) for s in plan["t_mult"].sharding_spec.shards]
    assert rows == [(0, 25), (25, 25)]  # row_wise of a compositional table splits its 50 ids
    round_robin = plan_from_yaml_dict(
        {"modules": {"ebc": {"*": {"sharding_type": "table_wise", "ranks": [1, 0]}}}}, model(), WORLD
    )
    assert [ps.ranks for ps in round_robin.plan["ebc"].values()] == [[1], [0], [1], [0], [1], [0]]


def _mutated(path: list, value) -> dict:
    data = copy.deepcopy(MIXED)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


T = ["modules", "ebc"]
CONCAT_SHARDS = MIXED["modules"]["ebc"]["t_concat"]["shards"]


@pytest.mark.parametrize(
    "path,value,message",
    [
        (["modules", "model.ebc"], {"*": {"sharding_type": "data_parallel"}}, "unknown module path 'model.ebc'"),
        (T + ["t_nope"], {"sharding_type": "data_parallel"}, "module 'ebc': unknown table 't_nope'"),
        (T + ["*"], KeyError, "module 'ebc': table 't_pooled' is missing from the plan"),
        (T + ["t_plain", "ranks"], [2], "table 't_plain': rank 2 does not exist at world size 2"),
        (T + ["t_plain", "ranks"], [0, 1], "table 't_plain': table_wise needs ranks: [<rank>]"),
        (T + ["t_concat", "shards", 0, "rank"], 5, "table 't_concat': rank 5 does not exist at world size 2"),
        (T + ["t_concat", "shards", 1, "sizes", 1], 3, "table 't_concat': shards cover 42 of the 48 cells"),
        (T + ["t_concat", "shards", 1, "offsets", 1], 0, "table 't_concat': Shards ShardMetadata(shard_offsets=[0, 0]"),
        (T + ["t_concat", "shards", 1, "sizes", 0], 5, "table 't_concat': column shard 1 must span all 6 rows"),
        (
            T + ["t_concat", "shards"],
            [{**CONCAT_SHARDS[0], "sizes": [6, 2]}, {**CONCAT_SHARDS[1], "offsets": [0, 2], "sizes": [6, 6]}],
            "table 't_concat': shard 0 holds 2 columns of sub-table 0; FBGEMM's fused kernels need multiples of 4",
        ),
        (T + ["t_concat", "shards", 0, "offsets"], [0, 0, 0], "table 't_concat': shard 0 offsets must have 2 entries"),
        (
            T + ["t_concat", "compute_kernel"],
            "turbo",
            "table 't_concat': compute kernel 'turbo' cannot run column_wise",
        ),
        (
            T + ["t_mult3", "compute_kernel"],
            "fused",
            "table 't_mult3': compute kernel 'fused' cannot run data_parallel",
        ),
        (T + ["t_mult3", "sharding_type"], "diagonal", "table 't_mult3': unknown sharding_type 'diagonal'"),
        (
            T + ["t_mult3", "shards"],
            [],
            "table 't_mult3': data_parallel tables are replicated whole and have no shards",
        ),
        (T + ["t_plain", "sharding"], "tw", "table 't_plain': unknown keys ['sharding']"),
        (T + ["t_concat", "sharding_type"], "row_wise", "'t_concat': row_wise needs one shard per rank, in rank order"),
        (
            T + ["t_mult"],
            {
                "sharding_type": "row_wise",
                "shards": [
                    {"rank": 0, "offsets": [0, 0], "sizes": [25, 4]},
                    {"rank": 1, "offsets": [25, 0], "sizes": [25, 4]},
                ],
            },
            "table 't_mult': row shard 0 must span all 8 columns",
        ),
        (T + ["t_pooled"], {"sharding_type": "row_wise"}, "table 't_pooled': composition='pooled' mult"),
        (
            T + ["t_mult"],
            {
                "sharding_type": "row_wise",
                "shards": [  # the stored rows, not the 50 ids
                    {"rank": 0, "offsets": [0, 0], "sizes": [7, 8]},
                    {"rank": 1, "offsets": [7, 0], "sizes": [7, 8]},
                ],
            },
            "table 't_mult': shards cover 112 of the 400 cells of the 50 x 8 table (rows are its ids)",
        ),
        (
            T + ["t_mult"],
            {
                "sharding_type": "row_wise",
                "shards": [  # uneven: TorchRec would route ids 25 a rank
                    {"rank": 0, "offsets": [0, 0], "sizes": [20, 8]},
                    {"rank": 1, "offsets": [20, 0], "sizes": [30, 8]},
                ],
            },
            "table 't_mult': row shards of sizes [20, 30]; TorchRec routes ids to row shards in equal blocks of "
            "ceil(50 / 2) = 25, so only sizes [25, 25] are served as planned",
        ),
        (
            T + ["t_plain"],
            {"sharding_type": "table_row_wise", "host": 3},
            "table 't_plain': host 3 does not exist: 2 ranks, 2 per host, hosts are 0..0",
        ),
        (["world_size"], 4, "the plan was written for world size 4, not 2"),
    ],
)
def test_rejections_name_the_problem(path: list, value, message: str) -> None:
    with pytest.raises(ValueError) as e:
        plan_from_yaml_dict(_mutated(path, value), model(), WORLD)
    assert message in str(e.value)


class TableWiseOnly(CompositionalEmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return ["table_wise"]


def test_sharding_type_the_sharder_does_not_offer() -> None:
    with pytest.raises(ValueError, match="table 't_mult': TableWiseOnly cannot shard it row_wise on cpu"):
        plan_from_yaml_dict(MIXED, model(), WORLD, sharders=[TableWiseOnly()])


def test_unknown_table_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_mutated(T + ["t_typo"], {"sharding_type": "data_parallel"})))
    with pytest.raises(ValueError, match=f"^{path}: module 'ebc': unknown table 't_typo'"):
        load_plan_yaml(path, model(), WORLD)


@pytest.mark.parametrize(
    "plan_file,configs",
    [
        ("table_wise_ws2.yaml", ["synthetic_full", "synthetic_qr_mult", "synthetic_crt"]),
        ("column_wise_ws2.yaml", ["synthetic_hash", "synthetic_qr_concat", "synthetic_crt"]),
        ("mixed_ws2.yaml", ["synthetic_full", "synthetic_qr_add", "synthetic_mixed_radix"]),
    ],
)
def test_example_plans_fit_the_synthetic_configs(plan_file: str, configs: list[str]) -> None:
    for name in configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        dlrm = build_model(cfg, table_configs(cfg, num_embeddings(cfg)), torch.device("meta"))
        plan = load_plan_yaml(ROOT / "configs" / "plans" / plan_file, dlrm, WORLD)
        assert len(plan.plan["model.sparse_arch.embedding_bag_collection"]) == 26
        assert plan_to_yaml_dict(plan, WORLD)["world_size"] == WORLD


def _at_world_size_2(rank: int, world_size: int, path: str) -> dict:
    """The planner's collective plan (rank 0 plans, all receive it), then DMP with the YAML plan: each rank's
    forward against the unsharded module on the same batch."""
    row_wise = {"t_mult": ParameterConstraints(sharding_types=["row_wise"])}
    collective = plan_model(model(), world_size, constraints=row_wise, pg=dist.group.WORLD)
    ref = reference(weighted=False)
    plan = load_plan_yaml(path, model(), world_size)
    dmp = DistributedModelParallel(
        model(),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[CompositionalEmbeddingBagCollectionSharder()],
    )
    dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
    kjt = batch(11 + rank, weighted=False)
    out = dmp(kjt)
    return {
        "max_diff": (out - Wrapper(ref)(kjt)).abs().max().item(),
        "width": out.shape[1],
        "collective": plan_to_yaml_dict(collective, world_size),
    }


def test_world_size_2_collective_plan_and_yaml_plan_with_dmp(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    save_plan_yaml(plan_from_yaml_dict(MIXED, model(), WORLD), path, WORLD)
    results = run_ranks(_at_world_size_2, WORLD, str(path))
    for rank, result in enumerate(results):
        assert result["width"] == sum(t.embedding_dim * len(t.feature_names) for t in tables())
        assert result["max_diff"] < 1e-6, f"rank {rank}: {result['max_diff']}"
    assert results[0]["collective"] == results[1]["collective"]
    assert results[0]["collective"]["modules"]["ebc"]["t_mult"]["shards"][1] == {
        "rank": 1,
        "offsets": [25, 0],
        "sizes": [25, 8],
    }
