"""Criteo TSV reader (Kaggle train.txt or day files, Terabyte day files) with a numpy cache.

Each line is `label \\t 13 integers \\t 26 hex ids`; empty fields are missing values. Preprocessing
follows DLRM: dense -> log(1 + max(x, 0)) with missing -> 0; hex -> integer id, missing -> 0,
optionally reduced modulo `max_ind_range` and/or per-feature `cardinalities`.

torchrec's `BinaryCriteoUtils.tsv_to_npys` does the same conversion but maps rows one at a time in
Python, uses another dense transform (log(x - min + 2)) and cannot say which line is broken. Here
lines are tokenized on raw bytes with numpy (about 7 s of CPU time per million 255-byte lines),
and every malformed line is reported with its file and 1-based line number, or skipped and
counted. In multi-process runs let one rank build the cache first (then barrier): ranks racing on
the same file each parse it, harmlessly but wastefully.

Split (the paper's): day files 0..k-2 train, the last day halved into validation then test; a single
file (Kaggle train.txt) is first cut into 7 equal consecutive "days".
"""

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    INT_FEATURE_COUNT,
)

__all__ = [
    "CriteoArrays",
    "iter_criteo_tsv",
    "parse_criteo_tsv",
    "load_criteo_file",
    "load_criteo_splits",
    "find_criteo_files",
]

logger = logging.getLogger(__name__)

_NUM_FIELDS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
_COLUMN_NAMES = ["label", *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES]
_CACHE_VERSION = 1
_MAX_DEC, _MAX_HEX = 18, 16  # longest dense / hex field that fits int64 / uint64
_BAD, _SIGN = 255, 254
_DEC_TABLE = np.full(256, _BAD, dtype=np.uint8)
_DEC_TABLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_DEC_TABLE[ord("-")] = _SIGN
_HEX_TABLE = np.full(256, _BAD, dtype=np.uint8)
_HEX_TABLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_TABLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_FIX_HINT = (
    "Fix the file, or pass skip_malformed=True (config: data.skip_malformed: true) to skip and count such lines."
)


@dataclass
class CriteoArrays:
    """Preprocessed rows: dense float32 [n, 13], sparse int64 [n, 26], labels float32 [n].

    `num_malformed` counts malformed lines skipped while reading these rows' source; across the
    splits of `load_criteo_splits` the counts add up to the total (val/test views report 0 for lines
    already counted in train, test 0 for lines counted in val).
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    num_malformed: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> "CriteoArrays":
        """Rows [start, stop) without copying (views of memory-mapped caches stay mapped)."""
        rows = slice(start, stop)
        return replace(self, dense=self.dense[rows], sparse=self.sparse[rows], labels=self.labels[rows])


def _moduli(max_ind_range: int | None, cardinalities: Sequence[int] | None) -> np.ndarray | None:
    """Per-feature modulus (the smaller of both caps), or None when ids are kept as parsed."""
    if max_ind_range is not None and max_ind_range <= 0:
        max_ind_range = None  # DLRM's --max-ind-range=-1 means no cap
    if max_ind_range is None and cardinalities is None:
        return None
    mod = np.full(CAT_FEATURE_COUNT, np.iinfo(np.uint64).max, dtype=np.uint64)
    if cardinalities is not None:
        if len(cardinalities) != CAT_FEATURE_COUNT or min(cardinalities) < 1:
            raise ValueError(f"cardinalities needs {CAT_FEATURE_COUNT} positive ints, got {cardinalities}")
        mod = np.minimum(mod, np.asarray(cardinalities, dtype=np.uint64))
    if max_ind_range is not None:
        mod = np.minimum(mod, np.uint64(max_ind_range))
    return mod


def _parse_numbers(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, hexadecimal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Parse fields one character position at a time across all fields at once.

    Returns (values, bad): uint64 for hex, int64 for decimal (optional leading '-'); empty -> 0.
    """
    table, base, max_len = (_HEX_TABLE, 16, _MAX_HEX) if hexadecimal else (_DEC_TABLE, 10, _MAX_DEC + 1)
    value = np.zeros(starts.shape, dtype=np.uint64)
    bad = lengths > max_len
    negative = np.zeros(starts.shape, dtype=bool)
    last = len(buf) - 1
    for k in range(min(int(lengths.max(initial=0)), max_len)):
        active = lengths > k
        code = table[buf[np.minimum(starts + k, last)]]
        sign = active & (code == _SIGN)
        if k == 0:
            negative = sign & (lengths > 1)
            sign &= ~negative
        bad |= (active & (code == _BAD)) | sign
        digit = active & ~negative if k == 0 else active
        value = np.where(digit, value * np.uint64(base) + (code & 15), value)
    if not hexadecimal:
        bad |= ~negative & (lengths == _MAX_DEC + 1)  # 19 digits may overflow int64
        value = np.where(negative, -(value.astype(np.int64)), value.astype(np.int64))
    return value, bad


def _iter_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (bytes ending in a newline, number of lines before them)."""
    opener = gzip.open if path.suffix == ".gz" else open
    lines_before, carry = 0, b""
    with opener(path, "rb") as f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise ValueError(
                    f"{path}: truncated or corrupt gzip file after {lines_before} lines ({e}); download or "
                    "compress it again (gzip -t checks a file)"
                ) from e
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut:
                chunk = data[:cut]
                if not chunk.endswith(b"\n"):  # last line without a newline
                    chunk += b"\n"
                yield chunk, lines_before
                lines_before += chunk.count(b"\n")
            carry = data[cut:]
            if not block:
                return


def _parse_chunk(
    data: bytes, path: Path, lines_before: int, moduli: np.ndarray | None, skip_malformed: bool, labeled: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokenize and convert one chunk; returns (dense, sparse, labels, malformed line count).

    ``labeled=False``: lines lack the label field (Criteo's test files); labels come back as 0.
    """
    fields = _NUM_FIELDS if labeled else _NUM_FIELDS - 1
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    line_starts = np.concatenate([[0], newlines[:-1] + 1])
    tabs = np.flatnonzero(buf == 9)
    tabs_per_line = np.diff(np.searchsorted(tabs, newlines), prepend=0)
    good = tabs_per_line == fields - 1
    if not skip_malformed and not good.all():
        i = int(np.argmin(good))
        found = int(tabs_per_line[i]) + 1
        raise ValueError(
            f"{path}:{lines_before + i + 1}: expected {fields} tab-separated fields ({'label, ' if labeled else ''}"
            f"{INT_FEATURE_COUNT} integers, {CAT_FEATURE_COUNT} hex ids), found {found}. {_FIX_HINT}"
        )
    lines = np.flatnonzero(good)
    if len(lines) < len(newlines):
        tabs = tabs[np.repeat(good, tabs_per_line)]
    seps = tabs.reshape(-1, fields - 1)
    starts = np.concatenate([line_starts[lines, None], seps + 1], axis=1)
    ends = np.concatenate([seps, newlines[lines, None]], axis=1)
    if not labeled:  # an empty virtual label column keeps the column layout of labeled lines
        starts, ends = np.concatenate([starts[:, :1], starts], axis=1), np.concatenate([starts[:, :1], ends], axis=1)
    ends[:, -1] -= (ends[:, -1] > starts[:, -1]) & (buf[ends[:, -1] - 1] == 13)  # tolerate CRLF
    lengths = ends - starts

    label_char = buf[starts[:, 0]]
    bad_label = (lengths[:, 0] != 1) | ((label_char != ord("0")) & (label_char != ord("1")))
    if not labeled:
        bad_label[:] = False
    dense, bad_dense = _parse_numbers(buf, starts[:, 1:14], lengths[:, 1:14], hexadecimal=False)
    sparse, bad_hex = _parse_numbers(buf, starts[:, 14:], lengths[:, 14:], hexadecimal=True)
    if moduli is not None:
        sparse %= moduli
    bad_hex |= sparse > np.uint64(np.iinfo(np.int64).max)
    bad = np.concatenate([bad_label[:, None], bad_dense, bad_hex], axis=1)
    bad_rows = bad.any(axis=1)
    if bad_rows.any() and not skip_malformed:
        row = int(np.argmax(bad_rows))
        col = int(np.argmax(bad[row]))
        text = data[starts[row, col] : ends[row, col]].decode("utf-8", errors="replace")
        kind = "'0' or '1'" if col == 0 else "an integer" if col <= INT_FEATURE_COUNT else "a hex id"
        if col > INT_FEATURE_COUNT and moduli is None:
            kind += " (values >= 2**63 need max_ind_range)"
        raise ValueError(
            f"{path}:{lines_before + lines[row] + 1}: column {col + int(labeled)} ({_COLUMN_NAMES[col]}) "
            f"must be {kind}, got {text!r}. {_FIX_HINT}"
        )
    keep = ~bad_rows
    dense_out = np.log1p(np.maximum(dense[keep], 0), dtype=np.float32)
    labels = (label_char[keep] == ord("1")).astype(np.float32)
    if not labeled:
        labels[:] = 0
    malformed = int(len(newlines) - len(lines) + bad_rows.sum())
    return dense_out, sparse[keep].astype(np.int64), labels, malformed


def _iter_parsed(
    path: Path,
    moduli: np.ndarray | None,
    skip_malformed: bool,
    chunk_bytes: int,
    counter: list[int],
    labeled: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Parsed chunks of one file; adds the malformed-line count of each chunk to counter[0]."""
    for data, lines_before in _iter_chunks(path, chunk_bytes):
        dense, sparse, labels, malformed = _parse_chunk(data, path, lines_before, moduli, skip_malformed, labeled)
        counter[0] += malformed
        yield dense, sparse, labels


def parse_criteo_tsv(
    path: str | os.PathLike,
    *,
    max_ind_range: int | None = None,
    cardinalities: Sequence[int] | None = None,
    skip_malformed: bool = False,
    chunk_bytes: int = 16 << 20,
) -> CriteoArrays:
    """Parse one Criteo TSV (optionally .gz) file into memory, without caching.

    Raises ValueError naming the file and 1-based line of the first malformed line unless
    `skip_malformed`, in which case such lines are dropped and counted in `num_malformed`.
    """
    counter = [0]
    moduli = _moduli(max_ind_range, cardinalities)
    parts = list(_iter_parsed(Path(path), moduli, skip_malformed, chunk_bytes, counter))
    if not parts:
        parts = [
            (
                np.zeros((0, INT_FEATURE_COUNT), np.float32),
                np.zeros((0, CAT_FEATURE_COUNT), np.int64),
                np.zeros(0, np.float32),
            )
        ]
    dense, sparse, labels = (np.concatenate(p) for p in zip(*parts))
    if counter[0]:
        logger.warning("%s: skipped %d malformed lines", path, counter[0])
    return CriteoArrays(dense, sparse, labels, num_malformed=counter[0])


def iter_criteo_tsv(
    path: str | os.PathLike,
    *,
    max_ind_range: int | None = None,
    cardinalities: Sequence[int] | None = None,
    labeled: bool = True,
    chunk_bytes: int = 16 << 20,
) -> Iterator[CriteoArrays]:
    """Parse one file chunk by chunk (memory stays at one chunk), for streaming consumers such as scoring.

    ``labeled=False`` reads lines without the label field (Criteo's test files; labels are 0). The first
    malformed line raises a ValueError naming the file and its 1-based line number.
    """
    moduli = _moduli(max_ind_range, cardinalities)
    for dense, sparse, labels in _iter_parsed(Path(path), moduli, False, chunk_bytes, [0], labeled):
        yield CriteoArrays(dense, sparse, labels)


def _write_npy(path: Path, raw: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Prefix raw row bytes with an npy header, streaming, so memory stays at one chunk."""
    with open(path, "wb") as out, open(raw, "rb") as src:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 16 << 20)
    raw.unlink()


def _read_stamp(path: Path) -> dict:
    """A cache's stamp; an unreadable one (a crash mid-write) counts as no cache, which is rebuilt."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("%s is unreadable (%s): rebuilding that cache", path, e)
        return {}
    return saved if isinstance(saved, dict) else {}


def _map_cached(path: Path, stamp_path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"{path}: damaged cache file ({e}); delete {stamp_path} (the cache is then rebuilt from the source)"
        ) from e


def load_criteo_file(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_ind_range: int | None = None,
    cardinalities: Sequence[int] | None = None,
    skip_malformed: bool = False,
    chunk_bytes: int = 16 << 20,
) -> CriteoArrays:
    """Parse one file once into `<file name>.<key>.{dense,sparse,labels}.npy`; later calls map them.

    The cache sits next to the input unless `cache_dir` is given. Its key covers the parse options;
    a JSON stamp (written last, after atomic renames) records the source size and mtime, so a changed
    source or an interrupted conversion is parsed again instead of trusted.
    """
    src = Path(path)
    options = {
        "max_ind_range": max_ind_range,
        "cardinalities": None if cardinalities is None else [int(c) for c in cardinalities],
        "skip_malformed": skip_malformed,
        "version": _CACHE_VERSION,
    }
    moduli = _moduli(max_ind_range, cardinalities)
    key = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    directory = Path(cache_dir) if cache_dir is not None else src.parent
    base = directory / f"{src.name}.{key}"
    stat = src.stat()
    stamp = {"source": str(src.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "options": options}
    stamp_path = base.with_name(base.name + ".json")
    names = {k: base.with_name(f"{base.name}.{k}.npy") for k in ("dense", "sparse", "labels")}
    if stamp_path.exists():
        saved = _read_stamp(stamp_path)
        if {k: saved.get(k) for k in stamp} == stamp and all(p.exists() for p in names.values()):
            logger.info("using cached %s (%d rows)", base, saved["rows"])
            loaded = {k: _map_cached(p, stamp_path) for k, p in names.items()}
            return CriteoArrays(**loaded, num_malformed=saved["num_malformed"])
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("parsing %s into %s", src, directory)
    counter, rows, tag = [0], 0, f".tmp{os.getpid()}"
    raws = {k: p.with_name(p.name + tag + ".raw") for k, p in names.items()}
    files = {k: open(p, "wb") for k, p in raws.items()}
    try:
        for dense, sparse, labels in _iter_parsed(src, moduli, skip_malformed, chunk_bytes, counter):
            for k, arr in (("dense", dense), ("sparse", sparse), ("labels", labels)):
                files[k].write(arr.tobytes())
            rows += len(labels)
    except BaseException:
        for k, f in files.items():
            f.close()
            raws[k].unlink(missing_ok=True)
        raise
    for f in files.values():
        f.close()
    shapes = {
        "dense": ((rows, INT_FEATURE_COUNT), np.float32),
        "sparse": ((rows, CAT_FEATURE_COUNT), np.int64),
        "labels": ((rows,), np.float32),
    }
    for k, (shape, dtype) in shapes.items():
        tmp = names[k].with_name(names[k].name + tag)
        _write_npy(tmp, raws[k], dtype, shape)
        os.replace(tmp, names[k])
    stamp_path.write_text(json.dumps({**stamp, "rows": rows, "num_malformed": counter[0]}, indent=1))
    if counter[0]:
        logger.warning("%s: skipped %d malformed lines", src, counter[0])
    return CriteoArrays(**{k: np.load(p, mmap_mode="r") for k, p in names.items()}, num_malformed=counter[0])


def find_criteo_files(paths_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A directory's `day_<n>[.tsv|.txt][.gz]` files in day order, else its train.txt; paths pass through."""
    if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
        directory = Path(paths_or_dir)
        days = {}
        for p in directory.iterdir():
            m = re.fullmatch(r"day_(\d+)(\.tsv|\.txt)?(\.gz)?", p.name)
            if m:
                days[int(m.group(1))] = p
        if days:
            if sorted(days) != list(range(len(days))):
                raise ValueError(f"{directory}: day files must be numbered 0..n-1, found days {sorted(days)}")
            return [days[d] for d in range(len(days))]
        if (directory / "train.txt").exists():
            return [directory / "train.txt"]
        raise FileNotFoundError(f"{directory}: no day_<n>.tsv files and no train.txt")
    single = isinstance(paths_or_dir, (str, os.PathLike))
    paths = [Path(paths_or_dir)] if single else [Path(p) for p in paths_or_dir]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"Criteo file not found: {p}")
    return paths


def load_criteo_splits(
    paths_or_dir: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    max_ind_range: int | None = None,
    cardinalities: Sequence[int] | None = None,
    skip_malformed: bool = False,
    num_days_single_file: int = 7,
) -> dict[str, CriteoArrays]:
    """Return {"train", "val", "test"}: all days but the last train, the last day halved (val first).

    With 7 day files this is the paper's split (days 0..5 train, day 6 val/test). A single file is
    first cut into `num_days_single_file` equal consecutive days; its splits are zero-copy views of
    the memory-mapped cache. Several training day files are concatenated in memory.
    """
    files = find_criteo_files(paths_or_dir)
    kw = dict(
        cache_dir=cache_dir, max_ind_range=max_ind_range, cardinalities=cardinalities, skip_malformed=skip_malformed
    )
    if len(files) == 1:
        whole = load_criteo_file(files[0], **kw)
        n = len(whole)
        train_end = (num_days_single_file - 1) * n // num_days_single_file
        val_end = train_end + (n - train_end) // 2
        splits = {
            "train": whole.slice(0, train_end),
            "val": replace(whole.slice(train_end, val_end), num_malformed=0),
            "test": replace(whole.slice(val_end, n), num_malformed=0),
        }
    else:
        days = [load_criteo_file(f, **kw) for f in files]
        train = CriteoArrays(
            dense=np.concatenate([d.dense for d in days[:-1]]),
            sparse=np.concatenate([d.sparse for d in days[:-1]]),
            labels=np.concatenate([d.labels for d in days[:-1]]),
            num_malformed=sum(d.num_malformed for d in days[:-1]),
        )
        last = days[-1]
        half = len(last) // 2
        test = replace(last.slice(half, len(last)), num_malformed=0)
        splits = {"train": train, "val": last.slice(0, half), "test": test}
    logger.info("Criteo splits from %d file(s): %s", len(files), {k: len(v) for k, v in splits.items()})
    return splits
