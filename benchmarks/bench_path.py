"""Forward + backward time: path-based compositional tables vs the operation-based QR ``mult`` table.

Single process, CPU, unsharded ``CompositionalEmbeddingBagCollection`` s over the same logical tables and
the same QuotientRemainder(collisions) partition (the quotient sub-table of ceil(N/c) rows; the remainder
class selects a sub-table row for ``mult``, a function for ``path``). Variants are timed round-robin, one
step each in turn, so load changes on a shared machine hit them alike; the median ms/step is reported
with the ratio to ``qr_mult``.

Variants:
  qr_mult      combine="mult", per_id (the default operation-based table)
  path_linear  combine="path", PathFunction.linear(): one D x D matrix per remainder class
  path_mlp     combine="path", PathFunction.mlp((--mlp-hidden,)): a ReLU MLP per remainder class

Example::

    python benchmarks/bench_path.py                                    # 26 x 100k, D=64, batch 4096
    python benchmarks/bench_path.py --tables 8 --rows 1000000 --collisions 60 --multi-hot 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_qr import CompositionalEmbeddingBagCollection, PathFunction, QuotientRemainder, compress

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_batches, parse_variants  # noqa: E402

VARIANTS = ("qr_mult", "path_linear", "path_mlp")


def build(
    variant: str, configs: list[EmbeddingBagConfig], collisions: int, hidden: int
) -> CompositionalEmbeddingBagCollection:
    partition = QuotientRemainder(collisions)
    if variant == "qr_mult":
        tables = compress(configs, partition, combine="mult")
    else:
        path = PathFunction.linear() if variant == "path_linear" else PathFunction.mlp((hidden,))
        tables = compress(configs, partition, combine="path", path=path)
    return CompositionalEmbeddingBagCollection(tables, validate_ids=False)


def step_ms(module: CompositionalEmbeddingBagCollection, kjt: KeyedJaggedTensor, target: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    (module(kjt).values() * target).sum().backward()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000, help="logical rows N per table")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--multi-hot", type=int, default=1, metavar="L", help="ids per feature per sample")
    parser.add_argument("--collisions", type=int, default=4, help="QR collisions c: c remainder classes")
    parser.add_argument("--mlp-hidden", type=int, default=64, help="hidden width of path_mlp's functions")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    variants = parse_variants(parser, args.variants, VARIANTS)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    configs = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=args.rows, embedding_dim=args.dim, feature_names=[f"f{i}"])
        for i in range(args.tables)
    ]
    modules = {v: build(v, configs, args.collisions, args.mlp_hidden) for v in variants}
    batches = make_batches(args.tables, args.rows, args.batch, args.multi_hot, 3, args.seed)
    target = torch.randn(args.batch, args.tables * args.dim)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, {args.tables} tables x {args.rows:,} rows, "
        f"D={args.dim}, batch={args.batch}, ids/feature={args.multi_hot}, QR collisions={args.collisions}, "
        f"forward+backward, median of {args.iters} after {args.warmup} warmup, load average {os.getloadavg()[0]:.1f}"
    )
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.iters):
        for v in variants:
            ms = step_ms(modules[v], batches[i % len(batches)], target)
            if i >= args.warmup:
                times[v].append(ms)
    header = f"{'variant':<12} | {'ms/step':>8} | {'min..max':>15} | {'vs qr_mult':>10} | {'parameters':>12}"
    print(header)
    print("-" * len(header))
    base = statistics.median(times["qr_mult"]) if "qr_mult" in times else None
    for v in variants:
        ms = statistics.median(times[v])
        ratio = f"{ms / base:.2f}x" if base else "n/a"
        params = sum(t.num_parameters() for t in modules[v].embedding_bag_configs())
        print(f"{v:<12} | {ms:8.1f} | {min(times[v]):6.1f}..{max(times[v]):7.1f} | {ratio:>10} | {params:12,}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
