"""Checksums of checkpoint files, so a damaged checkpoint is named instead of loaded.

Every rank hashes the files it wrote (its ``__{rank}_*.distcp`` pieces and extras; rank 0 also DCP's
``.metadata``); rank 0 records size and SHA-256 of each in ``meta.json``, which is itself sealed with the
SHA-256 of its other content. Verifying splits the files over the ranks and gathers the findings, so every
rank reaches the same verdict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CheckpointCorrupt", "digest_files", "files_written_by", "read_meta", "seal", "verify_files"]

_CHUNK = 1 << 22
_SEAL = "meta_sha256"


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing, truncated or altered; the message names the file."""


def files_written_by(directory: Path, rank: int) -> list[str]:
    """The files ``rank`` wrote into a checkpoint directory being saved (DCP names pieces ``__{rank}_{i}``)."""
    own = [
        p.name
        for p in directory.iterdir()
        if p.is_file() and (p.name.startswith(f"__{rank}_") or p.name == f"extra_rank_{rank:05d}.pt")
    ]
    if rank == 0 and (directory / ".metadata").is_file():
        own.append(".metadata")
    return sorted(own)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def digest_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: _digest(directory / name) for name in names}


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != _SEAL}, sort_keys=True).encode()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the SHA-256 of its content added (detects a damaged ``meta.json``)."""
    return {**meta, _SEAL: hashlib.sha256(_canonical(meta)).hexdigest()}


def read_meta(path: Path, name: str) -> dict[str, Any]:
    """The checkpoint's ``meta.json``, or ``CheckpointCorrupt`` if it is missing, unreadable or altered."""
    file = path / name
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: {name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: {file} is unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: {file} is not a JSON object")
    if _SEAL in meta and meta[_SEAL] != hashlib.sha256(_canonical(meta)).hexdigest():
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: {file} does not match its checksum")
    return meta


def verify_files(
    path: Path,
    files: dict[str, dict[str, Any]],
    rank: int,
    world_size: int,
    gather: Callable[[Any], list[Any]],
) -> None:
    """Check size and SHA-256 of every recorded file (this rank checks every ``world_size``-th one);
    raises ``CheckpointCorrupt`` naming the first bad file, on every rank."""
    errors = []
    for name in sorted(files)[rank::world_size]:
        file = path / name
        if not file.is_file():
            errors.append(f"{file} is missing")
            continue
        actual = _digest(file)
        expected = files[name]
        if actual["size"] != expected["size"]:
            errors.append(f"{file} has {actual['size']} bytes, {expected['size']} were written (truncated?)")
        elif actual["sha256"] != expected["sha256"]:
            errors.append(f"{file} does not match its SHA-256 (altered on disk)")
    found = [e for rank_errors in gather(errors) for e in rank_errors]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: {found[0]}{more}")
