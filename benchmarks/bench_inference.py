"""Quantized serving of a trained run: bytes per table, accuracy per dtype, scoring throughput.

    python benchmarks/bench_inference.py --run runs/<name> [--threads 1] [--batch 4096] [--rounds 5]

1. Bytes per table (FBGEMM int-N kernels, rows padded to 16 bytes) at fp32 / fp16 / int8 / int4, and int8
   with row alignment 1 (unpadded rows, which FBGEMM's CPU kernels take).
2. Test log loss and AUC of the float model (the run's checkpoint, unsharded) and of each dtype, on the
   run's test split.
3. Scoring throughput of the int8 compositional model vs an int8 plain-EBC model of the same logical tables
   (full tables, TorchRec's QuantEmbeddingBagCollection; random weights: only speed is compared), whole
   model and embedding collection alone, alternating batch by batch over the same test batches, median of
   ``--rounds``; the load average is printed before and after, since a shared machine slows runs unevenly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec_qr.data.dataloader import make_batch  # noqa: E402
from torchrec_qr.distributed.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from torchrec_qr.inference import DTYPES, quantize_inference_model  # noqa: E402
from torchrec_qr.inference.artifact import storage_report  # noqa: E402
from torchrec_qr.inference.serving import (  # noqa: E402
    InputSpec,
    float_model,
    log_loss_auc,
    run_tables,
    saved_world_size,
    score_rows,
)
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig  # noqa: E402
from torchrec_qr.train.config import load_config  # noqa: E402
from torchrec_qr.train.data import prepare_splits  # noqa: E402


def _load() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def _bytes_table(models: dict[str, torch.nn.Module], tables) -> None:
    reports = {d: {r["name"]: r["bytes"] for r in storage_report(m)} for d, m in models.items()}
    print(f"{'table':<10} {'rows':>10} {'stored as':<14}" + "".join(f"{d:>12}" for d in models) + f"{'fp32 full':>12}")
    totals = dict.fromkeys(models, 0)
    full_total = 0
    for t in tables:
        compositional = isinstance(t, CompositionalEmbeddingBagConfig)
        names = [s.name for s in t.sub_table_configs()] if compositional else [t.name]
        row = {d: sum(reports[d][n] for n in names) for d in models}
        full = 4 * t.num_embeddings * t.embedding_dim
        for d in models:
            totals[d] += row[d]
        full_total += full
        kind = "compositional" if compositional else "full"
        cells = "".join(f"{row[d]:>12,}" for d in models)
        print(f"{t.name:<10} {t.num_embeddings:>10,} {kind:<14}{cells}{full:>12,}")
    print(f"{'total':<36}" + "".join(f"{totals[d]:>12,}" for d in models) + f"{full_total:>12,}")
    print("compression vs fp32 full tables: " + ", ".join(f"{d} {full_total / totals[d]:.1f}x" for d in models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--throughput-batches", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    splits = prepare_splits(cfg, 0, 0, lambda: None)
    checkpoint = latest_checkpoint(run / "checkpoints")
    tables = run_tables(cfg, saved_world_size(checkpoint))
    keys = [f for t in tables for f in t.feature_names]
    spec = InputSpec.of(cfg, tables)

    trained = float_model(cfg, tables)
    load_checkpoint(checkpoint, trained, restore_rng=False)
    dlrm = trained.model.eval()
    models = {d: quantize_inference_model(copy.deepcopy(dlrm), DTYPES[d]).eval() for d in DTYPES}
    packed = quantize_inference_model(copy.deepcopy(dlrm), torch.int8, row_alignment=1)
    print(
        f"run {run}, {_load()}, {args.threads} thread(s)\n\n== bytes per table (rows padded to 16 bytes; "
        "int8/a1: row alignment 1, CPU kernels) =="
    )
    _bytes_table({**models, "int8/a1": packed}, tables)

    print(f"\n== test split ({len(splits.test):,} rows) ==")
    base = log_loss_auc(*score_rows(dlrm, spec, keys, [splits.test], 8192))
    print(f"{'float':<6} log loss {base[0]:.5f}  AUC {base[1]:.5f}")
    for d, m in models.items():
        ll, auc = log_loss_auc(*score_rows(m, spec, keys, [splits.test], 8192))
        print(f"{d:<6} log loss {ll:.5f} ({ll - base[0]:+.5f})  AUC {auc:.5f} ({auc - base[1]:+.5f})")

    full_cfg = dataclasses.replace(cfg, embeddings=dataclasses.replace(cfg.embeddings, kind="full"))
    plain = float_model(full_cfg, run_tables(full_cfg, 1)).model.eval()
    contenders = {"compositional int8": models["int8"], "plain EBC int8": quantize_inference_model(plain, torch.int8)}
    batches = []
    for b in range(args.throughput_batches):
        part = splits.test.slice(b * args.batch, (b + 1) * args.batch)
        batch = make_batch(part.dense, part.sparse, part.labels, keys)
        batches.append((batch.dense_features, batch.sparse_features))
    rows = sum(d.shape[0] for d, _ in batches)
    # The whole model, and its embedding collection alone (what the compositional forward adds).
    calls = {name: (lambda d, k, m=m: m(d, k)) for name, m in contenders.items()}
    calls.update(
        {
            f"{name}, collection only": (lambda d, k, m=m: m.sparse_arch.embedding_bag_collection(k))
            for name, m in contenders.items()
        }
    )
    times = {name: [0.0] * args.rounds for name in calls}
    print(
        f"\n== throughput: {len(batches)} batches of {args.batch}, {args.rounds} rounds, contenders alternating "
        f"batch by batch; before: {_load()} =="
    )
    with torch.no_grad():
        for call in calls.values():  # warm-up (TorchRec's QuantEBC caches its feature order)
            call(*batches[0])
        for r in range(args.rounds):
            for i, (dense, kjt) in enumerate(batches):
                order = list(calls.items()) if (r + i) % 2 == 0 else list(calls.items())[::-1]
                for name, call in order:
                    start = time.perf_counter()
                    call(dense, kjt)
                    times[name][r] += time.perf_counter() - start
    rate = {name: rows / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        print(f"{name:<36} {r:>12,.0f} samples/s (median of {args.rounds})")
    for suffix in ("", ", collection only"):
        ratio = rate[f"compositional int8{suffix}"] / rate[f"plain EBC int8{suffix}"]
        print(f"compositional / plain EBC{suffix}: {ratio:.2f}x")
    print(f"(measured under load on a shared machine; after: {_load()})")


if __name__ == "__main__":
    main()
