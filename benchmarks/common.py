"""Helpers the benchmarks share: the checkout they measure, batches, variant parsing, collective bytes."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["CollectiveCounter", "allocator_state", "git_state", "make_batches", "parse_variants"]


def git_state() -> str:
    """``<commit>[-dirty]`` of the checkout the library is imported from (results depend on it)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def allocator_state() -> str:
    """Whether glibc keeps freed memory for reuse and torch asks for huge pages (``launch/cpu_allocator.sh``):
    both change CPU step times a lot."""
    tuned = os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
    pages = "huge pages" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "4 KiB pages"
    return ("malloc tuned (launch/cpu_allocator.sh)" if tuned else "malloc default") + f", {pages}"


def make_batches(
    num_tables: int, rows: int, batch: int, ids_per_bag: int, count: int, seed: int, device: torch.device | None = None
) -> list[KeyedJaggedTensor]:
    """``count`` KJTs over features ``f0..`` with ``ids_per_bag`` uniform ids in ``[0, rows)`` per bag."""
    g = torch.Generator().manual_seed(seed)
    n = num_tables * batch * ids_per_bag
    return [
        KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(num_tables)],
            values=torch.randint(0, rows, (n,), generator=g).to(device),
            lengths=torch.full((num_tables * batch,), ids_per_bag, dtype=torch.int32).to(device),
        )
        for _ in range(count)
    ]


def parse_variants(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    variants = [v for v in text.split(",") if v]
    unknown = set(variants) - set(known)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {known}")
    return variants


# Collective -> the keyword naming the tensor(s) it sends (its 2nd positional argument, all_reduce's 1st).
_SENT_ARG = {
    "all_to_all_single": "input",
    "all_to_all": "input_tensor_list",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor",
    "all_reduce": "tensor",
}


class CollectiveCounter:
    """Counts bytes handed to ``torch.distributed`` collectives, by (phase, ids|emb), while installed."""

    def __init__(self) -> None:
        self.phase = "fwd"
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._originals: dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str) -> Callable[..., Any]:
        original = self._originals[name]
        position = 0 if name == "all_reduce" else 1

        def call(*args: Any, **kwargs: Any) -> Any:
            data = kwargs.get(_SENT_ARG[name], args[position] if len(args) > position else None)
            for t in data if isinstance(data, list) else [data]:
                if isinstance(t, torch.Tensor):
                    kind = "emb" if t.is_floating_point() else "ids"
                    self.bytes[f"{self.phase}_{kind}"] += t.numel() * t.element_size()
            self.calls[f"{self.phase}_{name}"] += 1
            return original(*args, **kwargs)

        return call

    def __enter__(self) -> CollectiveCounter:
        self.bytes.clear()
        self.calls.clear()
        for name in _SENT_ARG:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())
