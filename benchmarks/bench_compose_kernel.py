"""Forward and backward of one training step, split by phase: FBGEMM's ``FusedEmbeddingBagCollection`` over
the full tables, ``FusedCompositionalEmbeddingBagCollection`` with the native compose kernel, and the same
with the kernel off (FBGEMM's TBE looks up every id's sub-table rows, the reference code composes them).

    source launch/cpu_allocator.sh
    .venv/bin/python benchmarks/bench_compose_kernel.py                       # 1 id per bag, QR c=4, mult
    .venv/bin/python benchmarks/bench_compose_kernel.py --ids-per-bag 8 --combine add

Every variant sees the same batch; steps alternate between variants (noise hits all alike); the median of
``--steps`` per phase is printed with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchrec
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from torchrec_qr import FusedCompositionalEmbeddingBagCollection, QuotientRemainder, compress
from torchrec_qr.ops.build import ENV_SWITCH

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import allocator_state, git_state, make_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=13)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--ids-per-bag", type=int, default=1)
    parser.add_argument("--collisions", type=int, default=4)
    parser.add_argument("--combine", default="mult", choices=["mult", "add", "concat"])
    parser.add_argument("--composition", default="per_id", choices=["per_id", "pooled"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=args.rows, embedding_dim=args.dim, feature_names=[f"f{i}"])
        for i in range(args.tables)
    ]
    optimizer, kwargs = torchrec.optim.RowWiseAdagrad, {"lr": 0.01}
    compressed = compress(
        tables, QuotientRemainder(args.collisions), combine=args.combine, composition=args.composition
    )
    models = {"FusedEBC": FusedEmbeddingBagCollection(tables, optimizer_type=optimizer, optimizer_kwargs=kwargs)}
    for name, switch in (("kernel", "1"), ("no kernel", "0")):
        os.environ[ENV_SWITCH] = switch
        models[name] = FusedCompositionalEmbeddingBagCollection(compressed, optimizer, kwargs, validate_ids=False)
    (kjt,) = make_batches(args.tables, args.rows, args.batch, args.ids_per_bag, 1, seed=0)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in models}
    for step in range(args.steps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            loss = model(kjt).values().sum()
            mid = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
            if step >= 2:
                times[name][0].append((mid - start) * 1e3)
                times[name][1].append((end - mid) * 1e3)
    print(
        f"{git_state()}, threads {args.threads}, {allocator_state()}, load average {os.getloadavg()[0]:.1f}; "
        f"{args.tables} tables x {args.rows:,} x {args.dim}, batch {args.batch}, {args.ids_per_bag} id(s) per bag, "
        f"QR c={args.collisions} {args.combine} ({args.composition}), fused row-wise Adagrad"
    )
    base = sum(statistics.median(t) for t in times["FusedEBC"])
    for name, (fwd, bwd) in times.items():
        f, b = statistics.median(fwd), statistics.median(bwd)
        print(f"{name:>10}: forward {f:7.2f} ms  backward {b:7.2f} ms  step {f + b:7.2f} ms  {(f + b) / base:5.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
