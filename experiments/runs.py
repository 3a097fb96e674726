"""Grid points as runs of the training app: one subprocess per (setting, seed), its ``summary.json`` as a
CSV row. A run whose summary exists is reused, so an interrupted sweep continues where it stopped."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from experiments.settings import Grid, Setting

__all__ = ["ROOT", "RunRecord", "read_csv", "record_from_summary", "run_setting", "write_csv"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_FLOAT = 4


@dataclass
class RunRecord:
    """One finished run: what was stored and how well it predicted the test split."""

    setting: str
    method: str
    collisions: int | None
    threshold: int | None
    seed: int
    params: int  # embedding parameters (floats) over all tables
    param_bytes: int
    optimizer_bytes: int
    compression: float
    test_log_loss: float
    test_ne: float
    test_auc: float
    test_accuracy: float
    samples_per_s: float
    train_seconds: float
    steps: int
    world_size: int
    run_dir: str


def record_from_summary(setting: Setting, seed: int, summary: dict) -> RunRecord:
    """The CSV row of a run, from the training app's ``summary.json``."""
    test, mem = summary["metrics"]["test"], summary["memory"]
    return RunRecord(
        setting=setting.label,
        method=setting.family,
        collisions=setting.collisions,
        threshold=None if setting.method == "full" else setting.threshold,
        seed=seed,
        params=int(mem["param_bytes"]) // BYTES_PER_FLOAT,
        param_bytes=int(mem["param_bytes"]),
        optimizer_bytes=int(mem["optimizer_bytes"]),
        compression=float(mem["compression"]),
        test_log_loss=test["log_loss"],
        test_ne=test["ne"],
        test_auc=test["auc"],
        test_accuracy=test["accuracy"],
        samples_per_s=summary["samples_per_s"],
        train_seconds=summary["train_seconds"],
        steps=summary["steps"],
        world_size=summary["world_size"],
        run_dir=summary["run_dir"],
    )


def _command(config: str, overrides: list[str], nproc: int) -> list[str]:
    launcher = (
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return [*launcher, "-m", "torchrec_qr.train", "--config", config, *overrides]


def run_setting(
    setting: Setting,
    seed: int,
    grid: Grid,
    config: str,
    runs_dir: Path,
    nproc: int,
    extra: Sequence[str] = (),
    timeout: float = 1800.0,
    attempts: int = 2,
) -> RunRecord | None:
    """Train one (setting, seed) through the app unless its summary exists; None if every attempt failed.

    Success is judged by ``summary.json`` rather than the exit code: torchrun occasionally aborts at exit
    after all work is done.
    """
    out = runs_dir / grid.name
    run_dir = out / f"{setting.label}-s{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return record_from_summary(setting, seed, json.loads(summary_path.read_text()))
    overrides = [
        *grid.common,
        *setting.overrides(),
        f"run.seed={seed}",
        f"run.output_dir={out}",
        f"run.name={run_dir.name}",
        "run.overwrite=true",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "checkpoint.at_end=false",
        *extra,
    ]
    # One thread per process: on a shared CPU, OpenMP threads that spin-wait for a busy core made runs
    # 10-15x slower than single-threaded ones.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(1, attempts + 1):
        start = time.perf_counter()
        proc = subprocess.run(
            _command(config, overrides, nproc), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if summary_path.exists():
            logger.info("%s seed %d: %.0f s", setting.label, seed, time.perf_counter() - start)
            return record_from_summary(setting, seed, json.loads(summary_path.read_text()))
        logger.warning(
            "%s seed %d attempt %d failed (exit %d): %s",
            setting.label,
            seed,
            attempt,
            proc.returncode,
            proc.stderr.strip().splitlines()[-5:],
        )
    return None


def write_csv(records: Sequence[RunRecord], path: Path) -> None:
    names = [f.name for f in fields(RunRecord)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in records:
            w.writerow(asdict(r))


def read_csv(path: Path) -> list[RunRecord]:
    """Records back from ``write_csv`` (to redraw tables and plots without rerunning)."""
    types = typing.get_type_hints(RunRecord)
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for name, text in row.items():
                tp = types[name]
                base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
                values[name] = None if text == "" and base is not str else base(text)
            out.append(RunRecord(**values))
    return out
