"""The experiment grid: which storage settings are compared, and the training-app overrides of each."""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torchrec_qr.train.config import EmbeddingsConfig

__all__ = ["HOT_ROWS", "METHODS", "Grid", "Setting", "expand_grid", "supported_combines"]

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
            return [
                "embeddings.kind=compositional",
                "embeddings.scheme=qr",
                f"embeddings.collisions={self.collisions}",
                f"embeddings.combine={op}",
                t,
                *path,
                *hot,
            ]
        if self.method == "mixed-radix-3":
            return [
                "embeddings.kind=compositional",
                "embeddings.scheme=mixed_radix",
                "embeddings.num_partitions=3",
                "embeddings.combine=mult",
                t,
            ]
        if self.method == "crt-2":
            return [
                "embeddings.kind=compositional",
                "embeddings.scheme=chinese_remainder",
                "embeddings.num_partitions=2",
                "embeddings.combine=mult",
                t,
            ]
        raise ValueError(f"unknown method {self.method!r}")


@dataclass(frozen=True)
class Grid:
    """Settings, seeds and the data/training overrides every run of the grid shares."""

    name: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    common: tuple[str, ...]


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
        f"data.synthetic.num_rows={rows}",
        f"data.synthetic.num_days={days}",
        f"data.synthetic.cardinalities={_cardinalities(max_card)}",
        f"data.global_batch_size={batch}",
        "data.eval_batch_size=16384",
        "model.dense_arch_layer_sizes=[64,16]",
        "model.over_arch_layer_sizes=[128,64,1]",
        "sharding.sharding_types=[table_wise]",
    )


def _settings(
    collisions: Sequence[int],
    combines: Sequence[str],
    combine_collisions: Sequence[int],
    thresholds: Sequence[int],
    hot: Sequence[tuple[str, int, int]] = (),
) -> tuple[Setting, ...]:
    out = [Setting("full")]
    out += [Setting("hash", c) for c in collisions]
    out += [Setting("qr-mult", c) for c in collisions]
    out += [Setting(method, c, hot_rows=k) for method, k, c in hot]
    out += [Setting(f"qr-{op}", c) for op in combines for c in combine_collisions]
    out += [Setting("mixed-radix-3"), Setting("crt-2")]
    out += [Setting("hash", 4, t) for t in thresholds] + [Setting("qr-mult", 4, t) for t in thresholds]
    return tuple(out)


def expand_grid(
    quick: bool,
    seeds: int | None = None,
    data: str = "synthetic",
    combines: Iterable[str] | None = None,
    max_card: int | None = None,
) -> Grid:
    """The quick or default grid; ``combines`` defaults to what the training app supports."""
    ops = [op for op in ("add", "concat", "path") if op in (supported_combines() if combines is None else combines)]
    if quick:
        settings = _settings([4, 60], ops, [4], [], [("qr-mult", HOT_ROWS[-1], 60)])
        common = _synthetic_common(rows=40_000, days=4, max_card=max_card or 10_000, batch=1024)
        n_seeds = 1
    else:
        hot = [
            (op, k, c) for op, ks in (("qr-mult", HOT_ROWS), ("qr-add", HOT_ROWS[-1:])) for k in ks for c in (4, 8, 60)
        ]
        settings = _settings([2, 4, 8, 60], ops, [4, 60], [0, 5000], hot)
        common = _synthetic_common(rows=100_000, days=4, max_card=max_card or 20_000, batch=2048)
        n_seeds = 3
    if data == "criteo":
        common = ()
    n_seeds = seeds if seeds is not None else n_seeds
    return Grid("quick" if quick else "default", settings, tuple(range(n_seeds)), common)
