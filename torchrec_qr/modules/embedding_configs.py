"""Configs for compositional embedding-bag tables.

``CompositionalEmbeddingBagConfig`` *is an* ``EmbeddingBagConfig`` describing the logical table (name,
num_embeddings, embedding_dim, feature_names, pooling), so every consumer of TorchRec configs keeps working;
it adds how the table is stored: a partition scheme, a combine op and a composition mode. Each logical
table expands into k physical *sub-tables*, plain ``EmbeddingBagConfig`` s that TorchRec stores, shards and
optimizes like any other table; a path table (``combine="path"``) stores only partition 1's sub-table and
per-class functions for the others (``path_functions``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr.modules.partitions import HotIds, Partition
from torchrec_qr.modules.path_functions import PathFunction

__all__ = [
    "COMBINE_OPS",
    "COMPOSITION_MODES",
    "CompositionalEmbeddingBagConfig",
    "compress",
    "most_frequent_ids",
    "physical_table_configs",
    "sub_feature_name",
    "sub_table_name",
]

COMBINE_OPS = ("mult", "add", "concat", "path")
# per_id: combine each id's rows, then pool (exact). pooled: pool each sub-table, then combine (the DLRM
# reference; identical to per_id for add/concat and for one-id bags, an approximation for multi-id mult).
COMPOSITION_MODES = ("per_id", "pooled")
SUB_TABLE_SEPARATOR = "__p"


def sub_table_name(table_name: str, j: int) -> str:
    return f"{table_name}{SUB_TABLE_SEPARATOR}{j}"


def sub_feature_name(feature_name: str, j: int) -> str:
    return f"{feature_name}{SUB_TABLE_SEPARATOR}{j}"


@dataclass
class CompositionalEmbeddingBagConfig(EmbeddingBagConfig):
    """A logical embedding-bag table stored as k sub-tables of a complementary partition.

    Args:
        partition: the complementary partition scheme (``QuotientRemainder(collisions=4)``, ...).
        combine: ``"mult"`` | ``"add"`` | ``"concat"``: how an id's k sub-table rows make its embedding;
            ``"path"``: partition 1's row passed through the function each further partition's class
            selects, ``x = M_{k,p_k(x)} ∘ … ∘ M_{2,p_2(x)} (W[p_1(x)])`` (k >= 2).
        sub_dims: for ``concat``, the width of each sub-table (default: an even split of embedding_dim).
        composition: ``"per_id"`` (default, exact) or ``"pooled"`` (pool each sub-table, then combine;
            only differs for ``mult`` with multi-id bags, where it is the DLRM reference's approximation;
            per-id weights weight the first sub-table's pool only, so one-id bags stay exact).
        path: for ``path``, the function family (default ``PathFunction.linear()``: a D x D matrix per class).

    Initialization: sub-tables are drawn ``U(-b, b)`` with ``b`` chosen so the *composed* embedding has the
    variance of TorchRec's default ``U(-s, s)``, ``s = sqrt(1/num_embeddings)`` (or ``weight_init_max`` when
    given): ``concat``: ``b = s``; ``add``: ``b = s / sqrt(k)``; ``mult``: ``b = sqrt(3) (s^2/3)^(1/2k)``;
    ``path``: ``b = s`` and every function preserves the second moment (layer weights ``U(-a, a)``,
    ``a = sqrt(3 g / fan_in)``, ``g = 2`` after a ReLU else 1, biases 0; see ``PathFunction.init_bounds``).

    Example::

        table = CompositionalEmbeddingBagConfig(
            name="t_user", num_embeddings=10_000_000, embedding_dim=64, feature_names=["user"],
            partition=QuotientRemainder(collisions=1000), combine="mult",
        )
    """

    partition: Partition | None = None
    combine: str = "mult"
    sub_dims: list[int] | None = None
    composition: str = "per_id"
    path: PathFunction | None = None

    def __post_init__(self) -> None:
        where = f"table {self.name!r}"
        if not isinstance(self.partition, Partition):
            raise TypeError(
                f"{where}: partition must be a torchrec_qr Partition (e.g. QuotientRemainder(collisions=4)), "
                f"got {type(self.partition).__name__}"
            )
        if self.init_fn is not None and not _is_default_init(self):
            raise ValueError(
                f"{where}: init_fn initializes a full [num_embeddings, embedding_dim] table, which a compositional "
                "table never stores; drop init_fn (sub-tables are drawn so the composed embedding has TorchRec's "
                "default scale, or set weight_init_max), or initialize the sub-tables after construction through "
                "the module's state dict"
            )
        if self.combine not in COMBINE_OPS:
            raise ValueError(f"{where}: combine must be one of {COMBINE_OPS}, got {self.combine!r}")
        if self.composition not in COMPOSITION_MODES:
            raise ValueError(f"{where}: composition must be one of {COMPOSITION_MODES}, got {self.composition!r}")
        k = self.partition.num_partitions
        if self.combine == "path":
            self._check_path(where, k)
        elif self.path is not None:
            raise ValueError(f"{where}: path={self.path} only applies to combine='path', got combine={self.combine!r}")
        if self.combine == "concat":
            if self.sub_dims is None:
                if self.embedding_dim < k:
                    raise ValueError(f"{where}: embedding_dim={self.embedding_dim} cannot be split into {k} parts")
                base, extra = divmod(self.embedding_dim, k)
                self.sub_dims = [base + (1 if j < extra else 0) for j in range(k)]
            self.sub_dims = [int(d) for d in self.sub_dims]
            if len(self.sub_dims) != k or any(d < 1 for d in self.sub_dims):
                raise ValueError(
                    f"{where}: sub_dims must be {k} positive ints (one per partition), got {self.sub_dims}"
                )
            if sum(self.sub_dims) != self.embedding_dim:
                raise ValueError(
                    f"{where}: concat sub_dims {self.sub_dims} sum to {sum(self.sub_dims)}, "
                    f"not embedding_dim={self.embedding_dim}; make them add up"
                )
        elif self.sub_dims is not None and any(d != self.embedding_dim for d in self.sub_dims):
            raise ValueError(
                f"{where}: combine={self.combine!r} needs every sub-table at embedding_dim="
                f"{self.embedding_dim}, got sub_dims={self.sub_dims}; drop sub_dims or use combine='concat'"
            )
        try:
            self.partition.validate(self.num_embeddings)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def _check_path(self, where: str, k: int) -> None:
        if k < 2:
            raise ValueError(f"{where}: combine='path' needs k >= 2 partitions (one table, then functions), got {k}")
        if self.composition != "per_id":
            raise ValueError(
                f"{where}: combine='path' composes each id (composition='per_id'), got {self.composition!r}"
            )
        if self.sub_dims is not None:
            raise ValueError(
                f"{where}: combine='path' stores one sub-table of embedding_dim; drop sub_dims={self.sub_dims}"
            )
        if self.path is None:
            self.path = PathFunction()
        if not isinstance(self.path, PathFunction):
            raise TypeError(
                f"{where}: path must be a PathFunction (e.g. PathFunction.mlp((64,))), got {type(self.path).__name__}"
            )

    @property
    def num_partitions(self) -> int:
        assert self.partition is not None
        return self.partition.num_partitions

    def sub_table_sizes(self) -> list[int]:
        assert self.partition is not None
        return self.partition.sizes(self.num_embeddings)

    @property
    def num_sub_tables(self) -> int:
        """Stored sub-tables: one per partition, or only partition 1's for ``path``."""
        return 1 if self.combine == "path" else self.num_partitions

    def sub_embedding_dims(self) -> list[int]:
        """The width of each stored sub-table."""
        if self.combine == "concat":
            assert self.sub_dims is not None
            return list(self.sub_dims)
        return [self.embedding_dim] * self.num_sub_tables

    @property
    def per_id(self) -> bool:
        """Whether lookups need each id's rows (not bag sums): ``path`` always, ``mult`` in per_id mode."""
        return self.combine == "path" or (self.combine == "mult" and self.composition == "per_id")

    def sub_table_init_bound(self) -> float:
        s = self.get_weight_init_max() if self.weight_init_max is not None else math.sqrt(1.0 / self.num_embeddings)
        k = self.num_partitions
        if self.combine == "add":
            return s / math.sqrt(k)
        if self.combine == "mult":
            return math.sqrt(3.0) * (s * s / 3.0) ** (1.0 / (2 * k))
        return s

    def sub_table_configs(self) -> list[EmbeddingBagConfig]:
        """The physical tables TorchRec stores for this logical table, in partition order (``path``: the first)."""
        b = self.sub_table_init_bound()
        return [
            EmbeddingBagConfig(
                num_embeddings=rows,
                embedding_dim=dim,
                name=sub_table_name(self.name, j),
                data_type=self.data_type,
                feature_names=[sub_feature_name(f, j) for f in self.feature_names],
                weight_init_max=b,
                weight_init_min=-b,
                pooling=self.pooling,
            )
            for j, (rows, dim) in enumerate(zip(self.sub_table_sizes(), self.sub_embedding_dims()))
        ]

    def path_parameters(self) -> int:
        """Parameters of the path functions: ``sum_{j>=2} |P_j| * (parameters of one function)``; 0 if none."""
        if self.path is None:
            return 0
        return sum(self.sub_table_sizes()[1:]) * self.path.num_parameters(self.embedding_dim)

    def num_parameters(self) -> int:
        """Stored parameters as the paper counts them: ``sum_j |P_j| * D_j`` over the stored sub-tables,
        plus the path functions."""
        return sum(r * d for r, d in zip(self.sub_table_sizes(), self.sub_embedding_dims())) + self.path_parameters()


def _is_default_init(config: EmbeddingBagConfig) -> bool:
    """Whether ``init_fn`` is the one TorchRec fills in (uniform over the config's own bounds), not a user's."""
    fn = config.init_fn
    return (
        isinstance(fn, functools.partial)
        and fn.func is torch.nn.init.uniform_
        and not fn.args
        and fn.keywords == {"a": config.get_weight_init_min(), "b": config.get_weight_init_max()}
    )


def compress(
    configs: Sequence[EmbeddingBagConfig],
    partition: Partition | Callable[[int], Partition],
    combine: str = "mult",
    threshold: int = 0,
    composition: str = "per_id",
    path: PathFunction | None = None,
    hot_ids: Mapping[str, torch.Tensor | Sequence[int]] | None = None,
    hot_rows: int = 0,
) -> list[EmbeddingBagConfig]:
    """Turn plain EBC configs into compositional ones; tables with ``num_embeddings <= threshold`` stay full.

    ``partition`` is a scheme or a factory ``num_embeddings -> Partition`` (e.g. ``lambda n:
    MixedRadix.balanced(n, 3)``), so each table gets a scheme fitted to its size. ``path``: the function
    family for ``combine="path"`` (default linear).

    ``hot_ids`` (by table name) makes a table ``HotIds(ids, base=scheme)``, the scheme (a factory's fitted to
    the ``N - K`` tail) composing only the ids that are not hot. With ``hot_rows == 0`` each value is the
    list of hot ids itself; with ``hot_rows = K > 0`` it is the table's id frequencies (one count per id)
    and its ``min(K, N - 1)`` most frequent ids are hot (see ``most_frequent_ids``). Tables without an
    entry, or whose entry yields no hot id, get the plain scheme.
    """
    if not isinstance(hot_rows, int) or hot_rows < 0:
        raise ValueError(f"hot_rows must be an int >= 0 (0: hot_ids lists the ids), got {hot_rows!r}")
    unknown = sorted(set(hot_ids or {}) - {c.name for c in configs})
    if unknown:
        raise ValueError(f"hot_ids names tables {unknown} that are not among {[c.name for c in configs]}")
    out: list[EmbeddingBagConfig] = []
    for c in configs:
        if isinstance(c, CompositionalEmbeddingBagConfig) or c.num_embeddings <= threshold:
            out.append(c)
            continue
        hot = None
        if hot_ids is not None and c.name in hot_ids:
            hot = torch.as_tensor(hot_ids[c.name])
            if hot_rows and hot.shape != (c.num_embeddings,):
                raise ValueError(
                    f"table {c.name!r}: with hot_rows={hot_rows}, hot_ids[{c.name!r}] must be the frequency of each of "
                    f"its {c.num_embeddings} ids, got shape {tuple(hot.shape)}; pass hot_rows=0 to give ids instead"
                )
            hot = most_frequent_ids(hot, hot_rows, c.name) if hot_rows else hot
            hot = hot if hot.numel() else None
        tail = c.num_embeddings - (0 if hot is None else hot.numel())
        scheme = partition if isinstance(partition, Partition) else partition(tail)
        if hot is not None:
            scheme = HotIds(hot, base=scheme)
        fields = {f: getattr(c, f) for f in EmbeddingBagConfig.__dataclass_fields__}
        out.append(
            CompositionalEmbeddingBagConfig(
                **fields, partition=scheme, combine=combine, composition=composition, path=path
            )
        )
    return out


def most_frequent_ids(counts: torch.Tensor, k: int, table: str = "") -> torch.Tensor:
    """The ``min(k, N - 1)`` most frequent ids, ``counts[i]`` being id i's frequency and ``N = len(counts)``.

    Ties (never-seen ids included) go to the smaller id, so the number of hot rows, and with it every shape,
    follows from k and N alone. At least one id stays in the tail: all-hot would be a full table.
    """
    if counts.dim() != 1 or counts.is_floating_point() and bool((counts != counts.floor()).any()):
        raise ValueError(f"table {table!r}: hot-id counts must be one integer count per id, got {tuple(counts.shape)}")
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    return order[: max(0, min(k, counts.numel() - 1))]


def physical_table_configs(configs: Sequence[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """Plain tables as they are, compositional ones as their sub-tables (the tables TorchRec stores).

    Sub-table-major: every table's sub-table 0 (plain tables in their place), then every sub-table 1, ...
    Lookups return columns in this order, so each sub-table index's columns form one contiguous run that
    composition takes as a view instead of gathering.
    """
    per_table = [
        c.sub_table_configs() if isinstance(c, CompositionalEmbeddingBagConfig) else [replace(c)] for c in configs
    ]
    depth = max((len(p) for p in per_table), default=0)
    return [p[j] for j in range(depth) for p in per_table if j < len(p)]
