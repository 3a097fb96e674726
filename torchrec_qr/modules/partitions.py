"""Complementary partitions of an id set (Shi et al., KDD 2020, §3).

A partition scheme maps every id in ``[0, N)`` to one class per partition; the k classes index k small
sub-tables. The scheme is *complementary* when no two ids share all k classes, so every id gets a unique
combination of sub-table rows. All arithmetic is exact int64 (the DLRM reference divides in float and
collides ids above 2**24).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from torchrec_qr.modules.partition_indexers import DivModIndexer, HotIdsIndexer, LookupIndexer

__all__ = [
    "Partition",
    "QuotientRemainder",
    "MixedRadix",
    "ChineseRemainder",
    "ExplicitPartitions",
    "HotIds",
    "balanced_radices",
    "coprime_moduli",
]

MAX_NUM_EMBEDDINGS = 2**62


def _check_num_embeddings(num_embeddings: int) -> None:
    if not isinstance(num_embeddings, int) or isinstance(num_embeddings, bool):
        raise TypeError(f"num_embeddings must be an int, got {type(num_embeddings).__name__}")
    if not 0 < num_embeddings <= MAX_NUM_EMBEDDINGS:
        raise ValueError(f"num_embeddings must be in [1, 2**62], got {num_embeddings}")


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(values)
    if len(out) == 0:
        raise ValueError(f"{name} must not be empty")
    for v in out:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be positive ints, got {list(out)}")
    return out


class Partition(abc.ABC):
    """A scheme of k partitions; ``indices(ids)[j]`` is each id's class (sub-table row) in partition j."""

    @abc.abstractmethod
    def sizes(self, num_embeddings: int) -> list[int]:
        """Number of classes (sub-table rows) of each partition for a table of ``num_embeddings`` rows."""

    @abc.abstractmethod
    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        """``LongTensor[k, n]``: the class of each id in each partition."""

    @property
    @abc.abstractmethod
    def num_partitions(self) -> int:
        """k, the number of sub-tables."""

    def indexer(self) -> nn.Module:
        """A TorchScript-able module computing ``indices(ids)`` (``[n] -> LongTensor[k, n]``) for the scripted
        and exported inference path (see ``partition_indexers``); a scheme without one serves eager only."""
        raise NotImplementedError(
            f"{type(self).__name__} has no scriptable indexer: implement {type(self).__name__}.indexer() "
            "(e.g. with torchrec_qr.modules.partition_indexers) to script or export modules using it"
        )

    def row_split(self) -> tuple[int, int] | None:
        """``(j, stride)`` when partition j's class is ``id // stride`` (rows of j follow id blocks).

        Row-wise sharding uses it: a block of ``stride``-aligned ids then owns a contiguous, disjoint range
        of sub-table j, and every other class depends only on ``id % stride``. None: no such partition
        (row-wise sharding then replicates every sub-table).
        """
        return None

    def validate(self, num_embeddings: int) -> None:
        """Raise ``ValueError`` naming a colliding id pair if the partitions are not complementary on N."""
        _check_num_embeddings(num_embeddings)
        self.sizes(num_embeddings)  # the scheme's own errors (e.g. a class map of the wrong length) first
        pair = self._collision(num_embeddings)
        if pair is not None:
            a, b = pair
            raise ValueError(
                f"{self!r} is not complementary for num_embeddings={num_embeddings}: ids {a} and {b} "
                f"map to the same classes {self.indices(torch.tensor([a])).flatten().tolist()}; "
                f"{self._fix_hint(num_embeddings)}"
            )

    def _collision(self, num_embeddings: int) -> tuple[int, int] | None:
        """A colliding pair, found by enumeration: only for schemes with no closed-form check."""
        ids = torch.arange(num_embeddings, dtype=torch.int64)
        idx = self.indices(ids)
        key = torch.zeros(num_embeddings, dtype=torch.int64)
        for row, size in zip(idx, self.sizes(num_embeddings)):
            key = key * size + row
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        dup = torch.nonzero(sorted_key[1:] == sorted_key[:-1]).flatten()
        if dup.numel() == 0:
            return None
        i = int(dup[0])
        return int(order[i]), int(order[i + 1])

    def _fix_hint(self, num_embeddings: int) -> str:
        return "choose partitions whose class combinations are unique"


@dataclass(frozen=True)
class QuotientRemainder(Partition):
    """The paper's QR trick: ``(id // collisions, id % collisions)``; sizes ``[ceil(N/c), c]``."""

    collisions: int

    def __post_init__(self) -> None:
        _positive_ints("collisions", [self.collisions])

    @property
    def num_partitions(self) -> int:
        return 2

    def sizes(self, num_embeddings: int) -> list[int]:
        _check_num_embeddings(num_embeddings)
        # c > N: ids < N only reach remainders < N, so the remainder table needs at most N rows.
        return [-(-num_embeddings // self.collisions), min(self.collisions, num_embeddings)]

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        return torch.stack([torch.div(ids, self.collisions, rounding_mode="floor"), ids % self.collisions])

    def indexer(self) -> nn.Module:
        return DivModIndexer([self.collisions, 1], [0, self.collisions])

    def _collision(self, num_embeddings: int) -> tuple[int, int] | None:
        return None  # (q, r) determines id = q*c + r

    def row_split(self) -> tuple[int, int] | None:
        return (0, self.collisions)


@dataclass(frozen=True)
class MixedRadix(Partition):
    """Generalized QR: the digits of id in the mixed radix ``radices`` (least significant first).

    Partition j has ``radices[j]`` classes; complementary iff ``prod(radices) >= N``.
    """

    radices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "radices", _positive_ints("radices", self.radices))

    @property
    def num_partitions(self) -> int:
        return len(self.radices)

    def sizes(self, num_embeddings: int) -> list[int]:
        _check_num_embeddings(num_embeddings)
        sizes, stride = [], 1
        for r in self.radices:
            sizes.append(min(r, -(-num_embeddings // stride)))
            stride *= r
        return sizes

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        rest = ids.to(torch.int64)
        digits = []
        for r in self.radices:
            digits.append(rest % r)
            rest = torch.div(rest, r, rounding_mode="floor")
        return torch.stack(digits)

    def indexer(self) -> nn.Module:
        """Digit j is ``(id // prod(radices[:j])) % radices[j]``."""
        return DivModIndexer([math.prod(self.radices[:j]) for j in range(len(self.radices))], list(self.radices))

    def row_split(self) -> tuple[int, int] | None:
        """The top digit: ``id // prod(radices[:-1])`` (exact below the scheme's period, as validated)."""
        return (len(self.radices) - 1, math.prod(self.radices[:-1]))

    def _collision(self, num_embeddings: int) -> tuple[int, int] | None:
        period = math.prod(self.radices)
        return (0, period) if period < num_embeddings else None

    def _fix_hint(self, num_embeddings: int) -> str:
        return (
            f"the product of the radices must be >= num_embeddings, e.g. "
            f"MixedRadix.balanced({num_embeddings}, {len(self.radices)})"
        )

    @staticmethod
    def balanced(num_embeddings: int, k: int) -> MixedRadix:
        """k radices near ``N ** (1/k)`` whose product covers N."""
        return MixedRadix(tuple(balanced_radices(num_embeddings, k)))


@dataclass(frozen=True)
class ChineseRemainder(Partition):
    """``id % m_j`` for pairwise coprime moduli with ``prod(m) >= N`` (unique by the CRT)."""

    moduli: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "moduli", _positive_ints("moduli", self.moduli))

    @property
    def num_partitions(self) -> int:
        return len(self.moduli)

    def sizes(self, num_embeddings: int) -> list[int]:
        _check_num_embeddings(num_embeddings)
        return [min(m, num_embeddings) for m in self.moduli]

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        return torch.stack([ids % m for m in self.moduli])

    def indexer(self) -> nn.Module:
        return DivModIndexer([1] * len(self.moduli), list(self.moduli))

    def _collision(self, num_embeddings: int) -> tuple[int, int] | None:
        # Ids collide iff their difference is a multiple of lcm(moduli); the first pair is (0, lcm).
        lcm = math.lcm(*self.moduli)
        return (0, lcm) if lcm < num_embeddings else None

    def _fix_hint(self, num_embeddings: int) -> str:
        return (
            "use pairwise coprime moduli whose product is >= num_embeddings, e.g. "
            f"ChineseRemainder.balanced({num_embeddings}, {len(self.moduli)})"
        )

    @staticmethod
    def balanced(num_embeddings: int, k: int) -> ChineseRemainder:
        """k pairwise coprime moduli near ``N ** (1/k)`` whose product covers N."""
        return ChineseRemainder(tuple(coprime_moduli(num_embeddings, k)))


@dataclass(frozen=True, eq=False)
class ExplicitPartitions(Partition):
    """User-given id → class maps, e.g. naturally occurring attributes (brand, category, ...).

    ``class_maps[j][id]`` is the class of ``id`` in partition j; each map covers every id of the table.
    """

    class_maps: tuple[torch.Tensor, ...] = field(default=())

    def __post_init__(self) -> None:
        maps = tuple(torch.as_tensor(m, dtype=torch.int64) for m in self.class_maps)
        if len(maps) == 0:
            raise ValueError("ExplicitPartitions needs at least one class map")
        n = maps[0].numel()
        for j, m in enumerate(maps):
            if m.dim() != 1 or m.numel() != n:
                raise ValueError(f"class map {j} must be 1-D with {n} entries (one per id), got {tuple(m.shape)}")
            if m.numel() and int(m.min()) < 0:
                raise ValueError(f"class map {j} has negative classes; classes must be in [0, num_classes)")
        object.__setattr__(self, "class_maps", maps)

    @property
    def num_partitions(self) -> int:
        return len(self.class_maps)

    def sizes(self, num_embeddings: int) -> list[int]:
        _check_num_embeddings(num_embeddings)
        if num_embeddings != self.class_maps[0].numel():
            raise ValueError(
                f"ExplicitPartitions covers {self.class_maps[0].numel()} ids but the table has "
                f"num_embeddings={num_embeddings}; give one class per id"
            )
        return [int(m.max()) + 1 for m in self.class_maps]

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        return torch.stack([m.to(ids.device)[ids] for m in self.class_maps])

    def indexer(self) -> nn.Module:
        return LookupIndexer(torch.stack(self.class_maps))

    def __repr__(self) -> str:
        return f"ExplicitPartitions(num_ids={self.class_maps[0].numel()}, k={self.num_partitions})"


@dataclass(frozen=True, eq=False)
class HotIds(Partition):
    """Frequency-aware partitions: the K most frequent ids keep rows of their own, the tail is composed.

    In click data a few ids carry most of the traffic; under plain QR they still share rows with thousands
    of tail ids. Here partition 1 gives hot id ``hot_ids[i]`` class ``i`` and every other id
    ``K + base class 1`` of its *tail rank* ``t = id - #{hot ids < id}`` (its position among the non-hot ids);
    every later partition puts all hot ids in class 0 and a tail id in ``1 + base class j`` of ``t``. Sizes
    are ``[K + b_1, b_2 + 1, ...]`` with ``b = base.sizes(N - K)``. Partition 1 alone separates the hot ids
    from each other and from the tail, so the scheme is complementary exactly when ``base`` is on the
    ``N - K`` tail ranks; the extra class keeps hot ids off every row a tail id uses.

    ``indices`` finds each id by ``torch.searchsorted`` in the sorted hot-id tensor (no host sync, no
    data-dependent Python branches, so the forward stays fx-traceable). A collection holding the table keeps
    that tensor as a buffer (``_hot_ids.{table}``), so state dicts and DCP checkpoints carry the list and
    loading one restores the mapping it was trained with. Row-wise sharding is not supported: hot ids sit
    anywhere in ``[0, N)``, so no block of ids owns a contiguous range of partition 1's rows.

    Args:
        hot_ids: the K ids (any order, no duplicates, ``0 <= id < N``) that get rows of their own.
        base: the scheme for the tail, sized for the ``N - K`` tail ranks (e.g. ``QuotientRemainder(8)``).

    Example::

        counts = torch.bincount(torch.randint(0, 1_000_000, (50_000,)) ** 2 // 1_000_000, minlength=1_000_000)
        scheme = HotIds(torch.topk(counts, 1000).indices, base=QuotientRemainder(collisions=60))
        scheme.sizes(1_000_000)  # [1000 + 16650, 61]: hot rows, tail quotients; tail remainders + 1
    """

    hot_ids: torch.Tensor
    base: Partition

    def __post_init__(self) -> None:
        if not isinstance(self.base, Partition):
            raise TypeError(
                f"HotIds base must be a Partition (e.g. QuotientRemainder(8)), got {type(self.base).__name__}"
            )
        hot = torch.as_tensor(self.hot_ids)
        if hot.numel() == 0:
            raise ValueError("hot_ids is empty: use the base partition itself")
        if hot.is_floating_point() or hot.is_complex() or hot.dtype == torch.bool or hot.dim() != 1:
            raise TypeError(
                f"hot_ids must be a 1-D tensor or list of integer ids, got {hot.dtype} of shape {tuple(hot.shape)}"
            )
        hot = torch.sort(hot.to(device="cpu", dtype=torch.int64)).values
        if int(hot[0]) < 0:
            raise ValueError(f"hot_ids must be ids >= 0, got {int(hot[0])}")
        dup = torch.nonzero(hot[1:] == hot[:-1]).flatten()
        if dup.numel():
            raise ValueError(f"hot_ids lists id {int(hot[int(dup[0])])} more than once; give each hot id once")
        object.__setattr__(self, "hot_ids", hot)

    @property
    def num_hot(self) -> int:
        return self.hot_ids.numel()

    @property
    def num_partitions(self) -> int:
        return self.base.num_partitions

    def _check_fits(self, num_embeddings: int) -> None:
        _check_num_embeddings(num_embeddings)
        if self.num_hot >= num_embeddings:
            raise ValueError(
                f"{self!r} has {self.num_hot} hot ids for num_embeddings={num_embeddings}: every id would be hot; "
                "keep the table full (a plain EmbeddingBagConfig) or pass fewer hot ids"
            )
        if int(self.hot_ids[-1]) >= num_embeddings:
            raise ValueError(f"hot id {int(self.hot_ids[-1])} is out of range for num_embeddings={num_embeddings}")

    def sizes(self, num_embeddings: int) -> list[int]:
        self._check_fits(num_embeddings)
        base = self.base.sizes(num_embeddings - self.num_hot)
        return [self.num_hot + base[0]] + [s + 1 for s in base[1:]]

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        hot = self.hot_ids.to(ids.device)
        pos = torch.searchsorted(hot, ids)  # hot ids below each id; an id's own index if it is hot
        is_hot = hot[pos.clamp(max=hot.numel() - 1)] == ids
        tail = self.base.indices(torch.where(is_hot, 0, ids - pos))  # hot ids take tail rank 0, then are replaced
        first = torch.where(is_hot, pos, tail[0] + hot.numel())
        rest = torch.where(is_hot.unsqueeze(0), 0, tail[1:] + 1)
        return torch.cat([first.unsqueeze(0), rest])

    def indexer(self) -> nn.Module:
        return HotIdsIndexer(self.hot_ids, self.base.indexer())

    def validate(self, num_embeddings: int) -> None:
        self._check_fits(num_embeddings)
        super().validate(num_embeddings)

    def _collision(self, num_embeddings: int) -> tuple[int, int] | None:
        pair = self.base._collision(num_embeddings - self.num_hot)
        return None if pair is None else (self._tail_id(pair[0]), self._tail_id(pair[1]))

    def _tail_id(self, rank: int) -> int:
        """The id of tail rank ``rank``: ``hot_ids[i] - i`` tail ids lie below hot id i."""
        below = self.hot_ids - torch.arange(self.num_hot)
        return rank + int(torch.searchsorted(below, torch.tensor(rank), right=True))

    def _fix_hint(self, num_embeddings: int) -> str:
        return f"the base scheme must be complementary on the {num_embeddings - self.num_hot} tail ids: " + (
            self.base._fix_hint(num_embeddings - self.num_hot)
        )

    def _bind(self, hot_ids: torch.Tensor) -> None:
        """Use ``hot_ids`` (the owning collection's buffer, same values) from now on; see ``HotIdBuffers``."""
        object.__setattr__(self, "hot_ids", hot_ids)

    def __repr__(self) -> str:
        return f"HotIds(num_hot={self.num_hot}, base={self.base!r})"


def balanced_radices(num_embeddings: int, k: int) -> list[int]:
    """k radices, each ``ceil`` or ``floor`` of ``N ** (1/k)``, whose product is >= N."""
    _check_num_embeddings(num_embeddings)
    _positive_ints("k", [k])
    root = max(1, math.floor(round(num_embeddings ** (1.0 / k), 9)))
    while root > 1 and root**k > num_embeddings:  # the float root can overshoot above 2**53
        root -= 1
    radices = [root] * k
    i = 0
    while math.prod(radices) < num_embeddings:
        radices[i % k] += 1
        i += 1
    return radices


def coprime_moduli(num_embeddings: int, k: int) -> list[int]:
    """k pairwise coprime moduli near ``N ** (1/k)`` whose product is >= N (greedy upward search)."""
    _check_num_embeddings(num_embeddings)
    _positive_ints("k", [k])
    start = max(2, math.ceil(num_embeddings ** (1.0 / k)))
    while True:
        moduli: list[int] = []
        m = start
        while len(moduli) < k:
            if all(math.gcd(m, x) == 1 for x in moduli):
                moduli.append(m)
            m += 1
        if math.prod(moduli) >= num_embeddings:
            return moduli
        start += 1
