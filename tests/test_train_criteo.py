"""The Criteo source end to end, on generated files in Criteo's format (real rows may not be shipped).

One process (world size 1, no torchrun): a malformed line fails the run with file and line, or is skipped
and counted in the summary when ``data.skip_malformed`` is set. The skipping run also covers DLRM_DCN and
hashed tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_qr.data.synthetic import SyntheticCriteoConfig, write_synthetic_criteo

ROOT = Path(__file__).resolve().parents[1]
CARDINALITIES = [
    10,
    12,
    15,
    20,
    30,
    40,
    50,
    70,
    100,
    130,
    170,
    220,
    300,
    400,
    500,
    700,
    900,
    1200,
    1600,
    2000,
    3000,
    4000,
    5000,
    7000,
    9000,
    12000,
]
ROWS = 2000


@pytest.fixture(scope="module")
def criteo_dir(tmp_path_factory) -> Path:
    """Three day files; day 1 gets a line with 39 fields as its line ROWS + 1."""
    out = tmp_path_factory.mktemp("criteo")
    write_synthetic_criteo(out, SyntheticCriteoConfig(num_rows=ROWS, num_days=3, cardinalities=CARDINALITIES))
    (out / "synthetic_criteo.json").unlink()  # a plain directory of day files, as users have them
    with open(out / "day_1.tsv", "a") as f:
        f.write("1\t" + "\t".join(["5"] * 13) + "\t" + "\t".join(["0a"] * 25) + "\n")
    return out


def _train(criteo_dir: Path, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrec_qr.train",
            "--config",
            str(ROOT / "configs" / "criteo_kaggle_dlrm_full.yaml"),
            f"data.criteo_path={criteo_dir}",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.output_dir={tmp}",
            "run.name=r",
            f"data.num_embeddings_per_feature={json.dumps(CARDINALITIES)}",
            "data.global_batch_size=256",
            "data.eval_batch_size=1024",
            "model.dense_arch_layer_sizes=[32,16]",
            "model.over_arch_layer_sizes=[32,1]",
            "train.eval_every_steps=0",
            "train.log_every_steps=5",
            "checkpoint.every_steps=0",
            "run.progress_bar=false",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )


def test_malformed_line_fails_with_file_and_line(criteo_dir: Path, tmp_path: Path) -> None:
    result = _train(criteo_dir, tmp_path)
    assert result.returncode == 1
    assert f"error: {criteo_dir / 'day_1.tsv'}:{ROWS + 1}: expected 40 tab-separated fields" in result.stderr


def test_skipped_malformed_lines_are_counted(criteo_dir: Path, tmp_path: Path) -> None:
    result = _train(
        criteo_dir,
        tmp_path,
        "data.skip_malformed=true",
        "model.arch=dcn",
        "model.dcn_num_layers=2",
        "model.dcn_low_rank_dim=8",
        "embeddings.kind=hash",
        "embeddings.threshold=200",
    )
    summary_path = tmp_path / "r" / "summary.json"
    assert summary_path.is_file(), result.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["malformed_lines_skipped"] == 1
    assert "malformed input lines skipped: 1" in result.stdout
    assert summary["steps"] == 2 * ROWS // 256 and summary["reference"] is None
    hashed = [t for t in summary["tables"] if t["stored_as"].startswith("hash")]
    assert len(hashed) == 15 and summary["metrics"]["test"]["samples"] == ROWS // 2
