"""Criteo TSV reader on generated files: exact values, missing fields, caps, errors, cache, splits."""

import gzip
import math
import random

import numpy as np
import pytest

from torchrec_qr.data import criteo
from torchrec_qr.data.criteo import find_criteo_files, load_criteo_file, load_criteo_splits, parse_criteo_tsv


def random_rows(n: int, seed: int = 0) -> list[list[str]]:
    """Rows as field strings: random labels, counts (some -1, some empty), 8-digit hex ids (some empty)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = [str(rng.randint(0, 1))]
        row += ["" if rng.random() < 0.2 else str(rng.choice([-1, 0, 1, 7, rng.randint(0, 10**7)])) for _ in range(13)]
        row += ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}" for _ in range(26)]
        rows.append(row)
    return rows


def write_rows(path, rows, newline="\n"):
    path.write_text("".join("\t".join(r) + newline for r in rows))
    return path


def expected_arrays(rows, modulus=None):
    """Preprocessing computed field by field with Python ints and math, independent of the reader."""
    dense = [[math.log1p(max(int(x), 0)) if x else 0.0 for x in r[1:14]] for r in rows]
    sparse = [[int(x, 16) if x else 0 for x in r[14:]] for r in rows]
    if modulus is not None:
        sparse = [[v % m for v, m in zip(r, modulus)] for r in sparse]
    labels = [float(r[0]) for r in rows]
    return np.array(dense), np.array(sparse, dtype=np.int64), np.array(labels)


def assert_matches(arrays, rows, modulus=None):
    dense, sparse, labels = expected_arrays(rows, modulus)
    assert arrays.dense.dtype == np.float32 and arrays.dense.shape == (len(rows), 13)
    assert arrays.sparse.dtype == np.int64 and arrays.labels.dtype == np.float32
    np.testing.assert_allclose(arrays.dense, dense, rtol=1e-6)
    np.testing.assert_array_equal(arrays.sparse, sparse)
    np.testing.assert_array_equal(arrays.labels, labels)


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_parses_exactly_across_chunks(tmp_path, chunk_bytes):
    rows = random_rows(300)
    arrays = parse_criteo_tsv(write_rows(tmp_path / "day_0.tsv", rows), chunk_bytes=chunk_bytes)
    assert arrays.num_malformed == 0
    assert_matches(arrays, rows)


def test_missing_fields_crlf_uppercase_and_no_final_newline(tmp_path):
    rows = [["1"] + [""] * 13 + [""] * 26, ["0", "-1", "5"] + [""] * 11 + ["ABCDEF01", "7"] + ["" for _ in range(24)]]
    path = tmp_path / "t.tsv"
    path.write_bytes(b"\r\n".join("\t".join(r).encode() for r in rows))  # CRLF, last line unterminated
    arrays = parse_criteo_tsv(path)
    assert_matches(arrays, rows)
    assert arrays.sparse[1, 0] == 0xABCDEF01 and arrays.sparse[1, 1] == 7
    assert arrays.dense[1, 0] == 0.0 and arrays.dense[0].sum() == 0.0


def test_modulo_caps(tmp_path):
    rows = random_rows(100, seed=1)
    path = write_rows(tmp_path / "t.tsv", rows)
    assert_matches(parse_criteo_tsv(path, max_ind_range=1000), rows, [1000] * 26)
    assert_matches(parse_criteo_tsv(path, max_ind_range=-1), rows)  # DLRM's "no cap"
    cards = [10 + 7 * i for i in range(26)]
    assert_matches(parse_criteo_tsv(path, cardinalities=cards), rows, cards)
    both = [min(c, 50) for c in cards]
    assert_matches(parse_criteo_tsv(path, cardinalities=cards, max_ind_range=50), rows, both)


BROKEN = [
    (lambda r: r[:-1], "expected 40 tab-separated fields", "found 39"),
    (lambda r: r[:3] + ["1.5"] + r[4:], "column 4 (int_2) must be an integer", "'1.5'"),
    (lambda r: r[:20] + ["00zz0000"] + r[21:], "column 21 (cat_6) must be a hex id", "'00zz0000'"),
    (lambda r: ["2"] + r[1:], "column 1 (label) must be '0' or '1'", "'2'"),
    (lambda r: r[:5] + ["-"] + r[6:], "column 6 (int_4) must be an integer", "'-'"),
]


@pytest.mark.parametrize("break_row,what,text", BROKEN)
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_malformed_line_names_file_and_line(tmp_path, break_row, what, text, chunk_bytes):
    rows = random_rows(10, seed=2)
    rows[6] = break_row(rows[6])
    path = write_rows(tmp_path / "bad.tsv", rows)
    with pytest.raises(ValueError) as err:
        parse_criteo_tsv(path, chunk_bytes=chunk_bytes)
    message = str(err.value)
    assert "bad.tsv:7:" in message and what in message and text in message
    assert "skip_malformed" in message


def test_skip_mode_counts_malformed_lines(tmp_path):
    rows = random_rows(20, seed=3)
    bad_lines = {2, 5, 11, 19}
    lines = ["\t".join(r) for r in rows]
    for i, (break_row, _, _) in zip(sorted(bad_lines), BROKEN):
        lines[i] = "\t".join(break_row(rows[i]))
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n\n")  # a trailing empty line is malformed too
    arrays = parse_criteo_tsv(path, skip_malformed=True, chunk_bytes=100)
    assert arrays.num_malformed == len(bad_lines) + 1
    assert_matches(arrays, [r for i, r in enumerate(rows) if i not in bad_lines])


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    rows = random_rows(50, seed=4)
    path = write_rows(tmp_path / "train.txt", rows)
    first = load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100)
    assert_matches(first, rows, [100] * 26)
    assert len(list((tmp_path / "cache").glob("train.txt.*.npy"))) == 3

    def fail(*args, **kwargs):
        raise AssertionError("cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(criteo, "_parse_chunk", fail)
        second = load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100)
    assert isinstance(second.sparse, np.memmap)
    assert_matches(second, rows, [100] * 26)
    other = load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=10)  # new options, new cache
    assert_matches(other, rows, [10] * 26)
    rows2 = random_rows(51, seed=5)
    write_rows(path, rows2)  # the source changed: parse again
    assert_matches(load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100), rows2, [100] * 26)
    next_to_input = load_criteo_file(path)
    assert next_to_input.sparse.shape == (51, 26) and list(tmp_path.glob("train.txt.*.json"))


def test_single_file_is_cut_into_seven_days(tmp_path):
    rows = random_rows(71, seed=6)
    write_rows(tmp_path / "train.txt", rows)
    splits = load_criteo_splits(tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 60, "val": 5, "test": 6}
    assert_matches(splits["train"], rows[:60])
    assert_matches(splits["val"], rows[60:65])
    assert_matches(splits["test"], rows[65:])


def test_day_files_split_last_day_in_halves(tmp_path):
    days = [random_rows(10 + d, seed=10 + d) for d in range(7)]
    for d, rows in enumerate(days):
        write_rows(tmp_path / f"day_{d}.tsv", rows)
    assert [p.name for p in find_criteo_files(tmp_path)] == [f"day_{d}.tsv" for d in range(7)]
    splits = load_criteo_splits(tmp_path, cache_dir=tmp_path / "cache")
    assert_matches(splits["train"], [r for rows in days[:6] for r in rows])
    assert_matches(splits["val"], days[6][:8])
    assert_matches(splits["test"], days[6][8:])


def test_split_malformed_counts_add_up(tmp_path):
    days = [random_rows(20, seed=20 + d) for d in range(7)]
    for d, rows in enumerate(days):
        text = "".join("\t".join(r) + "\n" for r in rows)
        (tmp_path / "days").mkdir(exist_ok=True)
        (tmp_path / "days" / f"day_{d}.tsv").write_text(text + ("broken\n" if d in (2, 6) else ""))
    with pytest.raises(ValueError, match="day_2.tsv:21:"):
        load_criteo_splits(tmp_path / "days")
    splits = load_criteo_splits(tmp_path / "days", skip_malformed=True)
    assert [splits[k].num_malformed for k in ("train", "val", "test")] == [1, 1, 0]
    assert_matches(splits["test"], days[6][10:])
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "train.txt").write_text("broken\n" + "".join("\t".join(r) + "\n" for r in days[0]))
    splits = load_criteo_splits(tmp_path / "one", skip_malformed=True)
    assert [splits[k].num_malformed for k in ("train", "val", "test")] == [1, 0, 0]


def test_gzip_input_and_missing_files(tmp_path):
    rows = random_rows(30, seed=7)
    with gzip.open(tmp_path / "day_0.gz", "wt") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))
    assert_matches(parse_criteo_tsv(tmp_path / "day_0.gz"), rows)
    with pytest.raises(FileNotFoundError):
        find_criteo_files(tmp_path / "nope.tsv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no day_<n>.tsv"):
        find_criteo_files(tmp_path / "empty")


def test_truncated_gzip_names_the_file(tmp_path):
    plain = write_rows(tmp_path / "day_0", random_rows(2000))
    data = gzip.compress(plain.read_bytes())
    path = tmp_path / "day_0.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"day_0\.gz: truncated or corrupt gzip file after \d+ lines .*gzip -t"):
        load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100)
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written is left as a cache


def test_damaged_cache_names_the_file_and_the_fix_and_a_bad_stamp_rebuilds(tmp_path):
    rows = random_rows(50)
    path = write_rows(tmp_path / "day_0", rows)
    load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100)
    dense = next((tmp_path / "cache").glob("*.dense.npy"))
    dense.write_bytes(dense.read_bytes()[:200])
    stamp = next((tmp_path / "cache").glob("*.json"))
    with pytest.raises(ValueError, match=rf"dense\.npy: damaged cache file .*delete {stamp}"):
        load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100)
    stamp.write_text("{trunc")
    assert_matches(load_criteo_file(path, cache_dir=tmp_path / "cache", max_ind_range=100), rows, [100] * 26)
