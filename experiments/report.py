"""Statistics and outputs of a sweep: mean ± std per setting, QR against hashing, markdown and the Pareto plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.runs import ROOT, RunRecord
from experiments.settings import METHODS

__all__ = [
    "Aggregate",
    "aggregate",
    "comparison_table",
    "markdown_table",
    "plot_pareto",
    "references",
    "welch_z",
    "write_markdown",
]


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
        out.append(
            Aggregate(
                setting=label,
                method=rs[0].method,
                collisions=rs[0].collisions,
                threshold=rs[0].threshold,
                seeds=len(rs),
                params=rs[0].params,
                optimizer_bytes=rs[0].optimizer_bytes,
                log_loss=stats["log_loss"][0],
                log_loss_std=stats["log_loss"][1],
                ne=stats["ne"][0],
                ne_std=stats["ne"][1],
                auc=stats["auc"][0],
                auc_std=stats["auc"][1],
                accuracy=stats["accuracy"][0],
                accuracy_std=stats["accuracy"][1],
                samples_per_s=statistics.fmean(r.samples_per_s for r in rs),
            )
        )
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
        "| setting | c | threshold | seeds | emb. params | opt. state | test log loss | vs full | NE | AUC | accuracy "
        "| samples/s |",
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
    lines = [
        "| collisions | threshold | method | params vs hash | log loss gain vs hash | gain / SE |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for (method, c, t), a in sorted(by_key.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2] or 0, kv[0][0])):
        base = by_key.get((baseline, c, t))
        if not method.startswith("qr-") or base is None:
            continue
        z = welch_z(a, base)
        lines.append(
            f"| {c} | {t} | {method} | {a.params / base.params:.3f}x | {base.log_loss - a.log_loss:+.5f} | "
            f"{'n/a' if math.isnan(z) else f'{z:+.1f}'} |"
        )
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def write_markdown(records: Sequence[RunRecord], path: Path, title: str, notes: Sequence[str] = ()) -> None:
    aggs = aggregate(records)
    parts = [
        f"# {title}",
        "",
        *notes,
        "" if notes else "",
        markdown_table(aggs),
        "",
        "QR against the hashing trick at the same collisions and threshold (gain = hash log loss - QR log "
        "loss; SE = standard error of the difference of the seed means):",
        "",
        comparison_table(aggs),
        "",
    ]
    path.write_text("\n".join(parts))


def plot_pareto(
    records: Sequence[RunRecord], path: Path, title: str, references: dict[str, float] | None = None
) -> None:
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
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker=markers.get(method, "o"),
            markersize=9 if method == "full" else 6,
            capsize=3,
            linestyle="-" if len(pts) > 1 else "none",
            label=method,
            color=colors.get(method),
        )
        if method == "full":
            ax.axhline(y[0], color=ax.lines[-1].get_color(), linestyle="--", linewidth=0.8)
        if method in ("hash", "qr-mult") or "-hot" in method:
            for a in pts:
                ax.annotate(
                    f"c={a.collisions}",
                    (a.params, a.log_loss),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=ax.lines[-1].get_color(),
                )
    for name, value in (references or {}).items():
        ax.axhline(value, color="gray", linestyle=":", linewidth=1)
        ax.annotate(
            name,
            (0.01, value),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(0, 3),
            fontsize=7,
            color="gray",
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (floats, all 26 tables)")
    ax.set_ylabel("test log loss (nats; mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def references(records: Sequence[RunRecord]) -> dict[str, float]:
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
