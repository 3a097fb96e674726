"""The generated Criteo-like data: deterministic, in range, skewed, labelled by the planted model."""

import numpy as np
import pytest

from torchrec_qr.data.criteo import parse_criteo_tsv
from torchrec_qr.data.synthetic import (
    SyntheticCriteoConfig,
    bayes_log_loss,
    category_effects,
    default_cardinalities,
    generate_day,
    write_synthetic_criteo,
)


def small_config(**overrides) -> SyntheticCriteoConfig:
    kw = dict(num_rows=4000, num_days=2, cardinalities=default_cardinalities(10, 100_000), seed=3)
    kw.update(overrides)
    return SyntheticCriteoConfig(**kw)


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_synthetic_criteo(tmp_path / "a", small_config())
    b = write_synthetic_criteo(tmp_path / "b", small_config())
    c = write_synthetic_criteo(tmp_path / "c", small_config(seed=4))
    assert [p.name for p in a] == ["day_0.tsv", "day_1.tsv"]
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
    assert a[0].read_bytes() != a[1].read_bytes()  # days differ


def test_write_is_idempotent_and_config_change_rewrites(tmp_path):
    paths = write_synthetic_criteo(tmp_path, small_config())
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_synthetic_criteo(tmp_path, small_config()) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    before = paths[0].read_bytes()
    write_synthetic_criteo(tmp_path, small_config(effect_scale=0.5))
    assert paths[0].read_bytes() != before


def test_tsv_layout(tmp_path):
    path = write_synthetic_criteo(tmp_path, small_config(num_days=1))[0]
    lines = path.read_text().splitlines()
    assert len(lines) == 4000
    fields = [line.split("\t") for line in lines]
    assert {len(f) for f in fields} == {40}
    assert {f[0] for f in fields} == {"0", "1"}
    hex_lengths = {len(x) for f in fields for x in f[14:]}
    assert hex_lengths == {0, 8}  # missing categoricals are empty fields, others 8 hex digits
    assert any(x == "" for f in fields for x in f[1:14])  # some missing dense values
    assert any(x.startswith("-") for f in fields for x in f[1:14])


def test_ids_within_cardinality():
    config = small_config()
    sparse = generate_day(config, 0).sparse
    assert sparse.min() >= 0
    assert np.all(sparse.max(axis=0) < np.array(config.cardinalities))
    assert np.all((sparse == 0).mean(axis=0) < 0.2)  # id 0 is "missing" and stays rare


def test_zipf_skew_and_permuted_popular_ids():
    config = small_config(num_rows=20_000)
    ids = generate_day(config, 0).sparse[:, 20]  # cardinality in the thousands
    _, counts = np.unique(ids[ids != 0], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[0] > 20 * counts[99]
    top = np.argsort(np.bincount(ids))[::-1][:5]
    assert set(top) != set(range(1, 6))  # popular ids are scattered, not 1, 2, 3, ...


def test_effects_are_hashed_normals():
    config = small_config(effect_scale=0.4)
    ids = np.arange(200_000)
    e = category_effects(config, 7, ids)
    assert np.array_equal(e[[5, 99, 12345]], category_effects(config, 7, np.array([5, 99, 12345])))
    assert abs(e.mean()) < 0.01 and abs(e.std() - 0.4) < 0.01
    assert not np.allclose(e[:100], category_effects(config, 8, ids[:100]))


def test_labels_follow_the_planted_model():
    config = small_config(num_rows=30_000)
    day = generate_day(config, 1)
    rate = day.labels.mean()
    assert 0.2 < rate < 0.35
    true_p = 1.0 / (1.0 + np.exp(-day.logits))
    assert log_loss(day.labels, true_p) < log_loss(day.labels, np.full(len(true_p), rate)) - 0.05
    report = bayes_log_loss(config)
    assert 0.2 < report.base_rate < 0.35
    assert report.bayes_log_loss < report.constant_log_loss - 0.05
    # Collisions cost accuracy: merging ids of the largest feature loses information.
    f = int(np.argmax(config.cardinalities))
    hashed = (
        day.logits - category_effects(config, f, day.sparse[:, f]) + category_effects(config, f, day.sparse[:, f] % 7)
    )
    assert log_loss(day.labels, 1.0 / (1.0 + np.exp(-hashed))) > log_loss(day.labels, true_p)


def test_round_trip_through_reader(tmp_path):
    config = small_config()
    for d, path in enumerate(write_synthetic_criteo(tmp_path, config)):
        day = generate_day(config, d)
        parsed = parse_criteo_tsv(path, cardinalities=config.cardinalities)
        assert parsed.num_malformed == 0
        np.testing.assert_array_equal(parsed.sparse, day.sparse)
        np.testing.assert_array_equal(parsed.labels, day.labels.astype(np.float32))
        expected = np.where(day.dense_missing, 0.0, np.log1p(np.maximum(day.dense, 0)))
        np.testing.assert_allclose(parsed.dense, expected, rtol=1e-6)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="cardinalities"):
        SyntheticCriteoConfig(cardinalities=[10] * 25)
    with pytest.raises(ValueError, match="cardinalities"):
        SyntheticCriteoConfig(cardinalities=[1] * 26)
