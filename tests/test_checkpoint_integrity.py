"""Damaged checkpoints are named, never loaded: flipped bytes, truncated or missing pieces, a bad meta.json.

The reference is the saved file itself: each test damages one file the way a disk or a user would, and
expects ``CheckpointCorrupt`` naming that file; ``latest_intact_checkpoint`` falls back past it (with a
warning) or, strict, refuses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

from torchrec_qr.distributed.checkpoint import (
    CheckpointCorrupt,
    CheckpointWriteError,
    latest_intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def _flip(file: Path, count: int = 64) -> None:
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + count, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _two_checkpoints(root: Path) -> tuple[Path, Path, torch.Tensor]:
    """Two checkpoints of different weights; returns the first one's weight."""
    model = _model()
    first = save_checkpoint(root, 1, model)
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    return first, save_checkpoint(root, 2, model), weight


def _distcp(path: Path) -> Path:
    return max(path.glob("__0_*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda p: _flip(_distcp(p)), r"__0_0\.distcp does not match its SHA-256"),
        (lambda p: _truncate(_distcp(p)), r"__0_0\.distcp has \d+ bytes, \d+ were written \(truncated\?\)"),
        (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
        (lambda p: _truncate(p / ".metadata"), r"\.metadata has \d+ bytes"),
        (lambda p: _truncate(p / "extra_rank_00000.pt"), r"extra_rank_00000\.pt has \d+ bytes"),
        (lambda p: (p / "meta.json").unlink(), r"meta\.json is missing"),
        (lambda p: (p / "meta.json").write_text("{not json"), r"meta\.json is unreadable"),
        (
            lambda p: (p / "meta.json").write_text((p / "meta.json").read_text().replace('"step": 2', '"step": 3')),
            r"meta\.json does not match its checksum",
        ),
    ],
)
def test_damage_is_named_and_resume_falls_back(tmp_path: Path, caplog, damage, named: str) -> None:
    first, second, weight = _two_checkpoints(tmp_path)
    damage(second)
    with pytest.raises(CheckpointCorrupt, match=rf"^checkpoint {second} is damaged: .*{named}"):
        load_checkpoint(second, _model(1))
    with caplog.at_level(logging.WARNING, logger="torchrec_qr"):
        assert latest_intact_checkpoint(tmp_path) == first
    assert f"falling back to {first}: checkpoint {second} is damaged" in caplog.text
    with pytest.raises(CheckpointCorrupt, match=r"not falling back to an older checkpoint \(strict\)"):
        latest_intact_checkpoint(tmp_path, strict=True)
    restored = _model(1)
    load_checkpoint(first, restored)  # the older one is intact and loads exactly
    assert torch.equal(restored[0].weight, weight)


def test_intact_checkpoints_verify_and_every_damaged_one_is_an_error(tmp_path: Path) -> None:
    assert latest_intact_checkpoint(tmp_path) is None
    first, second, _ = _two_checkpoints(tmp_path)
    assert latest_intact_checkpoint(tmp_path) == second
    files = json.loads((second / "meta.json").read_text())["files"]
    assert set(files) == {p.name for p in second.iterdir() if p.name != "meta.json"}
    _flip(_distcp(first))
    _flip(_distcp(second))
    with pytest.raises(CheckpointCorrupt, match=rf"^no intact checkpoint under {tmp_path}: checkpoint {second}"):
        latest_intact_checkpoint(tmp_path)


def _verify_on_two_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    model = _model()
    path = save_checkpoint(root, 5, model)
    verify_checkpoint(path)
    dist.barrier()
    if rank == 0:
        _flip(_distcp(path))
    dist.barrier()
    try:
        verify_checkpoint(path)
    except CheckpointCorrupt as e:
        return {"error": str(e)}
    return {"error": None}


def test_every_rank_reaches_the_same_verdict(tmp_path: Path) -> None:
    results = run_ranks(_verify_on_two_ranks, 2, str(tmp_path), timeout=120.0)
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1] and "__0_0.distcp does not match its SHA-256" in errors[0]


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "where", ["torch.distributed.checkpoint.filesystem._write_item", "torchrec_qr.distributed.checkpoint._write_synced"]
)
def test_disk_full_is_named_and_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch, where: str) -> None:
    first = save_checkpoint(tmp_path, 1, _model())
    monkeypatch.setattr(where, _disk_full)
    with pytest.raises(
        CheckpointWriteError,
        match=r"step_000002 not written \(earlier checkpoints are intact\): "
        r"rank 0: .*No space left on device.*\(ENOSPC: the disk holding",
    ):
        save_checkpoint(tmp_path, 2, _model())
    monkeypatch.undo()
    assert latest_intact_checkpoint(tmp_path) == first and not (tmp_path / "step_000002").exists()
