"""``python -m torchrec_qr.predict --model DIR --data file.tsv [--out preds.tsv]``.

Scores Criteo-format lines (label, 13 integers, 26 hex ids; or without the label, as in Criteo's test files)
with an exported model, in batches, and writes one click probability per input line, in order: to ``--out``
(written to a temporary file, renamed only when every line was scored) or, without it, to stdout once every
line was scored. Prints the log loss and AUC when the lines have labels. A malformed line stops scoring with
its file:line; nothing is written.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from tqdm import tqdm

from torchrec_qr.data.criteo import iter_criteo_tsv
from torchrec_qr.inference.serving import InputSpec, load_serving_model, log_loss_auc, score_rows

EXIT_ERROR = 2


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_qr.predict", description="Score Criteo TSV lines with an exported model."
    )
    parser.add_argument("--model", required=True, help="export directory (python -m torchrec_qr.export)")
    parser.add_argument("--data", required=True, help="Criteo TSV file (optionally .gz)")
    parser.add_argument("--out", help="file to write, one probability per line (must not exist; default stdout)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def has_labels(path: Path) -> bool:
    """Whether the file's lines start with a label: its first line does not have the label-less field count."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        first = f.readline()
    return first.count(b"\t") != INT_FEATURE_COUNT + CAT_FEATURE_COUNT - 1


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
        labeled = has_labels(Path(args.data))
        chunks = iter_criteo_tsv(
            args.data, max_ind_range=spec.max_ind_range, cardinalities=spec.cardinalities, labeled=labeled
        )
        with tqdm(unit=" lines", disable=args.no_progress, file=sys.stderr) as bar:
            probs, labels = score_rows(model, spec, manifest["feature_names"], chunks, args.batch_size, bar.update)
        if out is not None:
            _write_atomic(out, probs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    report = sys.stdout if out is not None else sys.stderr
    if out is None:
        sys.stdout.writelines(f"{p:.6f}\n" for p in probs)
    scored = f"Scored {len(probs):,} lines of {args.data} with {args.model} ({manifest['dtype']})"
    if len(probs) and labeled:
        log_loss, auc = log_loss_auc(probs, labels)
        scored += f": log loss {log_loss:.5f}  AUC {auc:.5f}"
    elif len(probs):
        scored += " (no labels: no log loss or AUC)"
    print(scored + (f"  -> {out}" if out else ""), file=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
