"""Hot ids in the training app: id counting and its cache, the config key, and one tiny real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.runs import run_setting
from experiments.settings import Grid, Setting, expand_grid
from torchrec_qr.data.id_counts import cached_id_counts, count_ids
from torchrec_qr.train.config import ConfigError, load_config, validate


def test_count_ids_against_a_python_count(tmp_path: Path):
    rng = np.random.default_rng(0)
    sizes = [3, 50, 7]
    sparse = np.stack([rng.integers(0, n, 1000) for n in sizes], axis=1)
    counts = count_ids(sparse, sizes)
    for f, n in enumerate(sizes):
        expected = [sum(1 for row in sparse if row[f] == i) for i in range(n)]
        assert counts[f].tolist() == expected
    first = cached_id_counts(sparse, sizes, tmp_path)
    assert len(list(tmp_path.glob("id_counts.*.npz"))) == 1
    again = cached_id_counts(sparse, sizes, tmp_path)  # read back, not recounted
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    changed = sparse.copy()
    changed[500, 1] = (changed[500, 1] + 1) % 50  # a row in the middle: another split, counted again
    assert cached_id_counts(changed, sizes, tmp_path)[1].tolist() != first[1].tolist()
    with pytest.raises(ValueError, match="feature 0: ids must be in \\[0, 2\\)"):
        count_ids(sparse, [2, 50, 7])


def test_hot_rows_config_rules():
    cfg = load_config("configs/synthetic_full.yaml", ["embeddings.kind=hash", "embeddings.hot_rows=8"])
    with pytest.raises(ConfigError, match="embeddings.hot_rows: hot rows apply to kind=compositional"):
        validate(cfg, world_size=1, cuda_available=False)
    cfg = load_config("configs/synthetic_full.yaml", ["embeddings.kind=compositional", "embeddings.hot_rows=-1"])
    with pytest.raises(ConfigError, match="embeddings.hot_rows: must be >= 0"):
        validate(cfg, world_size=1, cuda_available=False)
    labels = [s.label for s in expand_grid(False).settings]
    assert {"qr-mult-c4-hot512-t200", "qr-mult-c8-hot512-t200", "qr-mult-c60-hot512-t200"} <= set(labels)


def test_tiny_real_run_with_hot_rows(tmp_path: Path):
    """qr-mult with 16 hot ids per table through the app: counted on the training split, cached, stored."""
    cards = [10 + 40 * i for i in range(26)]
    setting = Setting("qr-mult", 4, hot_rows=16)
    grid = Grid(
        "tiny",
        (setting,),
        (0,),
        (
            "data.synthetic.num_rows=2000",
            "data.synthetic.num_days=3",
            "data.synthetic.cardinalities=[" + ",".join(map(str, cards)) + "]",
            "data.global_batch_size=256",
            "data.eval_batch_size=1024",
            "model.dense_arch_layer_sizes=[32,16]",
            "model.over_arch_layer_sizes=[32,1]",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
    )
    rec = run_setting(setting, 0, grid, "configs/synthetic_full.yaml", tmp_path / "runs", nproc=1, timeout=300)
    assert rec is not None and rec.method == "qr-mult-hot16" and 0.3 < rec.test_log_loss < 0.8
    assert len(list((tmp_path / "cache").glob("synthetic-*/cache/id_counts.*.npz"))) == 1
    summary = json.loads((Path(rec.run_dir) / "summary.json").read_text())
    rows = {t["table"]: t["sub_table_rows"] for t in summary["tables"]}
    for i, n in enumerate(cards):
        if n > 200:  # 16 hot rows + the tail's ceil((n - 16) / 4) quotients; 4 remainders + the hot class
            assert rows[f"t_cat_{i}"] == [16 + math.ceil((n - 16) / 4), 5], (n, rows[f"t_cat_{i}"])
