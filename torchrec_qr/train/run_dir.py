"""The run directory: where it is, whether it is ours, who holds it, and what resuming it may change.

A run lives in ``<run.output_dir>/<run.name>`` (one path component, so it always stays inside
``output_dir``) and is marked as ours by ``RUN_MARKER``; ``run.overwrite`` removes only such a directory.
One job at a time holds a run: rank 0 takes an ``fcntl`` lock on ``<output_dir>/.<name>.lock`` before
anything reads or writes the run, and the kernel releases it when the process dies, so a crashed job
leaves no stale lock. Resuming compares the run's stored ``config.yaml`` with the new config and refuses
changes that alter training unless they are named in ``--allow-config-change``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from torchrec_qr.distributed.checkpoint import list_checkpoints
from torchrec_qr.train.config import ConfigError, TrainingConfig, config_to_dict

__all__ = [
    "RUN_MARKER",
    "RunLock",
    "check_run_dir",
    "checkpoint_root",
    "config_changes",
    "is_restart",
    "mark_run_dir",
    "remove_previous_run",
    "run_dir",
]

logger = logging.getLogger(__name__)

RUN_MARKER = ".torchrec_qr_run"
# Keys that change where outputs go, how often they are written or how the model is laid out, never the
# trained weights and metrics: resuming may change them freely. Every other key alters training.
_FREE_KEYS = (
    "run.name",
    "run.output_dir",
    "run.device",
    "run.overwrite",
    "run.progress_bar",
    "run.tensorboard",
    "run.fail_at_step",
    "data.cache_dir",
    "data.criteo_path",
    "data.eval_batch_size",
    "data.limit_eval_rows",
    "train.epochs",
    "train.max_steps",
    "train.eval_every_steps",
    "train.eval_max_batches",
    "train.log_every_steps",
    "checkpoint",
    "sharding",
)


def run_dir(cfg: TrainingConfig) -> Path:
    """``<output_dir>/<name>``; the name must be one plain path component (it cannot leave output_dir)."""
    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise ConfigError(
            f"run.name: {name!r} is not a plain directory name; a run lives in <run.output_dir>/<run.name>, so "
            "give a name without '/' that is not empty, '.' or '..'"
        )
    return Path(cfg.run.output_dir) / name


def checkpoint_root(cfg: TrainingConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def is_restart() -> bool:
    """Whether torchrun restarted this worker group after a failure (then the run always resumes)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def mark_run_dir(path: Path) -> None:
    """Create ``path`` and mark it as a run of ours (what ``run.overwrite`` checks before removing it)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(json.dumps({"format": 1}) + "\n")


def _is_ours(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def remove_previous_run(cfg: TrainingConfig) -> None:
    """``run.overwrite``: remove the run directory (only if it is ours) and the checkpoints of a separate
    ``checkpoint.dir`` (only its ``step_*`` entries: the directory may hold other things)."""
    out = run_dir(cfg)
    if out.exists():
        if not _is_ours(out):
            raise ConfigError(_not_ours(out))
        shutil.rmtree(out)
    if cfg.checkpoint.dir:
        root = Path(cfg.checkpoint.dir)
        for entry in (list(root.glob("step_*")) + list(root.glob(".step_*.tmp"))) if root.is_dir() else []:
            shutil.rmtree(entry)


def _not_ours(out: Path) -> str:
    return (
        f"run.name: {out} exists but is not a torchrec_qr run directory (no {RUN_MARKER} file), so it is neither "
        "resumed, written into nor removed by run.overwrite; choose another run.name or run.output_dir"
    )


def check_run_dir(cfg: TrainingConfig, allow_changes: list[str] = ()) -> None:
    """Refuse to mix a fresh run into an old one, resume nothing, replace a directory that is not a run, or
    resume with a config that trains differently; runs before any process group (under ``RunLock``)."""
    out = run_dir(cfg)
    if out.exists() and any(out.iterdir()) and not _is_ours(out):
        raise ConfigError(_not_ours(out))
    found = list_checkpoints(checkpoint_root(cfg))
    if cfg.checkpoint.resume and not found and not is_restart():
        raise ConfigError(
            f"checkpoint.resume: no checkpoint under {checkpoint_root(cfg)}; start without --resume, or set "
            "run.name / checkpoint.dir to the run to continue"
        )
    fresh = not cfg.checkpoint.resume and not cfg.run.overwrite and not is_restart()
    if fresh and (found or (out.exists() and any(p.name != RUN_MARKER for p in out.iterdir()))):
        latest = f"latest checkpoint {found[-1].name}" if found else "no checkpoint yet"
        raise ConfigError(
            f"run.name: {out} already holds a run ({latest}); continue it with --resume, replace it with "
            "run.overwrite=true, or choose another run.name"
        )
    stored = out / "config.yaml"
    if (cfg.checkpoint.resume or is_restart()) and found and stored.is_file():
        _check_resume_config(stored, cfg, allow_changes)


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old, new) for every leaf of ``new`` that differs from ``old``; a key the stored config
    lacks (it predates the key) has its default there. Keys only ``old`` has no longer exist: ignored."""
    out: dict[str, tuple[Any, Any]] = {}
    for key, b in new.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        a = old.get(key, defaults.get(key))
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, defaults.get(key) or {}, path))
        elif a != b:
            out[path] = (a, b)
    return out


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out += _leaf_keys(value, path) if isinstance(value, dict) else [path]
    return out


def _covered(key: str, names: list[str] | tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _check_resume_config(stored: Path, cfg: TrainingConfig, allow_changes: list[str]) -> None:
    try:
        old = yaml.safe_load(stored.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{stored}: the stored config of the run is not valid YAML ({e}); restore it to resume"
        ) from e
    if not isinstance(old, dict):
        raise ConfigError(f"{stored}: the stored config of the run is not a mapping; restore it to resume")
    new, defaults = (yaml.safe_load(yaml.safe_dump(config_to_dict(c))) for c in (cfg, TrainingConfig()))
    changes = config_changes(old, new, defaults)  # compared as stored: tuples become lists
    keys = _leaf_keys(new)
    unknown = [n for n in allow_changes if not any(_covered(k, [n]) for k in keys)]
    if unknown:
        raise ConfigError(f"--allow-config-change: {unknown} name no config key (keys look like run.seed)")
    refused = {k: v for k, v in changes.items() if not _covered(k, _FREE_KEYS) and not _covered(k, allow_changes)}
    if refused:
        listing = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"checkpoint.resume: the config differs from the run's {stored} in settings that change training:\n  "
            f"{listing}\nresume with the same values, or name them in --allow-config-change "
            f"{','.join(refused)} to continue with the new ones"
        )
    allowed = [k for k in changes if _covered(k, allow_changes)]
    if allowed:
        logger.warning("resuming %s with changed settings (allowed): %s", stored.parent, ", ".join(allowed))


class RunLock:
    """An exclusive lock on a run, held by one process (rank 0) from before the checks to the end.

    ``fcntl.flock`` on ``<output_dir>/.<name>.lock``: released by the kernel when the holder exits or is
    killed, so it can never go stale; the file records the holder (pid, host, start time) for the error.
    A torchrun restart waits ``wait_s`` for the killed holder to be gone.
    """

    def __init__(self, cfg: TrainingConfig, wait_s: float = 0.0) -> None:
        out = run_dir(cfg)
        self.path = out.parent / f".{out.name}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                    os.close(self._fd)
                    raise ConfigError(
                        f"run.name: {out} is in use by another job ({holder}); wait for it to finish, or "
                        "choose another run.name"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()
