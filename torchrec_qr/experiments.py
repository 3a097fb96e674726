"""The paper's comparison (Shi et al., KDD 2020): loss against embedding parameters, per storage method.

``python -m torchrec_qr.experiments [--quick] [--seeds N] [--data synthetic|criteo --criteo-dir D] [--out DIR]``

Every grid point is one real run of the training application (``python -m torchrec_qr.train``, or
``torchrun --standalone --nproc_per_node N -m torchrec_qr.train`` with ``--nproc N > 1``), whose
``summary.json`` supplies the test metrics, memory and throughput. Runs are named after their setting and
seed under ``--runs-dir/<grid>``; a run whose summary already exists is reused, so an interrupted sweep
continues where it stopped. Writes ``results_<grid>.csv`` (one row per run), ``results_<grid>.md``
(mean ± std per setting, QR against hashing at equal collisions) and ``pareto_<grid>.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torchrec_qr.train.config import EmbeddingsConfig

__all__ = [
    "Aggregate",
    "Grid",
    "RunRecord",
    "Setting",
    "aggregate",
    "expand_grid",
    "main",
    "markdown_table",
    "comparison_table",
    "plot_pareto",
    "read_csv",
    "record_from_summary",
    "run_setting",
    "welch_z",
    "write_csv",
    "write_markdown",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = "configs/synthetic_full.yaml"
CRITEO_CONFIG = "configs/criteo_kaggle_dlrm_full.yaml"
BYTES_PER_FLOAT = 4
# Plot order and labels; "path" appears only when the training app accepts embeddings.combine=path.
# Frequency-aware QR runs are their own methods, "qr-mult-hot<K>" and "qr-add-hot512", plotted after these.
METHODS = ("full", "hash", "qr-mult", "qr-add", "qr-concat", "qr-path", "mixed-radix-3", "crt-2")
HOT_ROWS = (128, 512)  # hot ids kept per table in the default grid's frequency-aware settings


@dataclass(frozen=True)
class Setting:
    """One grid point: a storage method at ``collisions`` (None: not a QR/hash knob) and ``threshold``;
    ``hot_rows`` K > 0 keeps each compressed table's K most frequent training ids in rows of their own."""

    method: str
    collisions: int | None = None
    threshold: int = 200
    hot_rows: int = 0

    @property
    def label(self) -> str:
        parts = [self.method] + ([f"c{self.collisions}"] if self.collisions is not None else [])
        if self.hot_rows:
            parts.append(f"hot{self.hot_rows}")
        if self.method != "full":
            parts.append(f"t{self.threshold}")
        return "-".join(parts)

    @property
    def family(self) -> str:
        """The method as tables and plots group it: ``qr-mult-hot512`` for frequency-aware QR-mult."""
        return f"{self.method}-hot{self.hot_rows}" if self.hot_rows else self.method

    def overrides(self) -> list[str]:
        """``key=value`` overrides of the training app's embeddings section."""
        if self.method == "full":
            return ["embeddings.kind=full"]
        t = f"embeddings.threshold={self.threshold}"
        if self.method == "hash":
            return ["embeddings.kind=hash", f"embeddings.collisions={self.collisions}", t]
        if self.method.startswith("qr-"):
            op = self.method[3:]
            path = ["embeddings.path.kind=linear", "embeddings.path.bias=false"] if op == "path" else []
            hot = [f"embeddings.hot_rows={self.hot_rows}"] if self.hot_rows else []
            return ["embeddings.kind=compositional", "embeddings.scheme=qr", f"embeddings.collisions={self.collisions}",
                    f"embeddings.combine={op}", t, *path, *hot]
        if self.method == "mixed-radix-3":
            return ["embeddings.kind=compositional", "embeddings.scheme=mixed_radix", "embeddings.num_partitions=3",
                    "embeddings.combine=mult", t]
        if self.method == "crt-2":
            return ["embeddings.kind=compositional", "embeddings.scheme=chinese_remainder",
                    "embeddings.num_partitions=2", "embeddings.combine=mult", t]
        raise ValueError(f"unknown method {self.method!r}")


@dataclass(frozen=True)
class Grid:
    """Settings, seeds and the data/training overrides every run of the grid shares."""

    name: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    common: tuple[str, ...]


@dataclass
class RunRecord:
    """One finished run: what was stored and how well it predicted the test split."""

    setting: str
    method: str
    collisions: int | None
    threshold: int | None
    seed: int
    params: int  # embedding parameters (floats) over all tables
    param_bytes: int
    optimizer_bytes: int
    compression: float
    test_log_loss: float
    test_ne: float
    test_auc: float
    test_accuracy: float
    samples_per_s: float
    train_seconds: float
    steps: int
    world_size: int
    run_dir: str


def supported_combines() -> tuple[str, ...]:
    """The combine ops the training app's config accepts (``path`` once it is wired in)."""
    return typing.get_args(typing.get_type_hints(EmbeddingsConfig)["combine"])


def _cardinalities(high: int) -> str:
    """26 cardinalities log-spaced from 10 to ``high`` (as the generator's default, with a smaller top)."""
    values = [round(10 * (high / 10) ** (i / 25)) for i in range(26)]
    return "[" + ",".join(str(v) for v in values) + "]"


def _synthetic_common(rows: int, days: int, max_card: int, batch: int) -> tuple[str, ...]:
    """Data and model overrides of a synthetic grid: smaller than the app's defaults so a run takes seconds.

    The MLPs shrink too (the planted model is additive plus two pairwise terms, which a small MLP fits);
    the embedding tables, the object of the comparison, keep D=16. Every table is table-wise: left to the
    planner, small full and hashed tables become data-parallel and are trained by the dense optimizer
    (per-element Adagrad) while compositional ones stay on the fused row-wise Adagrad, which confounds
    the comparison.
    """
    return (
        f"data.synthetic.num_rows={rows}", f"data.synthetic.num_days={days}",
        f"data.synthetic.cardinalities={_cardinalities(max_card)}",
        f"data.global_batch_size={batch}", "data.eval_batch_size=16384",
        "model.dense_arch_layer_sizes=[64,16]", "model.over_arch_layer_sizes=[128,64,1]",
        "sharding.sharding_types=[table_wise]",
    )


def _settings(collisions: Sequence[int], combines: Sequence[str], combine_collisions: Sequence[int],
              thresholds: Sequence[int], hot: Sequence[tuple[str, int, int]] = ()) -> tuple[Setting, ...]:
    out = [Setting("full")]
    out += [Setting("hash", c) for c in collisions]
    out += [Setting("qr-mult", c) for c in collisions]
    out += [Setting(method, c, hot_rows=k) for method, k, c in hot]
    out += [Setting(f"qr-{op}", c) for op in combines for c in combine_collisions]
    out += [Setting("mixed-radix-3"), Setting("crt-2")]
    out += [Setting("hash", 4, t) for t in thresholds] + [Setting("qr-mult", 4, t) for t in thresholds]
    return tuple(out)


def expand_grid(quick: bool, seeds: int | None = None, data: str = "synthetic",
                combines: Iterable[str] | None = None, max_card: int | None = None) -> Grid:
    """The quick or default grid; ``combines`` defaults to what the training app supports."""
    ops = [op for op in ("add", "concat", "path") if op in (supported_combines() if combines is None else combines)]
    if quick:
        settings = _settings([4, 60], ops, [4], [], [("qr-mult", HOT_ROWS[-1], 60)])
        common = _synthetic_common(rows=40_000, days=4, max_card=max_card or 10_000, batch=1024)
        n_seeds = 1
    else:
        hot = [(op, k, c) for op, ks in (("qr-mult", HOT_ROWS), ("qr-add", HOT_ROWS[-1:])) for k in ks for c in (4, 8, 60)]
        settings = _settings([2, 4, 8, 60], ops, [4, 60], [0, 5000], hot)
        common = _synthetic_common(rows=100_000, days=4, max_card=max_card or 20_000, batch=2048)
        n_seeds = 3
    if data == "criteo":
        common = ()
    n_seeds = seeds if seeds is not None else n_seeds
    return Grid("quick" if quick else "default", settings, tuple(range(n_seeds)), common)


def record_from_summary(setting: Setting, seed: int, summary: dict) -> RunRecord:
    """The CSV row of a run, from the training app's ``summary.json``."""
    test, mem = summary["metrics"]["test"], summary["memory"]
    return RunRecord(
        setting=setting.label, method=setting.family, collisions=setting.collisions,
        threshold=None if setting.method == "full" else setting.threshold, seed=seed,
        params=int(mem["param_bytes"]) // BYTES_PER_FLOAT, param_bytes=int(mem["param_bytes"]),
        optimizer_bytes=int(mem["optimizer_bytes"]), compression=float(mem["compression"]),
        test_log_loss=test["log_loss"], test_ne=test["ne"], test_auc=test["auc"], test_accuracy=test["accuracy"],
        samples_per_s=summary["samples_per_s"], train_seconds=summary["train_seconds"], steps=summary["steps"],
        world_size=summary["world_size"], run_dir=summary["run_dir"],
    )


def _command(config: str, overrides: list[str], nproc: int) -> list[str]:
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "torchrec_qr.train", "--config", config, *overrides]


def run_setting(setting: Setting, seed: int, grid: Grid, config: str, runs_dir: Path, nproc: int,
                extra: Sequence[str] = (), timeout: float = 1800.0, attempts: int = 2) -> RunRecord | None:
    """Train one (setting, seed) through the app unless its summary exists; None if every attempt failed.

    Success is judged by ``summary.json`` rather than the exit code: torchrun occasionally aborts at exit
    after all work is done.
    """
    out = runs_dir / grid.name
    run_dir = out / f"{setting.label}-s{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return record_from_summary(setting, seed, json.loads(summary_path.read_text()))
    overrides = [
        *grid.common, *setting.overrides(), f"run.seed={seed}", f"run.output_dir={out}",
        f"run.name={run_dir.name}", "run.overwrite=true", "run.progress_bar=false", "run.tensorboard=false",
        "checkpoint.at_end=false", *extra,
    ]
    # One thread per process: on a shared CPU, OpenMP threads that spin-wait for a busy core made runs
    # 10-15x slower than single-threaded ones.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(1, attempts + 1):
        start = time.perf_counter()
        proc = subprocess.run(_command(config, overrides, nproc), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if summary_path.exists():
            logger.info("%s seed %d: %.0f s", setting.label, seed, time.perf_counter() - start)
            return record_from_summary(setting, seed, json.loads(summary_path.read_text()))
        logger.warning("%s seed %d attempt %d failed (exit %d): %s", setting.label, seed, attempt,
                       proc.returncode, proc.stderr.strip().splitlines()[-5:])
    return None


# --- outputs -------------------------------------------------------------------------------------


def write_csv(records: Sequence[RunRecord], path: Path) -> None:
    names = [f.name for f in fields(RunRecord)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in records:
            w.writerow(asdict(r))


def read_csv(path: Path) -> list[RunRecord]:
    """Records back from ``write_csv`` (to redraw tables and plots without rerunning)."""
    types = typing.get_type_hints(RunRecord)
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for name, text in row.items():
                tp = types[name]
                base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
                values[name] = None if text == "" and base is not str else base(text)
            out.append(RunRecord(**values))
    return out


@dataclass
class Aggregate:
    """Mean and sample std (0 for one seed) of a setting's runs."""

    setting: str
    method: str
    collisions: int | None
    threshold: int | None
    seeds: int
    params: int
    optimizer_bytes: int
    log_loss: float
    log_loss_std: float
    ne: float
    ne_std: float
    auc: float
    auc_std: float
    accuracy: float
    accuracy_std: float
    samples_per_s: float


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: Sequence[RunRecord]) -> list[Aggregate]:
    """One row per setting, in the order settings first appear."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.setting, []).append(r)
    out = []
    for label, rs in groups.items():
        stats = {k: _mean_std([getattr(r, f"test_{k}") for r in rs]) for k in ("log_loss", "ne", "auc", "accuracy")}
        out.append(Aggregate(
            setting=label, method=rs[0].method, collisions=rs[0].collisions, threshold=rs[0].threshold,
            seeds=len(rs), params=rs[0].params, optimizer_bytes=rs[0].optimizer_bytes,
            log_loss=stats["log_loss"][0], log_loss_std=stats["log_loss"][1], ne=stats["ne"][0], ne_std=stats["ne"][1],
            auc=stats["auc"][0], auc_std=stats["auc"][1], accuracy=stats["accuracy"][0],
            accuracy_std=stats["accuracy"][1], samples_per_s=statistics.fmean(r.samples_per_s for r in rs),
        ))
    return out


def welch_z(a: Aggregate, b: Aggregate) -> float:
    """(mean b - mean a) / standard error of the difference; inf if neither varies, nan for one seed each."""
    se = math.sqrt(a.log_loss_std**2 / a.seeds + b.log_loss_std**2 / b.seeds)
    diff = b.log_loss - a.log_loss
    if a.seeds < 2 and b.seeds < 2:
        return math.nan
    return diff / se if se > 0 else math.copysign(math.inf, diff)


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(aggs: Sequence[Aggregate]) -> str:
    """Mean ± std per setting, sorted by method then parameters (largest first)."""
    full = next((a for a in aggs if a.method == "full"), None)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(aggs, key=lambda a: (order.get(a.method, len(order)), -a.params, a.threshold or 0))
    lines = [
        "| setting | c | threshold | seeds | emb. params | opt. state | test log loss | vs full | NE | AUC | accuracy | samples/s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---|---|---:|",
    ]
    for a in rows:
        rel = f"{100 * (a.log_loss / full.log_loss - 1):+.2f}%" if full else ""
        lines.append(
            f"| {a.setting} | {a.collisions or ''} | {'' if a.threshold is None else a.threshold} | {a.seeds} | "
            f"{a.params:,} | {_bytes(a.optimizer_bytes)} | {_pm(a.log_loss, a.log_loss_std)} | {rel} | "
            f"{_pm(a.ne, a.ne_std)} | {_pm(a.auc, a.auc_std)} | {_pm(a.accuracy, a.accuracy_std)} | "
            f"{a.samples_per_s:,.0f} |"
        )
    return "\n".join(lines)


def comparison_table(aggs: Sequence[Aggregate], baseline: str = "hash") -> str:
    """Each compositional QR op against hashing at the same collisions and threshold: positive = QR better."""
    by_key = {(a.method, a.collisions, a.threshold): a for a in aggs}
    lines = ["| collisions | threshold | method | params vs hash | log loss gain vs hash | gain / SE |",
             "|---:|---:|---|---:|---:|---:|"]
    for (method, c, t), a in sorted(by_key.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2] or 0, kv[0][0])):
        base = by_key.get((baseline, c, t))
        if not method.startswith("qr-") or base is None:
            continue
        z = welch_z(a, base)
        lines.append(f"| {c} | {t} | {method} | {a.params / base.params:.3f}x | {base.log_loss - a.log_loss:+.5f} | "
                     f"{'n/a' if math.isnan(z) else f'{z:+.1f}'} |")
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def write_markdown(records: Sequence[RunRecord], path: Path, title: str, notes: Sequence[str] = ()) -> None:
    aggs = aggregate(records)
    parts = [f"# {title}", "", *notes, "" if notes else "", markdown_table(aggs), "",
             "QR against the hashing trick at the same collisions and threshold (gain = hash log loss - QR log "
             "loss; SE = standard error of the difference of the seed means):", "", comparison_table(aggs), ""]
    path.write_text("\n".join(parts))


def plot_pareto(records: Sequence[RunRecord], path: Path, title: str, references: dict[str, float] | None = None) -> None:
    """Embedding parameters (log x) against test log loss: one line per method at the default threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = aggregate(records)
    thresholds = [a.threshold for a in aggs if a.threshold is not None]
    main_t = statistics.mode(thresholds) if thresholds else None  # the other thresholds are a side sweep
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    methods = [*METHODS, *sorted({a.method for a in aggs} - set(METHODS))]  # then qr-mult-hot<K>, ...
    markers = dict(zip(methods, "*osD^vPXdh<>p"))
    colors = dict(zip(methods, [*(f"C{i}" for i in range(10)), "black", "olive", "navy"]))  # C0..C9 repeat after 10
    for method in methods:
        pts = sorted((a for a in aggs if a.method == method and a.threshold in (main_t, None)), key=lambda a: a.params)
        if not pts:
            continue
        x = [a.params for a in pts]
        y = [a.log_loss for a in pts]
        err = [a.log_loss_std for a in pts]
        ax.errorbar(x, y, yerr=err, marker=markers.get(method, "o"), markersize=9 if method == "full" else 6, capsize=3,
                    linestyle="-" if len(pts) > 1 else "none", label=method, color=colors.get(method))
        if method == "full":
            ax.axhline(y[0], color=ax.lines[-1].get_color(), linestyle="--", linewidth=0.8)
        if method in ("hash", "qr-mult") or "-hot" in method:
            for a in pts:
                ax.annotate(f"c={a.collisions}", (a.params, a.log_loss), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=ax.lines[-1].get_color())
    for name, value in (references or {}).items():
        ax.axhline(value, color="gray", linestyle=":", linewidth=1)
        ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(0, 3), fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (floats, all 26 tables)")
    ax.set_ylabel("test log loss (nats; mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _references(records: Sequence[RunRecord]) -> dict[str, float]:
    """Bayes-optimal and constant-predictor log loss of the synthetic runs (from one summary)."""
    for r in records:
        summary = Path(r.run_dir) / "summary.json"
        if not summary.is_absolute():
            summary = ROOT / summary
        if summary.exists():
            ref = json.loads(summary.read_text()).get("reference")
            if ref:  # the constant predictor's (0.57) would squeeze the curves into a band; the title gives it
                return {"Bayes-optimal": ref["bayes_log_loss"]}
            return {}
    return {}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchrec_qr.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small grid (one seed, minutes)")
    p.add_argument("--seeds", type=int, help="seeds per setting (default: 1 quick, 3 otherwise)")
    p.add_argument("--data", choices=("synthetic", "criteo"), default="synthetic")
    p.add_argument("--criteo-dir", help="Criteo Kaggle directory (train.txt or day files); needs --data criteo")
    p.add_argument("--config", help=f"base training config (default {SYNTHETIC_CONFIG} / {CRITEO_CONFIG})")
    p.add_argument("--out", default="docs/results", help="where the CSV, markdown and PNG go")
    p.add_argument("--runs-dir", default="runs/experiments", help="run directories (summaries are reused)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run; > 1 launches torchrun (default 1)")
    p.add_argument("--max-card", type=int, help="largest synthetic table (default 10k quick, 20k otherwise)")
    p.add_argument("--only", type=lambda v: v.split(","), metavar="S1,S2",
                   help="run only these setting labels, comma-separated (e.g. full,hash-c4-t200); the CSV keeps "
                        "its rows of the other settings")
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
        print(f"grid {name}: {len(settings)} settings x {len(grid.seeds)} seeds, base config {config}, "
              f"{'torchrun x ' + str(args.nproc) if args.nproc > 1 else 'one process'} per run", flush=True)
        kept = [r for r in read_csv(csv_path) if r.setting not in args.only] if args.only and csv_path.exists() else []
        records, failed, start = list(kept), [], time.perf_counter()
        for seed in grid.seeds:  # seed-major: a partial sweep still covers every setting
            for s in settings:
                rec = run_setting(s, seed, grid, config, Path(args.runs_dir), args.nproc, extra)
                if rec is None:
                    failed.append(f"{s.label}-s{seed}")
                    continue
                records.append(rec)
                print(f"  {s.label:<22} seed {seed}: test log loss {rec.test_log_loss:.5f}, "
                      f"{rec.params:,} params, {rec.samples_per_s:,.0f} samples/s", flush=True)
                write_csv(records, csv_path)
        print(f"grid {name}: {len(records) - len(kept)} runs in {time.perf_counter() - start:.0f} s"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not records:
        print("no finished runs", file=sys.stderr)
        return 1
    write_csv(records, csv_path)
    n_seeds = len({r.seed for r in records})
    desc = (f"{args.data} data, {n_seeds} seed(s); base config {config}; common overrides: "
            + " ".join(f"`{o}`" for o in (*grid.common, *extra)))
    write_markdown(records, out / f"results_{name}.md", f"Results: {name} grid", [desc])
    refs = _references(records) if args.data == "synthetic" else {}
    plot_pareto(records, out / f"pareto_{name}.png", f"{name} grid ({args.data}): test log loss vs embedding "
                f"parameters, {n_seeds} seed(s)", refs)
    print(f"wrote {csv_path}, {out / f'results_{name}.md'}, {out / f'pareto_{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
