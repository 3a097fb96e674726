"""The naive baseline: QR sub-tables as ordinary TorchRec tables, combined after the output all-to-all.

Benchmark-only; this is the design torchrec_qr's sharded module replaces. Each logical table ``t`` of N rows
becomes two plain ``EmbeddingBagConfig`` s, ``t__p0`` (``ceil(N/c)`` rows) and ``t__p1`` (``c`` rows),
with features ``f__p0 = id // c`` and ``f__p1 = id % c`` computed on the sending rank *before* the input
dist. A plain EBC (sharded like any other) looks both up and pools each bag, so the input all-to-all carries
every id twice and the output all-to-all two pooled vectors per (sample, feature); the pooled sub-table
vectors are multiplied after the output all-to-all.

For bags of one id this equals QR ``mult``. For multi-id bags it is the DLRM reference's approximation
(pool each sub-table, then multiply), i.e. torchrec_qr's ``composition="pooled"``, not the exact per-id
composition: a pooled vector per sub-table is all the naive layout has after the output dist.

The layout is laid out to be as cheap as the design allows: all ``__p0`` features first, then all ``__p1``
ones (the KJT is two concatenations, no per-feature interleaving), and the combine is one gather and one
multiply over the whole ``[B, 2F, D]`` output.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig, sub_feature_name

__all__ = ["NaiveCompositionalModel", "naive_table_configs", "split_features"]


def naive_table_configs(tables: list[CompositionalEmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """Every table's ``__p0`` sub-table, then every table's ``__p1`` sub-table (one feature each)."""
    subs = [t.sub_table_configs() for t in tables]
    for t in tables:
        if t.num_partitions != 2 or t.combine != "mult" or len(t.feature_names) != 1:
            raise ValueError(f"table {t.name!r}: the naive baseline covers QR mult tables with one feature")
    return [s[0] for s in subs] + [s[1] for s in subs]


def split_features(kjt: KeyedJaggedTensor, collisions: int) -> KeyedJaggedTensor:
    """``f`` → ``f__p0 = id // c`` and ``f__p1 = id % c`` (all ``__p0`` keys first, then all ``__p1``)."""
    ids = kjt.values()
    keys = kjt.keys()
    return KeyedJaggedTensor(
        keys=[sub_feature_name(f, 0) for f in keys] + [sub_feature_name(f, 1) for f in keys],
        values=torch.cat([torch.div(ids, collisions, rounding_mode="floor"), ids % collisions]),
        lengths=torch.cat([kjt.lengths(), kjt.lengths()]),
        stride=kjt.stride(),
    )


class NaiveCompositionalModel(nn.Module):
    """``forward(kjt) -> [B, F*D]``: split ids, look up through ``ebc`` (sharded by DMP), multiply.

    Output columns are in the order of ``feature_names`` (the logical features).
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: list[str], collisions: int) -> None:
        super().__init__()
        self.ebc = ebc
        self.feature_names = list(feature_names)
        self.collisions = collisions
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._keys: list[str] | None = None

    def _gather_index(self, keys: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The sharded EBC's output orders keys by rank: map each logical feature to its two blocks once.
        if self._index is None or self._keys != keys:
            pos = {k: i for i, k in enumerate(keys)}
            self._index = tuple(
                torch.tensor([pos[sub_feature_name(f, j)] for f in self.feature_names], device=device) for j in (0, 1)
            )  # type: ignore[assignment]
            self._keys = list(keys)
        assert self._index is not None
        return self._index

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(split_features(kjt, self.collisions))
        values = kt.values()
        keys = kt.keys()
        dim = values.shape[1] // len(keys)
        blocks = values.view(values.shape[0], len(keys), dim)
        i0, i1 = self._gather_index(keys, values.device)
        return (blocks.index_select(1, i0) * blocks.index_select(1, i1)).flatten(1)
