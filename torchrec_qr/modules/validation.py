"""Input checks with messages that name the table, feature and offending value, and say how to fix it."""

from __future__ import annotations

import re

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.modules.embedding_configs import SUB_TABLE_SEPARATOR

__all__ = ["check_tables", "check_features", "check_id_ranges"]

_ID_DTYPES = (torch.int64, torch.int32)
_SUB_TABLE_NAME = re.compile(re.escape(SUB_TABLE_SEPARATOR) + r"\d+$")


def check_tables(tables: list[EmbeddingBagConfig]) -> None:
    """Unique table names, each table with its features listed once, at least one table. A feature may feed
    several tables (outputs ``feature@table``), as in TorchRec's EmbeddingBagCollection."""
    if not tables:
        raise ValueError("a collection needs at least one table config")
    seen_tables: set[str] = set()
    for t in tables:
        if not isinstance(t, EmbeddingBagConfig):
            raise TypeError(f"tables must be EmbeddingBagConfig (or a subclass), got {type(t).__name__}")
        if not t.name:
            raise ValueError("every table config needs a non-empty name")
        if t.name in seen_tables:
            raise ValueError(f"duplicate table name {t.name!r}: table names must be unique")
        if _SUB_TABLE_NAME.search(t.name):
            raise ValueError(
                f"table name {t.name!r} ends like a sub-table's ({SUB_TABLE_SEPARATOR}<j>), which names the sub-tables "
                "of compositional tables in the state dict; rename it "
                f"(e.g. {t.name.replace(SUB_TABLE_SEPARATOR, '_p')!r})"
            )
        for field in ("num_embeddings", "embedding_dim"):
            value = getattr(t, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"table {t.name!r}: {field} must be a positive int, got {value!r}")
        seen_tables.add(t.name)
        if not t.feature_names:
            t.feature_names = [t.name]
        if len(set(t.feature_names)) != len(t.feature_names):
            raise ValueError(f"table {t.name!r} lists a feature twice: {t.feature_names}")


def check_features(features: KeyedJaggedTensor, feature_names: list[str], is_weighted: bool) -> None:
    """The KJT carries every feature as integer ids, weights exactly when the module is weighted, and as
    many weights as ids. Structural only: no device reads (no host sync; works on the meta device)."""
    if not isinstance(features, KeyedJaggedTensor):
        raise TypeError(f"expected a KeyedJaggedTensor, got {type(features).__name__}")
    keys = set(features.keys())
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(
            f"features {missing} are missing from the input KeyedJaggedTensor (keys: {features.keys()}); "
            "every feature of the collection's tables must be present (use empty bags for none)"
        )
    values, lengths = features.values(), features.lengths()
    if lengths.numel() == 0:
        raise ValueError(
            f"the input KeyedJaggedTensor has no bags (batch size 0, keys {features.keys()}): give every feature "
            "one bag per sample (empty bags are fine), or skip the call for an empty batch"
        )
    if values.dtype not in _ID_DTYPES:
        raise TypeError(
            f"KeyedJaggedTensor values are ids and must be torch.int64 or torch.int32, got {values.dtype} (features "
            f"{features.keys()}); a float id would be truncated: convert ids to integers before building the KJT"
        )
    if lengths.dtype not in _ID_DTYPES:
        raise TypeError(f"KeyedJaggedTensor lengths must be torch.int64 or torch.int32, got {lengths.dtype}")
    has_weights = features.weights_or_none() is not None
    if has_weights and not is_weighted:
        raise ValueError("the input has per-id weights but the module is unweighted: build it with is_weighted=True")
    if is_weighted and not has_weights:
        raise ValueError("the module is weighted (is_weighted=True) but the input KeyedJaggedTensor has no weights")
    if has_weights and features.weights().numel() != values.numel():
        raise ValueError(
            f"malformed KeyedJaggedTensor: {features.weights().numel()} weights for {values.numel()} values"
        )


def _check_lengths(features: KeyedJaggedTensor) -> None:
    """Lengths are non-negative and sum to the number of values (reads them: one device sync)."""
    lengths, values = features.lengths(), features.values()
    total = int(lengths.sum()) if lengths.numel() else 0
    if total != values.numel():
        raise ValueError(f"malformed KeyedJaggedTensor: lengths sum to {total} but there are {values.numel()} values")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("malformed KeyedJaggedTensor: negative lengths")


def check_id_ranges(features: KeyedJaggedTensor, tables: list[EmbeddingBagConfig]) -> None:
    """Lengths match the values and every id lies in ``[0, num_embeddings)`` of its table: what
    ``validate_ids`` buys, for a few device syncs per batch. Skipped on the meta device (no data)."""
    if features.values().device.type == "meta":
        return
    _check_lengths(features)
    # A feature read by several tables must fit the smallest of them.
    feature_table = {f: t for t in sorted(tables, key=lambda t: -t.num_embeddings) for f in t.feature_names}
    keys = [k for k in features.keys() if k in feature_table]
    if not keys:
        return
    per_key = dict(zip(features.keys(), features.length_per_key()))
    values = features.values()
    bounds = torch.repeat_interleave(
        torch.tensor(
            [feature_table[k].num_embeddings if k in feature_table else 2**63 - 1 for k in features.keys()],
            dtype=torch.int64,
            device=values.device,
        ),
        torch.tensor([per_key[k] for k in features.keys()], device=values.device),
        output_size=values.numel(),
    )
    # Features of no table (the bound 2**63 - 1) are ignored, as EmbeddingBagCollection ignores them.
    bad = ((values < 0) | (values >= bounds)) & (bounds != 2**63 - 1)
    if not bool(bad.any()):
        return
    pos = int(torch.nonzero(bad)[0])
    start = 0
    for k in features.keys():
        if pos < start + per_key[k]:
            t = feature_table[k]
            raise ValueError(
                f"id {int(values[pos])} of feature {k!r} is out of range for table {t.name!r} "
                f"(num_embeddings={t.num_embeddings}): ids must be in [0, {t.num_embeddings}); remap or "
                f"hash ids before the lookup, or enlarge the table"
            )
        start += per_key[k]
