"""The experiment sweep: grid expansion, summary parsing, CSV/markdown/plot writers, and one tiny real run."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.report import aggregate, plot_pareto, welch_z, write_markdown
from experiments.runs import RunRecord, read_csv, record_from_summary, run_setting, write_csv
from experiments.settings import Grid, Setting, expand_grid, supported_combines
from torchrec_qr.train.config import load_config, validate


def _record(method: str, c: int | None, seed: int, loss: float, params: int, threshold: int | None = 200) -> RunRecord:
    label = Setting(method, c, threshold or 0).label
    return RunRecord(
        setting=label,
        method=method,
        collisions=c,
        threshold=threshold,
        seed=seed,
        params=params,
        param_bytes=4 * params,
        optimizer_bytes=params // 4,
        compression=1.0,
        test_log_loss=loss,
        test_ne=loss / 0.57,
        test_auc=0.75,
        test_accuracy=0.77,
        samples_per_s=1e4,
        train_seconds=9.0,
        steps=10,
        world_size=1,
        run_dir="runs/x",
    )


def _fake_records() -> list[RunRecord]:
    out = []
    for seed, noise in enumerate((0.0, 0.001, -0.001)):
        out.append(_record("full", None, seed, 0.450 + noise, 1_000_000, None))
        for c, base in ((4, 0.470), (60, 0.500)):
            out.append(_record("hash", c, seed, base + noise, 1_000_000 // c))
            out.append(_record("qr-mult", c, seed, base - 0.01 + noise / 2, 1_000_000 // c + 100))
    return out


def test_grids_validate_in_the_training_app():
    """Every setting's overrides load and pass the app's checks (catches renamed keys before a sweep)."""
    for quick in (True, False):
        grid = expand_grid(quick)
        labels = [s.label for s in grid.settings]
        assert len(labels) == len(set(labels))
        assert {"full", "hash", "qr-mult", "qr-add", "qr-concat", "mixed-radix-3", "crt-2"} <= {
            s.method for s in grid.settings
        }
        for s in grid.settings:
            cfg = load_config("configs/synthetic_full.yaml", [*grid.common, *s.overrides()])
            validate(cfg, world_size=1, cuda_available=False)
    default = expand_grid(False)
    assert default.seeds == (0, 1, 2)
    assert [s.collisions for s in default.settings if s.method == "hash" and s.threshold == 200] == [2, 4, 8, 60]


def test_path_follows_the_app_and_seeds_override():
    assert ("qr-path" in {s.method for s in expand_grid(True).settings}) == ("path" in supported_combines())
    assert "qr-path" not in {s.method for s in expand_grid(True, combines=("add",)).settings}
    assert expand_grid(True, seeds=4).seeds == (0, 1, 2, 3)
    assert expand_grid(True, data="criteo").common == ()


def test_record_from_summary():
    summary = {
        "metrics": {"test": {"log_loss": 0.45, "ne": 0.8, "auc": 0.77, "accuracy": 0.78}},
        "memory": {"param_bytes": 4000, "optimizer_bytes": 250, "compression": 3.5},
        "samples_per_s": 1234.0,
        "train_seconds": 5.0,
        "steps": 7,
        "world_size": 2,
        "run_dir": "runs/r",
    }
    r = record_from_summary(Setting("qr-add", 4), 3, summary)
    assert (r.setting, r.params, r.optimizer_bytes, r.test_log_loss, r.seed, r.threshold) == (
        "qr-add-c4-t200",
        1000,
        250,
        0.45,
        3,
        200,
    )
    assert record_from_summary(Setting("full"), 0, summary).threshold is None


def test_aggregate_and_welch_z():
    aggs = {a.setting: a for a in aggregate(_fake_records())}
    assert aggs["full"].seeds == 3 and aggs["full"].log_loss == pytest.approx(0.450)
    assert aggs["full"].log_loss_std == pytest.approx(0.001)
    z = welch_z(aggs["qr-mult-c4-t200"], aggs["hash-c4-t200"])  # hash worse by 0.01: positive
    assert z == pytest.approx(0.01 / math.sqrt(0.001**2 / 3 + 0.0005**2 / 3))
    one = aggregate([_record("hash", 4, 0, 0.5, 10), _record("qr-mult", 4, 0, 0.4, 10)])
    assert math.isnan(welch_z(one[1], one[0]))


def test_csv_roundtrip_markdown_and_plot(tmp_path: Path):
    records = _fake_records()
    write_csv(records, tmp_path / "r.csv")
    assert read_csv(tmp_path / "r.csv") == records
    write_markdown(records, tmp_path / "r.md", "Fake", ["note"])
    text = (tmp_path / "r.md").read_text()
    assert "| qr-mult-c4-t200 | 4 | 200 | 3 | 250,100 |" in text
    assert "0.4600 ± 0.0005" in text and "+2.22%" in text  # qr-mult c=4 mean and its gap to full
    assert "| 4 | 200 | qr-mult | 1.000x | +0.01000 |" in text
    plot_pareto(records, tmp_path / "p.png", "fake", {"Bayes-optimal": 0.4})
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_real_run(tmp_path: Path):
    """One hash run through the training app on a tiny generated set, then reused from its summary."""
    cards = "[" + ",".join(str(10 + 40 * i) for i in range(26)) + "]"
    grid = Grid(
        "tiny",
        (Setting("hash", 4),),
        (0,),
        (
            "data.synthetic.num_rows=2000",
            "data.synthetic.num_days=3",
            f"data.synthetic.cardinalities={cards}",
            "data.global_batch_size=256",
            "data.eval_batch_size=1024",
            "model.dense_arch_layer_sizes=[32,16]",
            "model.over_arch_layer_sizes=[32,1]",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
    )
    rec = run_setting(grid.settings[0], 0, grid, "configs/synthetic_full.yaml", tmp_path / "runs", nproc=1, timeout=300)
    assert rec is not None and rec.steps == 15 and 0.3 < rec.test_log_loss < 0.8
    assert rec.params < 16 * sum(10 + 40 * i for i in range(26))  # tables above 200 rows were hashed
    again = run_setting(grid.settings[0], 0, grid, "configs/synthetic_full.yaml", tmp_path / "runs", nproc=1)
    assert again == rec


def test_script_and_deprecated_module_entry_points(tmp_path: Path):
    """``python experiments/grid.py`` runs from any directory; ``torchrec_qr.experiments`` warns and delegates."""
    root = Path(__file__).resolve().parents[1]
    records = _fake_records()
    write_csv(records, tmp_path / "results_quick.csv")
    for command in (
        [sys.executable, str(root / "experiments" / "grid.py")],
        [sys.executable, "-m", "torchrec_qr.experiments"],
    ):
        proc = subprocess.run(
            [*command, "--quick", "--report-only", "--out", str(tmp_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "results_quick.md").exists() and (tmp_path / "pareto_quick.png").exists()
        assert ("deprecated" in proc.stderr) == ("torchrec_qr.experiments" in command)
    sys.modules.pop("torchrec_qr.experiments", None)
    with pytest.warns(DeprecationWarning, match="experiments/grid.py"):
        old = importlib.import_module("torchrec_qr.experiments")
    assert old.Setting is Setting and old.run_setting is run_setting and old.write_csv is write_csv
