"""The training app refuses to save or continue from bad state: divergence stops the run without a NaN
checkpoint, a damaged newest checkpoint is skipped (or, strict, refused), and a bad run name removes
nothing. One process (world size 1) on a tiny generated set, a few seconds a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[1]
CARDINALITIES = (
    "[10,12,15,20,30,40,50,70,100,130,170,220,300,400,500,700,900,1200,1600,2000,3000,4000,5000,7000,9000,12000]"
)


def _train(tmp: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torchrec_qr.train",
        "--config",
        str(ROOT / "configs" / "synthetic_qr_mult.yaml"),
        f"run.output_dir={tmp / 'runs'}",
        f"run.name={name}",
        f"data.cache_dir={tmp / 'cache'}",
        "run.progress_bar=false",
        "run.tensorboard=false",
        "data.synthetic.num_rows=3000",
        "data.synthetic.num_days=3",
        f"data.synthetic.cardinalities={CARDINALITIES}",
        "data.global_batch_size=256",
        "data.eval_batch_size=1024",
        "model.dense_arch_layer_sizes=[32,16]",
        "model.over_arch_layer_sizes=[32,1]",
        "train.eval_max_batches=1",
        "train.log_every_steps=4",
        "checkpoint.every_steps=8",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _steps(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.mark.parametrize("log_every", [4, 100])
def test_divergence_stops_the_run_without_a_nan_checkpoint(tmp_path: Path, log_every: int) -> None:
    # log_every=100 with a checkpoint after every step: the weights go non-finite before any logged loss does.
    every = 8 if log_every == 4 else 1
    proc = _train(
        tmp_path,
        "nan",
        "optimizer.sparse.lr=1e30",
        "optimizer.dense.lr=1e30",
        f"train.log_every_steps={log_every}",
        f"checkpoint.every_steps={every}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: step " in proc.stderr and "(last checkpoint: " in proc.stderr
    assert "NaN or infinite" in proc.stderr and "Lower optimizer.sparse.lr / optimizer.dense.lr" in proc.stderr
    run = tmp_path / "runs" / "nan"
    assert not (run / "summary.json").exists()
    if log_every == 4:
        assert _steps(run) == []  # diverged before the first checkpoint (step 8)
    for step in _steps(run):  # whatever was saved before the stop is finite
        dcp_to_torch_save(run / "checkpoints" / step, tmp_path / f"{step}.pt")
        state = torch.load(tmp_path / f"{step}.pt", weights_only=False)["model"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if isinstance(v, torch.Tensor)), step
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(loss is None or loss == loss for loss in losses)  # no NaN was ever logged


def _flip_largest_piece(checkpoint: Path) -> None:
    piece = max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(piece.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    piece.write_bytes(bytes(data))


def test_resume_skips_a_damaged_checkpoint_with_a_warning_or_refuses_when_strict(tmp_path: Path) -> None:
    first = _train(tmp_path, "r", "train.max_steps=16")
    run = tmp_path / "runs" / "r"
    assert _steps(run) == ["step_000008", "step_000016"], first.stderr[-3000:]
    assert _train(tmp_path, "ref", "train.max_steps=20").returncode == 0  # uninterrupted: what resuming must reproduce
    _flip_largest_piece(run / "checkpoints" / "step_000016")

    strict = _train(tmp_path, "r", "--resume", "train.max_steps=20", "checkpoint.strict_resume=true")
    assert strict.returncode == 1, strict.stderr[-3000:]
    assert "step_000016 is damaged" in strict.stderr and "does not match its SHA-256" in strict.stderr
    assert "(strict)" in strict.stderr and "Traceback" not in strict.stderr

    resumed = _train(tmp_path, "r", "--resume", "train.max_steps=20")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "falling back to" in resumed.stderr and "step_000008" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000008") and summary["steps_this_run"] == 12
    expected = json.loads((tmp_path / "runs" / "ref" / "summary.json").read_text())
    for split in ("val", "test"):
        assert summary["metrics"][split]["log_loss"] == pytest.approx(expected["metrics"][split]["log_loss"], abs=1e-5)


def test_bad_run_name_with_overwrite_removes_nothing(tmp_path: Path) -> None:
    (tmp_path / "runs" / "keep").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    for name in ("", "../x"):
        proc = _train(tmp_path, name, "run.overwrite=true")
        assert proc.returncode == 2 and "is not a plain directory name" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "keep").is_dir() and (tmp_path / "x").is_dir()


def test_resume_with_a_changed_seed_is_refused_unless_allowed(tmp_path: Path) -> None:
    assert _train(tmp_path, "s", "train.max_steps=8").returncode == 0
    refused = _train(tmp_path, "s", "--resume", "run.seed=7", "train.max_steps=12")
    assert refused.returncode == 2 and "run.seed: 0 -> 7" in refused.stderr, refused.stderr[-2000:]
    allowed = _train(tmp_path, "s", "--resume", "run.seed=7", "train.max_steps=12", "--allow-config-change", "run.seed")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    stored = (tmp_path / "runs" / "s" / "config.yaml").read_text()
    assert "seed: 7" in stored and json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())["steps"] == 12


def test_nonfinite_weights_are_found_by_name() -> None:
    from torchrec_qr.train.trainer import _nonfinite_entries

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    assert _nonfinite_entries(model) == []
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    assert _nonfinite_entries(model) == ["1.bias"]


def test_nan_in_the_dense_features_of_the_data_cache_stops_the_run(tmp_path: Path) -> None:
    assert _train(tmp_path, "clean", "train.max_steps=4").returncode == 0  # builds the data cache
    caches = sorted((tmp_path / "cache").glob("synthetic-*/cache/day_0*.dense.npy"))
    assert caches, "no data cache was written"
    dense = np.load(caches[0], mmap_mode="r+")
    dense[::7, 3] = np.nan
    dense.flush()
    del dense
    proc = _train(tmp_path, "dirty", "train.max_steps=12")
    assert proc.returncode == 1 and "the training loss is nan" in proc.stderr, proc.stderr[-3000:]
    assert "check the data for NaN or infinite dense features" in proc.stderr
    assert _steps(tmp_path / "runs" / "dirty") == []
