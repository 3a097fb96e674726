"""Training-step time and parameter memory: CompositionalEmbeddingBagCollection vs TorchRec's plain EBC.

Single process, CPU. For each table layout (tables x rows) every variant runs forward + backward + an SGD
step on the same batches, side by side, with warmup; the median ms/step is reported.

Variants:
  plain  torchrec EmbeddingBagCollection (nn.EmbeddingBag), torch.optim.SGD on its parameters
  fused  torchrec FusedEmbeddingBagCollection (FBGEMM TBE, SGD fused into the backward: sparse update)
  qr     CompositionalEmbeddingBagCollection, QuotientRemainder(collisions), combine=mult, per_id,
         torch.optim.SGD on its parameters
  qr_fused  FusedCompositionalEmbeddingBagCollection, the same tables, SGD fused into the TBE backward: the
         variant to compare with ``fused`` (column "vs fused")

A variant whose parameters plus dense gradients would exceed --mem-limit-gb is skipped and reported so.

Example::

    python benchmarks/bench_module.py                       # 26x100k, 26x1M, 2x10M; batch 4096; 1 id/feature
    python benchmarks/bench_module.py --multi-hot 8 --layouts 26x100000
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from torchrec_qr import (
    CompositionalEmbeddingBagCollection,
    FusedCompositionalEmbeddingBagCollection,
    QuotientRemainder,
    compress,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import allocator_state, make_batches, parse_variants  # noqa: E402

VARIANTS = ("plain", "fused", "qr", "qr_fused")


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        tables, rows = item.lower().split("x")
        out.append((int(tables), int(float(rows))))
    return out


def param_bytes(module: torch.nn.Module) -> int:
    # state_dict: FusedEmbeddingBagCollection's weights are not all nn.Parameters.
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def build(variant: str, configs: list[EmbeddingBagConfig], collisions: int, lr: float):
    if variant == "plain":
        module = EmbeddingBagCollection(configs)
        return module, torch.optim.SGD(module.parameters(), lr=lr)
    if variant == "fused":
        module = FusedEmbeddingBagCollection(
            configs, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": lr}, device=torch.device("cpu")
        )
        return module, None
    tables = compress(configs, QuotientRemainder(collisions), combine="mult")
    if variant == "qr_fused":
        module = FusedCompositionalEmbeddingBagCollection(
            tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": lr}, validate_ids=False
        )
        return module, None
    module = CompositionalEmbeddingBagCollection(tables)
    return module, torch.optim.SGD(module.parameters(), lr=lr)


def estimated_gb(variant: str, num_tables: int, rows: int, dim: int, collisions: int) -> float:
    """Parameters plus dense gradients (none for fused, whose update is sparse), in GB."""
    if variant.startswith("qr"):
        per_table = (-(-rows // collisions) + collisions) * dim * 4
        return (1 if variant == "qr_fused" else 2) * num_tables * per_table / 1e9
    full = num_tables * rows * dim * 4
    return (1 if variant == "fused" else 2) * full / 1e9


def _ratio(ms: float, base: float | None) -> str:
    if not base:
        return "n/a"
    return f"{ms / base:.2f}x" if ms >= 0.1 * base else f"{ms / base:.3f}x"


def time_steps(module, opt, batches, warmup: int, iters: int, target: torch.Tensor) -> list[float]:
    times = []
    for i in range(warmup + iters):
        kjt = batches[i % len(batches)]
        start = time.perf_counter()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        out = module(kjt).values()
        (out * target).sum().backward()
        if opt is not None:
            opt.step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layouts",
        default="26x100000,26x1000000,2x10000000",
        help="comma-separated TABLESxROWS table layouts (default: %(default)s)",
    )
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--multi-hot", type=int, default=1, metavar="L", help="ids per feature per sample")
    parser.add_argument("--collisions", type=int, default=4, help="QR collisions c (quotient table N/c rows)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--mem-limit-gb", type=float, default=14.0, help="skip a variant whose parameters + dense gradients exceed this"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variants = parse_variants(parser, args.variants, VARIANTS)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, dim={args.dim}, "
        f"ids/feature={args.multi_hot}, QR collisions={args.collisions} (mult, per_id), SGD lr={args.lr}, "
        f"warmup={args.warmup}, median of {args.iters} steps, {allocator_state()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'layout':>13} | {'variant':<8} | {'ms/step':>9} | {'min..max':>17} | {'vs plain':>8} | "
        f"{'vs fused':>8} | {'param MB':>9} | {'compression':>11}"
    )
    print(header)
    print("-" * len(header))
    for num_tables, rows in parse_layouts(args.layouts):
        configs = [
            EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=args.dim, feature_names=[f"f{i}"])
            for i in range(num_tables)
        ]
        batches = make_batches(num_tables, rows, args.batch, args.multi_hot, 3, args.seed)
        target = torch.randn(args.batch, num_tables * args.dim)
        full_bytes = num_tables * rows * args.dim * 4
        layout = f"{num_tables}x{rows:,}".replace(",", "_")
        baseline: dict[str, float] = {}
        for variant in variants:
            need = estimated_gb(variant, num_tables, rows, args.dim, args.collisions)
            if need > args.mem_limit_gb:
                limit = f"--mem-limit-gb {args.mem_limit_gb:g}"
                print(f"{layout:>13} | {variant:<8} | skipped: needs ~{need:.1f} GB > {limit}")
                continue
            module, opt = build(variant, configs, args.collisions, args.lr)
            times = time_steps(module, opt, batches, args.warmup, args.iters, target)
            ms = statistics.median(times)
            if variant in ("plain", "fused"):
                baseline[variant] = ms
            nbytes = param_bytes(module)
            vs_plain, vs_fused = (_ratio(ms, baseline.get(b)) for b in ("plain", "fused"))
            print(
                f"{layout:>13} | {variant:<8} | {ms:9.1f} | {min(times):7.1f}..{max(times):8.1f} | {vs_plain:>8} | "
                f"{vs_fused:>8} | {nbytes / 2**20:9.1f} | {full_bytes / nbytes:10.1f}x",
                flush=True,
            )
            del module, opt
            gc.collect()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
