"""``python -m torchrec_qr.predict --model DIR --data file.tsv [--out preds.tsv]``.

Scores Criteo-format lines (label, 13 integers, 26 hex ids) with an exported model, in batches, and writes
one click probability per input line, in order: to ``--out`` (written to a temporary file, renamed only
when every line was scored) or, without it, to stdout once every line was scored. Prints the log loss and
AUC against the lines' labels. A malformed line stops scoring with its file:line; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from torchrec_qr.data.criteo import iter_criteo_tsv
from torchrec_qr.data.dataloader import make_batch
from torchrec_qr.inference.serving import InputSpec, load_serving_model

EXIT_ERROR = 2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torchrec_qr.predict", description=__doc__.splitlines()[2])
    parser.add_argument("--model", required=True, help="export directory (python -m torchrec_qr.export)")
    parser.add_argument("--data", required=True, help="Criteo TSV file (optionally .gz)")
    parser.add_argument("--out", help="file to write, one probability per line (must not exist; default stdout)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def score(model: torch.nn.Module, spec: InputSpec, keys: list[str], data: Path, batch_size: int,
          progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of every line of ``data``, in order."""
    probs, labels = [], []
    with torch.no_grad(), tqdm(unit=" lines", disable=not progress, file=sys.stderr) as bar:
        for chunk in iter_criteo_tsv(data, max_ind_range=spec.max_ind_range, cardinalities=spec.cardinalities):
            for start in range(0, len(chunk), batch_size):
                part = chunk.slice(start, start + batch_size)
                batch = make_batch(part.dense, part.sparse, part.labels, keys)
                logits = model(batch.dense_features, spec.transform(batch.sparse_features))
                probs.append(torch.sigmoid(logits.reshape(-1)).double().numpy())
                labels.append(part.labels)
                bar.update(len(part))
    if not probs:
        return np.zeros(0), np.zeros(0, dtype=np.float32)
    return np.concatenate(probs), np.concatenate(labels)


def metrics(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Log loss and AUC (nan when the labels hold one class only)."""
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    log_loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    if labels.min() == labels.max():
        return log_loss, math.nan
    return log_loss, float(binary_auroc(torch.from_numpy(probs), torch.from_numpy(labels).long()))


def _write_atomic(path: Path, probs: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(f"{p:.6f}\n" for p in probs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out) if args.out else None
    try:
        if out is not None and out.exists():
            raise FileExistsError(f"{out} exists: choose another --out, or remove it first")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        if not Path(args.data).is_file():
            raise FileNotFoundError(f"{args.data}: no such file")
        model, manifest = load_serving_model(args.model)
        spec = InputSpec(**manifest["input"])
        probs, labels = score(model, spec, manifest["feature_names"], Path(args.data), args.batch_size,
                              not args.no_progress)
        if out is not None:
            _write_atomic(out, probs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    report = sys.stdout if out is not None else sys.stderr
    if out is None:
        sys.stdout.writelines(f"{p:.6f}\n" for p in probs)
    if len(probs):
        log_loss, auc = metrics(probs, labels)
        print(f"Scored {len(probs):,} lines of {args.data} with {args.model} ({manifest['dtype']}): "
              f"log loss {log_loss:.5f}  AUC {auc:.5f}" + (f"  -> {out}" if out else ""), file=report)
    else:
        print(f"{args.data}: no lines to score", file=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
