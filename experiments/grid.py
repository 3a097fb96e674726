"""The paper's comparison (Shi et al., KDD 2020): loss against embedding parameters, per storage method.

``python experiments/grid.py [--quick] [--seeds N] [--data synthetic|criteo --criteo-dir D] [--out DIR]``

Every grid point is one real run of the training application (``python -m torchrec_qr.train``, or
``torchrun --standalone --nproc_per_node N -m torchrec_qr.train`` with ``--nproc N > 1``), whose
``summary.json`` supplies the test metrics, memory and throughput. Runs are named after their setting and
seed under ``--runs-dir/<grid>``; a run whose summary already exists is reused, so an interrupted sweep
continues where it stopped. Writes ``results_<grid>.csv`` (one row per run), ``results_<grid>.md``
(mean ± std per setting, QR against hashing at equal collisions) and ``pareto_<grid>.png`` to ``--out``.

Research scaffolding, not part of the library: ``settings.py`` (the grid), ``runs.py`` (runs and CSV),
``report.py`` (statistics, markdown, plot).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root makes `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.report import plot_pareto, references, write_markdown  # noqa: E402
from experiments.runs import read_csv, run_setting, write_csv  # noqa: E402
from experiments.settings import expand_grid  # noqa: E402

__all__ = ["CRITEO_CONFIG", "SYNTHETIC_CONFIG", "main"]

SYNTHETIC_CONFIG = "configs/synthetic_full.yaml"
CRITEO_CONFIG = "configs/criteo_kaggle_dlrm_full.yaml"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small grid (one seed, minutes)")
    p.add_argument("--seeds", type=int, help="seeds per setting (default: 1 quick, 3 otherwise)")
    p.add_argument("--data", choices=("synthetic", "criteo"), default="synthetic")
    p.add_argument("--criteo-dir", help="Criteo Kaggle directory (train.txt or day files); needs --data criteo")
    p.add_argument("--config", help=f"base training config (default {SYNTHETIC_CONFIG} / {CRITEO_CONFIG})")
    p.add_argument("--out", default="docs/results", help="where the CSV, markdown and PNG go")
    p.add_argument("--runs-dir", default="runs/experiments", help="run directories (summaries are reused)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run; > 1 launches torchrun (default 1)")
    p.add_argument("--max-card", type=int, help="largest synthetic table (default 10k quick, 20k otherwise)")
    p.add_argument(
        "--only",
        type=lambda v: v.split(","),
        metavar="S1,S2",
        help="run only these setting labels, comma-separated (e.g. full,hash-c4-t200); the CSV keeps "
        "its rows of the other settings",
    )
    p.add_argument("--report-only", action="store_true", help="redraw outputs from the existing CSV")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra training-app overrides for every run")
    args = p.parse_args(argv)
    if args.data == "criteo" and not args.criteo_dir:
        p.error("--data criteo needs --criteo-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    grid = expand_grid(args.quick, args.seeds, args.data, max_card=args.max_card)
    config = args.config or (CRITEO_CONFIG if args.data == "criteo" else SYNTHETIC_CONFIG)
    extra = list(args.overrides)
    if args.data == "criteo":
        extra.append(f"data.criteo_path={Path(args.criteo_dir).resolve()}")
    name = grid.name if args.data == "synthetic" else f"{grid.name}-criteo"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"results_{name}.csv"
    settings = [s for s in grid.settings if not args.only or s.label in args.only]
    if args.report_only:
        records = read_csv(csv_path)
    else:
        print(
            f"grid {name}: {len(settings)} settings x {len(grid.seeds)} seeds, base config {config}, "
            f"{'torchrun x ' + str(args.nproc) if args.nproc > 1 else 'one process'} per run",
            flush=True,
        )
        kept = [r for r in read_csv(csv_path) if r.setting not in args.only] if args.only and csv_path.exists() else []
        records, failed, start = list(kept), [], time.perf_counter()
        for seed in grid.seeds:  # seed-major: a partial sweep still covers every setting
            for s in settings:
                rec = run_setting(s, seed, grid, config, Path(args.runs_dir), args.nproc, extra)
                if rec is None:
                    failed.append(f"{s.label}-s{seed}")
                    continue
                records.append(rec)
                print(
                    f"  {s.label:<22} seed {seed}: test log loss {rec.test_log_loss:.5f}, "
                    f"{rec.params:,} params, {rec.samples_per_s:,.0f} samples/s",
                    flush=True,
                )
                write_csv(records, csv_path)
        print(
            f"grid {name}: {len(records) - len(kept)} runs in {time.perf_counter() - start:.0f} s"
            + (f"; failed: {', '.join(failed)}" if failed else ""),
            flush=True,
        )
    if not records:
        print("no finished runs", file=sys.stderr)
        return 1
    write_csv(records, csv_path)
    n_seeds = len({r.seed for r in records})
    desc = f"{args.data} data, {n_seeds} seed(s); base config {config}; common overrides: " + " ".join(
        f"`{o}`" for o in (*grid.common, *extra)
    )
    write_markdown(records, out / f"results_{name}.md", f"Results: {name} grid", [desc])
    refs = references(records) if args.data == "synthetic" else {}
    plot_pareto(
        records,
        out / f"pareto_{name}.png",
        f"{name} grid ({args.data}): test log loss vs embedding parameters, {n_seeds} seed(s)",
        refs,
    )
    print(f"wrote {csv_path}, {out / f'results_{name}.md'}, {out / f'pareto_{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
