"""``FusedCompositionalEmbeddingBagCollection``: the unsharded collection with its optimizer fused into
the TBE backward, as TorchRec's ``FusedEmbeddingBagCollection`` is to ``EmbeddingBagCollection``.

Single-process training of the plain module trains its sub-tables with a dense optimizer: every step
materializes (and zero-fills) a gradient of every sub-table. Here FBGEMM applies the update to the rows a
batch touched inside the backward, so a step costs what the lookups cost.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import convert_optimizer_type_and_kwargs
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from torchrec_qr.modules.batched_embedding_bags import BatchedEmbeddingBags
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.fused_compose import FusedCompose

__all__ = ["FusedCompositionalEmbeddingBagCollection"]


class FusedCompositionalEmbeddingBagCollection(CompositionalEmbeddingBagCollection):
    """A ``CompositionalEmbeddingBagCollection`` whose sub-tables are updated inside the backward.

    Args:
        tables: logical table configs (plain and compositional).
        optimizer_type: ``torch.optim.SGD``, ``torch.optim.Adagrad``, ``torchrec.optim.RowWiseAdagrad`` or
            ``torch.optim.Adam`` (GPU only in FBGEMM 1.8), as for ``FusedEmbeddingBagCollection``.
        optimizer_kwargs: e.g. ``{"lr": 0.05}``.
        is_weighted, device, validate_ids: as for ``CompositionalEmbeddingBagCollection``.

    Path functions stay dense parameters: train them with an ordinary optimizer. State-dict keys are those
    of ``CompositionalEmbeddingBagCollection``; ``fused_optimizer()`` holds the learning rate and the
    optimizer state (``_embedding_bag_collection.embedding_bags.{sub-table}.weight.momentum_1``).

    Example::

        ebc = FusedCompositionalEmbeddingBagCollection(
            compress([EmbeddingBagConfig(name="t", num_embeddings=1_000_000, embedding_dim=64, feature_names=["f"])],
                     partition=QuotientRemainder(collisions=100)),
            optimizer_type=torchrec.optim.RowWiseAdagrad, optimizer_kwargs={"lr": 0.05},
        )
        ebc(kjt).values().sum().backward()  # the sub-tables are updated here; no optimizer.step() for them
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        optimizer_type: type[torch.optim.Optimizer],
        optimizer_kwargs: dict[str, Any],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        validate_ids: bool = True,
    ) -> None:
        converted = convert_optimizer_type_and_kwargs(optimizer_type, optimizer_kwargs)
        if converted is None:
            raise ValueError(
                f"cannot fuse optimizer_type={getattr(optimizer_type, '__name__', optimizer_type)} with "
                f"kwargs {optimizer_kwargs}; use torch.optim.SGD, torch.optim.Adagrad, "
                "torchrec.optim.RowWiseAdagrad or torch.optim.Adam"
            )
        optimizer, kwargs = converted
        super().__init__(
            tables,
            is_weighted,
            device,
            validate_ids,
            storage=partial(_fused_storage, optimizer=optimizer, optimizer_kwargs=kwargs),
        )
        # The native kernel composes straight from the TBEs' weights and applies their optimizer (see
        # ``FusedCompose``); where it does not apply, the TBEs' own fused backward does.
        self._fused_compose = FusedCompose.build(self._composer, list(self._embedding_bag_collection._emb_modules))
        self._optimizer_type = optimizer_type
        self._optimizer_kwargs = optimizer_kwargs
        storage_optim = self._embedding_bag_collection.fused_optimizer
        self._optim = CombinedOptimizer(
            [("_embedding_bag_collection", storage_optim)] if storage_optim is not None else []
        )

    def optimizer_type(self) -> type[torch.optim.Optimizer]:
        return self._optimizer_type

    def optimizer_kwargs(self) -> dict[str, Any]:
        return self._optimizer_kwargs

    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim


def _fused_storage(
    tables: list[EmbeddingBagConfig],
    device: torch.device | str | None,
    optimizer: Any,
    optimizer_kwargs: dict[str, Any],
) -> BatchedEmbeddingBags:
    return BatchedEmbeddingBags(tables, device, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs)
