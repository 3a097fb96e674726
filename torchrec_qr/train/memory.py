"""Per-table memory: what each logical table stores versus what a full table would (fp32).

Computed from the table configs, the plan and the optimizers (not from allocator statistics), so the
numbers are exact, identical on every machine, and comparable between runs of different kinds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_qr import ChineseRemainder, CompositionalEmbeddingBagConfig, MixedRadix, QuotientRemainder
from torchrec_qr.train.optim import optimizer_state_floats_per_row

__all__ = ["TableMemory", "format_bytes", "memory_report", "totals"]

BYTES_PER_FLOAT = 4


@dataclass
class TableMemory:
    """One logical table. ``compression`` = full parameter bytes / stored parameter bytes."""

    table: str
    logical_rows: int
    dim: int
    stored_as: str  # full | hash | qr(c=4)/mult | ...
    sub_table_rows: list[int]
    sharding_type: str
    param_bytes: int
    optimizer_bytes: int
    full_param_bytes: int
    full_optimizer_bytes: int
    compression: float

    def as_dict(self) -> dict:
        return asdict(self)


def _describe(stored: EmbeddingBagConfig, logical_rows: int) -> str:
    if isinstance(stored, CompositionalEmbeddingBagConfig):
        p = stored.partition
        scheme = (
            f"qr(c={p.collisions})"
            if isinstance(p, QuotientRemainder)
            else f"mixed_radix{list(p.radices)}"
            if isinstance(p, MixedRadix)
            else f"crt{list(p.moduli)}"
            if isinstance(p, ChineseRemainder)
            else repr(p)
        )
        if stored.path is not None:
            return f"{scheme}/path({stored.path.kind}{list(stored.path.hidden) or ''})"
        return f"{scheme}/{stored.combine}"
    return "full" if stored.num_embeddings == logical_rows else f"hash(c={-(-logical_rows // stored.num_embeddings)})"


def memory_report(
    logical: list[EmbeddingBagConfig],
    stored: list[EmbeddingBagConfig],
    sharding_types: dict[str, str],
    sparse_optimizer: str,
    dense_optimizer: str,
) -> list[TableMemory]:
    """Rows per table; data-parallel tables and path functions count one replica and the dense optimizer's
    state."""
    out = []
    for full, table in zip(logical, stored):
        sharding = sharding_types.get(table.name, "?")
        opt = dense_optimizer if sharding == "data_parallel" else sparse_optimizer
        compositional = isinstance(table, CompositionalEmbeddingBagConfig)
        physical = table.sub_table_configs() if compositional else [table]
        rows = table.sub_table_sizes() if compositional else [table.num_embeddings]  # path: rows, then classes
        params = sum(t.num_embeddings * t.embedding_dim for t in physical)
        state = sum(t.num_embeddings * optimizer_state_floats_per_row(opt, t.embedding_dim) for t in physical)
        if compositional and table.path is not None:
            functions = table.path_parameters()  # dense parameters, replicated, trained by the dense optimizer
            params += functions
            state += functions * optimizer_state_floats_per_row(dense_optimizer, 1)
        full_params = full.num_embeddings * full.embedding_dim
        full_state = full.num_embeddings * optimizer_state_floats_per_row(opt, full.embedding_dim)
        out.append(
            TableMemory(
                table=table.name,
                logical_rows=full.num_embeddings,
                dim=full.embedding_dim,
                stored_as=_describe(table, full.num_embeddings),
                sub_table_rows=rows,
                sharding_type=sharding,
                param_bytes=params * BYTES_PER_FLOAT,
                optimizer_bytes=state * BYTES_PER_FLOAT,
                full_param_bytes=full_params * BYTES_PER_FLOAT,
                full_optimizer_bytes=full_state * BYTES_PER_FLOAT,
                compression=full_params / params,
            )
        )
    return out


def totals(report: list[TableMemory]) -> dict[str, float]:
    keys = ("param_bytes", "optimizer_bytes", "full_param_bytes", "full_optimizer_bytes")
    out: dict[str, float] = {k: sum(getattr(t, k) for t in report) for k in keys}
    out["compression"] = out["full_param_bytes"] / max(1, out["param_bytes"])
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
