"""TorchScript-able id -> class maps of the partition schemes, for the scripted inference path.

``Partition.indices`` is eager Python over the scheme's dataclass fields; serving (``torch.jit.script``,
fx + script, ``torch.export``) needs the same map as a module of plain tensor ops whose constants are fixed
at construction. Each ``Partition`` returns one from ``indexer()``; a new scheme implements that one method.
``tests/test_scripted_composition.py`` pins every indexer to its scheme's ``indices``.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["DivModIndexer", "HotIdsIndexer", "LookupIndexer"]


class DivModIndexer(nn.Module):
    """Class j of an id is ``(id // divisors[j]) % moduli[j]`` (no division for a divisor of 1, no modulus for
    a modulus of 0): quotient-remainder, mixed-radix digits and Chinese remainders are all of this form."""

    def __init__(self, divisors: List[int], moduli: List[int]) -> None:
        super().__init__()
        if len(divisors) != len(moduli) or not divisors:
            raise ValueError(f"one divisor and one modulus per partition, got {divisors} and {moduli}")
        self.divisors = list(divisors)
        self.moduli = list(moduli)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``LongTensor[k, n]``: the class of each id in each partition."""
        ids = ids.to(torch.int64)
        classes: List[torch.Tensor] = []
        for j in range(len(self.divisors)):
            c = ids if self.divisors[j] == 1 else torch.div(ids, self.divisors[j], rounding_mode="floor")
            classes.append(c if self.moduli[j] == 0 else c % self.moduli[j])
        return torch.stack(classes)


class LookupIndexer(nn.Module):
    """Class j of an id is ``class_maps[j, id]`` (explicit maps). The maps are a non-persistent buffer: they
    follow the module's device and do not enter the state dict (the partition, part of the config, holds them)."""

    def __init__(self, class_maps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("class_maps", class_maps.to(torch.int64), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.class_maps.index_select(1, ids.to(torch.int64))


class HotIdsIndexer(nn.Module):
    """``HotIds.indices``: hot ids by a sorted search, the tail through the base scheme's indexer on tail ranks.
    ``hot_ids`` is held by reference (non-persistent), so a hot-id list loaded into the collection is seen."""

    def __init__(self, hot_ids: torch.Tensor, base: nn.Module) -> None:
        super().__init__()
        self.register_buffer("hot_ids", hot_ids, persistent=False)
        self.base = base

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        hot = self.hot_ids
        pos = torch.searchsorted(hot, ids)
        is_hot = hot[pos.clamp(max=hot.numel() - 1)] == ids
        tail = self.base(torch.where(is_hot, torch.zeros_like(ids), ids - pos))
        first = torch.where(is_hot, pos, tail[0] + hot.numel())
        rest = torch.where(is_hot.unsqueeze(0), torch.zeros_like(tail[1:]), tail[1:] + 1)
        return torch.cat([first.unsqueeze(0), rest])
