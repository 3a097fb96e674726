"""Scale run: DLRM over the MLPerf DLRM v1 (Criteo Terabyte) tables, QR-compressed, trained at world size 2.

The 26 MLPerf cardinalities sum to 177.9M logical rows; at D=128 in fp32 the full tables are 91.1 GB
(84.8 GiB). Here
every table above ``--threshold`` rows becomes a QR ``mult`` compositional table with ``--collisions`` c
(quotient table ``ceil(N/c)`` rows, remainder table c rows); smaller tables stay full (QR would not shrink a
table of a few rows). The model is TorchRec's ``DLRM`` (``DLRMTrain``: BCE loss) with random batches from
``torchrec.datasets.random.RandomRecDataset``; tables are built on ``meta`` and allocated only as shards
by ``DistributedModelParallel``. Sparse tables train with fused rowwise Adagrad, the MLPs with Adagrad.

Run::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scale.py            # ~2-4 min on 2 CPU cores
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scale.py --plan planner --steps 30
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scale.py --memory-per-rank 10GiB --steps 5

``--memory-per-rank`` lets ``CompressionPlanner`` choose each table's storage and the plan for that budget
(instead of one ``--collisions`` for all), and reports its per-rank estimate next to the measured peak RSS.

Reported (rank 0 prints every rank's numbers): full vs stored table bytes, the plan's bytes per rank,
samples/s (global, over the measured steps) and the median step time, and peak RSS per rank
(``VmHWM`` from ``/proc/self/status``) after building the model, after sharding and after training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_qr import CompositionalEmbeddingBagCollection, QuotientRemainder, compress, physical_table_configs
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed.compression_planner import CompressionPlan, CompressionPlanner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_state  # noqa: E402

# MLPerf DLRM v1 (Criteo Terabyte) rows per categorical feature, cat_0..cat_25, as in TorchRec's DLRM example
# (--num_embeddings_per_feature): 177,944,275 rows in total.
MLPERF_CARDINALITIES = [
    45833188,
    36746,
    17245,
    7413,
    20243,
    3,
    7114,
    1441,
    62,
    29275261,
    1572176,
    345138,
    10,
    2209,
    11267,
    128,
    4,
    974,
    14,
    48937457,
    11316796,
    40094537,
    452104,
    12606,
    104,
    35,
]
EBC_PATH = "model.sparse_arch.embedding_bag_collection"


def memory_kib() -> dict[str, int]:
    """Current and peak resident set size of this process (``VmRSS``, ``VmHWM``), in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def full_tables(dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=dim, feature_names=[f])
        for f, n in zip(DEFAULT_CAT_NAMES, MLPERF_CARDINALITIES)
    ]


def dlrm(configs: list[EmbeddingBagConfig], args: argparse.Namespace, device: torch.device) -> DLRMTrain:
    ebc = CompositionalEmbeddingBagCollection(configs, device="meta", validate_ids=False)
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=len(DEFAULT_INT_NAMES),
            dense_arch_layer_sizes=[int(x) for x in args.dense_arch.split(",")],
            over_arch_layer_sizes=[int(x) for x in args.over_arch.split(",")],
            dense_device=device,
        )
    )


def budget_plan(args: argparse.Namespace, ws: int, local_ranks: int, device: torch.device) -> CompressionPlan:
    """Rank 0 runs the compression planner for ``--memory-per-rank`` and sends every rank its result."""
    result: list[CompressionPlan | None] = [None]
    if dist.get_rank() == 0:
        planner = CompressionPlanner(
            ws,
            args.memory_per_rank,
            optimizer="rowwise_adagrad",
            threshold=args.threshold,
            batch_size=args.batch,
            local_world_size=local_ranks,
        )
        result[0] = planner.plan(full_tables(args.dim), model_fn=lambda t: dlrm(t, args, device))
    dist.broadcast_object_list(result, src=0)
    assert result[0] is not None
    return result[0]


def table_wise_plan(
    ebc: CompositionalEmbeddingBagCollection, sharder: CompositionalEmbeddingBagCollectionSharder, world_size: int
) -> ShardingPlan:
    """Greedy table-wise plan: largest stored table first, each onto the rank holding the fewest bytes;
    tables under 1% of the stored bytes go to the rank with the fewest tables (lookups and output-dist
    traffic grow with the number of features, not with table size)."""
    stored = {
        t.name: sum(p.num_embeddings * p.embedding_dim for p in physical_table_configs([t]))
        for t in ebc.embedding_bag_configs()
    }
    small = 0.01 * sum(stored.values())
    load = [0] * world_size
    count = [0] * world_size
    rank_of: dict[str, int] = {}
    for name in sorted(stored, key=stored.__getitem__, reverse=True):
        by = count if stored[name] < small else load
        rank_of[name] = min(range(world_size), key=lambda r: (by[r], load[r]))
        load[rank_of[name]] += stored[name]
        count[rank_of[name]] += 1
    plan = construct_module_sharding_plan(
        ebc,
        per_param_sharding={n: table_wise(rank=r, compute_kernel="fused") for n, r in rank_of.items()},
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return ShardingPlan({EBC_PATH: plan})


def local_embedding_bytes(dmp: DistributedModelParallel) -> int:
    """Bytes of embedding weights this rank holds (its shards of sharded tables, replicas of the others)."""
    total = 0
    for key, value in dmp.state_dict().items():
        if "sparse_arch" not in key:
            continue
        tensors = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collisions", type=int, default=16)
    parser.add_argument(
        "--memory-per-rank",
        default=None,
        help="e.g. 10GiB: the compression planner chooses storage and plan (ignores --collisions, --plan)",
    )
    parser.add_argument("--threshold", type=int, default=20_000, help="tables with at most this many rows stay full")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2048, help="samples per rank per step")
    parser.add_argument("--ids-per-feature", type=int, default=1)
    parser.add_argument("--dense-arch", default="512,256,128", help="bottom MLP (last = --dim)")
    parser.add_argument("--over-arch", default="512,256,1", help="top MLP (last = 1)")
    parser.add_argument(
        "--plan",
        choices=("tw", "planner"),
        default="tw",
        help="tw: greedy table-wise by stored bytes; planner: TorchRec's EmbeddingShardingPlanner",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument(
        "--num-batches",
        type=int,
        default=0,
        help="distinct random batches per rank, cycled (0: one per step, no batch repeats)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ws))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    torch.manual_seed(args.seed + rank)
    device = torch.device("cpu")
    mem: dict[str, dict[str, int]] = {"start": memory_kib()}

    def say(*a: Any) -> None:
        if rank == 0:
            print(*a, flush=True)

    budget = budget_plan(args, ws, local_ranks, device) if args.memory_per_rank else None
    configs = (
        budget.tables
        if budget
        else compress(
            full_tables(args.dim), QuotientRemainder(args.collisions), combine="mult", threshold=args.threshold
        )
    )
    full_bytes = sum(MLPERF_CARDINALITIES) * args.dim * 4
    physical = physical_table_configs(configs)
    stored_rows = sum(p.num_embeddings for p in physical)
    stored_bytes = sum(p.num_embeddings * p.embedding_dim * 4 for p in physical)
    compressed = [t for t in configs if len(physical_table_configs([t])) > 1]
    say(
        f"torch {torch.__version__}, torchrec_qr at {git_state()}, world size {ws}, "
        f"threads/rank {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    say(
        f"MLPerf DLRM v1 tables: 26 tables, {sum(MLPERF_CARDINALITIES):,} logical rows, D={args.dim}: "
        f"{full_bytes / 1e9:.1f} GB full (fp32)"
    )
    chosen = (
        f"compression planner for {args.memory_per_rank} per rank"
        if budget
        else f"QR mult, collisions {args.collisions}"
    )
    say(
        f"{chosen}, threshold {args.threshold:,}: {len(compressed)} tables compressed, "
        f"{26 - len(compressed)} kept full; {stored_rows:,} stored rows = {stored_bytes / 1e9:.2f} GB "
        f"({full_bytes / stored_bytes:.1f}x smaller)"
    )
    if budget:
        say("\n".join(f"  {c.name}: {c.storage}" for c in budget.choices if c.storage != "full"))

    model = dlrm(configs, args, device)
    ebc = model.model.sparse_arch.embedding_bag_collection
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": args.lr, "eps": 1e-8}
    qr_sharder = CompositionalEmbeddingBagCollectionSharder(fused_params=fused)
    sharders = [qr_sharder, EmbeddingBagCollectionSharder(fused_params=fused)]
    mem["model on meta"] = memory_kib()

    t0 = time.perf_counter()
    if budget:
        plan = budget.plan
    elif args.plan == "tw":
        plan = table_wise_plan(ebc, qr_sharder, ws)
    else:
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=ws, local_world_size=local_ranks, compute_device="cpu"),
            batch_size=args.batch,
        )
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device, plan=plan, sharders=sharders
    )
    shard_s = time.perf_counter() - t0
    mem["sharded"] = memory_kib()
    local_bytes = local_embedding_bytes(dmp)
    placement = {t: (ps.sharding_type, ps.ranks) for t, ps in plan.plan[EBC_PATH].items()}  # type: ignore[union-attr]

    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    dense_opt = torch.optim.Adagrad(dense, lr=args.lr)
    num_batches = args.num_batches or args.warmup + args.steps
    dataset = RandomRecDataset(
        keys=list(DEFAULT_CAT_NAMES),
        batch_size=args.batch,
        hash_sizes=MLPERF_CARDINALITIES,
        ids_per_feature=args.ids_per_feature,
        num_dense=len(DEFAULT_INT_NAMES),
        manual_seed=args.seed * 1000 + rank,
        num_generated_batches=num_batches,
    )
    batches = [b.to(device) for b in itertools.islice(iter(dataset), num_batches)]

    step_ms: list[float] = []
    losses: list[float] = []
    dist.barrier()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            dist.barrier()
            measured_start = time.perf_counter()
        start = time.perf_counter()
        dense_opt.zero_grad()
        loss, _ = dmp(batches[i % len(batches)])
        loss.backward()
        dense_opt.step()
        losses.append(loss.item())
        if i >= args.warmup:
            step_ms.append((time.perf_counter() - start) * 1e3)
    dist.barrier()
    wall = time.perf_counter() - measured_start
    mem["trained"] = memory_kib()

    mine = {
        "rank": rank,
        "local_embedding_bytes": local_bytes,
        "estimate_bytes": budget.bytes_per_rank[rank] if budget else None,
        "memory_kib": mem,
        "step_ms": step_ms,
        "wall_s": wall,
        "shard_s": shard_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    everyone: list[Any] = [None] * ws
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        report(args, ws, everyone, placement, full_bytes, stored_bytes, stored_rows)
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min)")
    dist.barrier()
    dist.destroy_process_group()


def report(
    args: argparse.Namespace,
    ws: int,
    everyone: list[dict[str, Any]],
    placement: dict[str, Any],
    full_bytes: int,
    stored_bytes: int,
    stored_rows: int,
) -> None:
    wall = max(r["wall_s"] for r in everyone)
    samples = args.steps * args.batch * ws
    slowest = [max(s) for s in zip(*(r["step_ms"] for r in everyone))]
    median_ms = statistics.median(slowest)
    short = {
        "table_wise": "tw",
        "column_wise": "cw",
        "row_wise": "rw",
        "table_row_wise": "twrw",
        "table_column_wise": "twcw",
        "data_parallel": "dp",
    }
    by_rank: dict[int, list[str]] = {}
    for table, (kind, ranks) in sorted(placement.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1])):
        for r in ranks or range(ws):
            by_rank.setdefault(r, []).append(f"{table}:{short.get(kind, kind)}")
    source = "compression planner" if args.memory_per_rank else args.plan
    print(f"\nplan ({source}); sharded in {everyone[0]['shard_s']:.1f}s")
    for r in sorted(by_rank):
        print(f"  rank {r}: {len(by_rank[r])} tables: {' '.join(by_rank[r])}")
    print(f"\nglobal batch {args.batch * ws} ({args.batch}/rank), {args.warmup} warmup + {args.steps} measured steps")
    print(
        f"throughput: {samples / wall:,.0f} samples/s over the measured steps "
        f"({wall:.1f}s); median step {median_ms:.0f} ms (slowest rank) = "
        f"{args.batch * ws / median_ms * 1e3:,.0f} samples/s"
    )
    print(
        f"loss (random labels: shows only that training runs): {everyone[0]['first_loss']:.4f} (first step) -> "
        f"{everyone[0]['last_loss']:.4f} (last), rank 0"
    )
    header = (
        f"{'rank':>4} | {'emb GB held':>11} | {'RSS GB meta model':>17} | {'peak RSS GB sharded':>19} | "
        f"{'peak RSS GB trained':>19} | {'planner estimate GB':>19} | {'RSS / estimate':>14}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in everyone:
        m = r["memory_kib"]
        print(
            f"{r['rank']:>4} | {r['local_embedding_bytes'] / 1e9:11.2f} | "
            f"{m['model on meta']['VmHWM'] * 1024 / 1e9:17.2f} | "
            f"{m['sharded']['VmHWM'] * 1024 / 1e9:19.2f} | {m['trained']['VmHWM'] * 1024 / 1e9:19.2f} | "
            + (
                f"{r['estimate_bytes'] / 1e9:19.2f} | {m['trained']['VmHWM'] * 1024 / r['estimate_bytes']:14.2f}"
                if r["estimate_bytes"]
                else f"{'-':>19} | {'-':>14}"
            )
        )
    print(
        f"\ntables: full {full_bytes / 1e9:.1f} GB (fp32, {sum(MLPERF_CARDINALITIES):,} rows) vs stored "
        f"{stored_bytes / 1e9:.2f} GB ({stored_rows:,} rows): {full_bytes / stored_bytes:.1f}x smaller; "
        f"peak RSS summed over ranks "
        f"{sum(r['memory_kib']['trained']['VmHWM'] for r in everyone) * 1024 / 1e9:.2f} GB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": vars(args),
                    "world_size": ws,
                    "git": git_state(),
                    "full_table_bytes": full_bytes,
                    "stored_table_bytes": stored_bytes,
                    "stored_rows": stored_rows,
                    "samples_per_s": samples / wall,
                    "median_step_ms": median_ms,
                    "placement": placement,
                    "ranks": everyone,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
