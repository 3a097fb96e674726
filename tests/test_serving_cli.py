"""``python -m torchrec_qr.export`` and ``python -m torchrec_qr.predict`` end to end on a tiny training run.

The run trains at world size 2 (torchrun, gloo); export loads its DCP checkpoint unsharded at world size 1.
Predictions on the run's test split are checked against the run's own final test metrics (computed by the
training app with TorchRec's metrics on the float sharded model): equal for fp32 storage, within the
issue's targets for int8. Bad inputs must fail with a message naming the table or file:line, exit code 2
and no output left behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train_run import _run, _summary, _tiny, _torchrun

from torchrec_qr import export, predict
from torchrec_qr.data.criteo import iter_criteo_tsv


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(run dir, its summary, a TSV of its test split: the second half of the last day)."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")
    result = _torchrun(_tiny(out, cache, "tiny"))
    summary = _summary(out / "tiny", result)
    lines = next(cache.glob("synthetic-*/day_2.tsv")).read_bytes().splitlines(keepends=True)
    test = tmp_path_factory.mktemp("tsv") / "test.tsv"
    test.write_bytes(b"".join(lines[len(lines) // 2 :]))
    return out / "tiny", summary, test


@pytest.fixture(scope="module")
def hashed(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A hashed-table run at world size 1 (no torchrun): serving must hash ids as training did."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "synthetic_hash.yaml")
    result = _run([sys.executable, "-m", "torchrec_qr.train", "--config", config, *_tiny(out, cache, "hash")], 300)
    summary = _summary(out / "hash", result)
    lines = next(cache.glob("synthetic-*/day_2.tsv")).read_bytes().splitlines(keepends=True)
    test = tmp_path_factory.mktemp("tsv") / "test.tsv"
    test.write_bytes(b"".join(lines[len(lines) // 2 :]))
    return out / "hash", summary, test


@pytest.fixture(scope="module")
def auto(tmp_path_factory) -> tuple[Path, dict, Path]:
    """An ``embeddings.kind=auto`` run at world size 2: its tables depend on the world size and budget."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")
    sizes = "[10,12,15,20,30,40,50,70,100,130,170,220,300,400,500,700,900,1200,1600,2000,3000,4000,5000,7000,9000,"
    sizes += "120000]"
    args = _tiny(out, cache, "auto") + [
        f"data.synthetic.cardinalities={sizes}",
        "train.max_steps=6",
        "embeddings.kind=auto",
        "embeddings.memory_per_rank=6MiB",
    ]
    result = _torchrun(args)
    summary = _summary(out / "auto", result)
    lines = next(cache.glob("synthetic-*/day_2.tsv")).read_bytes().splitlines(keepends=True)
    test = tmp_path_factory.mktemp("tsv") / "test.tsv"
    test.write_bytes(b"".join(lines[len(lines) // 2 :]))
    return out / "auto", summary, test


def _export(run: Path, out: Path, dtype: str, row_alignment: int = 16) -> dict:
    rc, stdout, stderr = _run(
        [
            sys.executable,
            "-m",
            "torchrec_qr.export",
            "--run",
            str(run),
            "--dtype",
            dtype,
            "--out",
            str(out),
            "--row-alignment",
            str(row_alignment),
        ],
        timeout=300,
    )
    assert rc == 0, stderr[-3000:]
    assert f"to {out} as {dtype}" in stdout
    return json.loads((out / "manifest.json").read_text())


def _predict(model: Path, data: Path, out: Path | None) -> tuple[str, str]:
    cmd = [
        sys.executable,
        "-m",
        "torchrec_qr.predict",
        "--model",
        str(model),
        "--data",
        str(data),
        "--batch-size",
        "256",
    ]
    rc, stdout, stderr = _run(cmd + (["--out", str(out)] if out else []), timeout=300)
    assert rc == 0, stderr[-3000:]
    return stdout, stderr


def _reported(text: str) -> tuple[float, float]:
    line = next(x for x in text.splitlines() if x.startswith("Scored "))
    words = line.split()
    return float(words[words.index("loss") + 1]), float(words[words.index("AUC") + 1])


# D=16 rows: fp32 64 B; int8 16 + 4 B scale/bias (unpadded with row alignment 1)
@pytest.mark.parametrize("dtype, tol, row_alignment, row_bytes", [("fp32", 1e-4, 16, 64), ("int8", 1e-3, 1, 20)])
def test_export_then_predict_matches_training_metrics(trained, tmp_path, dtype, tol, row_alignment, row_bytes):
    run, summary, test = trained
    manifest = _export(run, tmp_path / "model", dtype, row_alignment)
    assert manifest["row_alignment"] == row_alignment
    assert manifest["step"] == summary["steps"] and manifest["checkpoint"].endswith(f"step_{summary['steps']:06d}")
    assert manifest["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert len(manifest["tables"]) == 26
    assert {p["dtype"] for t in manifest["tables"] for p in t["storage"]} == {dtype.upper()}
    for t in manifest["tables"]:
        assert t["bytes"] == sum(p["rows"] * row_bytes for p in t["storage"])
    qr = next(t for t in manifest["tables"] if t["name"] == "t_cat_25")
    assert [p["rows"] for p in qr["storage"]] == [3000, 4] and qr["stored_as"].startswith("compositional")

    stdout, _ = _predict(tmp_path / "model", test, tmp_path / "preds.tsv")
    probs = np.loadtxt(tmp_path / "preds.tsv")
    assert len(probs) == len(test.read_bytes().splitlines()) and ((probs > 0) & (probs < 1)).all()
    log_loss, auc = _reported(stdout)
    labels = np.array([float(line[:1]) for line in test.read_text().splitlines()])
    assert log_loss == pytest.approx(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)), abs=1e-4)
    expected = summary["metrics"]["test"]
    assert log_loss == pytest.approx(expected["log_loss"], abs=tol)
    assert auc == pytest.approx(expected["auc"], abs=tol)
    if dtype == "int8":  # without --out: probabilities on stdout, the report on stderr
        stdout, stderr = _predict(tmp_path / "model", test, None)
        np.testing.assert_array_equal(np.array(stdout.split(), dtype=float), probs)
        assert _reported(stderr) == (log_loss, auc)


def test_hashed_run_serves_with_its_hashing(hashed, tmp_path):
    run, summary, test = hashed
    manifest = _export(run, tmp_path / "model", "fp32")
    assert manifest["input"]["hash_rows"]["cat_25"] == 3000  # ceil(12000 / 4)
    assert {t["stored_as"] for t in manifest["tables"]} == {"full", "hashed"}
    stdout, _ = _predict(tmp_path / "model", test, tmp_path / "preds.tsv")
    log_loss, auc = _reported(stdout)
    assert log_loss == pytest.approx(summary["metrics"]["test"]["log_loss"], abs=1e-4)
    assert auc == pytest.approx(summary["metrics"]["test"]["auc"], abs=1e-4)


def test_auto_run_exports_the_tables_it_trained(auto, tmp_path):
    run, summary, test = auto
    manifest = _export(run, tmp_path / "model", "fp32")
    assert manifest["world_size"] == 2
    trained = {t["table"]: t["stored_as"] for t in summary["tables"]}
    exported = {t["name"]: t["stored_as"] for t in manifest["tables"]}
    assert trained["t_cat_25"].startswith("qr(") and exported["t_cat_25"].startswith("compositional")
    full = [n for n, kind in trained.items() if kind == "full"]
    assert full and [n for n, kind in exported.items() if kind == "full"] == full
    stdout, _ = _predict(tmp_path / "model", test, tmp_path / "preds.tsv")
    log_loss, auc = _reported(stdout)
    assert log_loss == pytest.approx(summary["metrics"]["test"]["log_loss"], abs=1e-4)
    assert auc == pytest.approx(summary["metrics"]["test"]["auc"], abs=1e-4)


def _fails(main, argv: list[str], capsys, *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_export_bad_inputs(trained, tmp_path, capsys):
    run, _, _ = trained
    out = tmp_path / "model"
    _fails(
        export.main, ["--run", str(run), "--dtype", "int3", "--out", str(out)], capsys, "unknown dtype 'int3'", "int8"
    )
    _fails(export.main, ["--run", str(tmp_path), "--out", str(out)], capsys, "no config.yaml")
    # a checkpoint that does not match its config: the run's checkpoints under a config with other collisions
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").symlink_to(run / "checkpoints")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["embeddings"]["collisions"] = 8
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    _fails(
        export.main,
        ["--run", str(other), "--out", str(out)],
        capsys,
        "does not match",
        "t_cat_",
        "__p0.weight",
        "shape",
    )
    assert not out.exists() and not list(tmp_path.glob(".model*"))
    out.mkdir()
    _fails(export.main, ["--run", str(run), "--out", str(out)], capsys, f"{out} exists")


def test_predict_bad_inputs(trained, tmp_path, capsys):
    run, _, test = trained
    model = tmp_path / "model"
    assert export.main(["--run", str(run), "--dtype", "fp16", "--out", str(model)]) == 0
    lines = test.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines[:6]) + lines[6].replace("\t", " ", 1) + "".join(lines[7:20]))
    preds = tmp_path / "preds.tsv"
    _fails(predict.main, ["--model", str(model), "--data", str(bad), "--out", str(preds)], capsys, f"{bad}:7")
    assert not preds.exists() and not list(tmp_path.glob(".preds*"))
    preds.write_text("keep\n")
    _fails(predict.main, ["--model", str(model), "--data", str(test), "--out", str(preds)], capsys, f"{preds} exists")
    assert preds.read_text() == "keep\n"
    _fails(predict.main, ["--model", str(tmp_path), "--data", str(test)], capsys, "no manifest.json")
    weights = model / "weights.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    _fails(
        predict.main,
        ["--model", str(model), "--data", str(test), "--out", str(tmp_path / "p2")],
        capsys,
        "weights.pt: missing or altered",
    )
    shutil.rmtree(model)


def test_predict_unlabeled_lines(trained, tmp_path, capsys):
    """Criteo's test files have no label field: same probabilities as the labeled lines, no metrics."""
    run, _, test = trained
    model = tmp_path / "model"
    assert export.main(["--run", str(run), "--out", str(model)]) == 0
    lines = test.read_text().splitlines(keepends=True)[:300]
    labeled, unlabeled = tmp_path / "labeled.tsv", tmp_path / "unlabeled.tsv"
    labeled.write_text("".join(lines))
    unlabeled.write_text("".join(line.split("\t", 1)[1] for line in lines))
    (a,), (b,) = iter_criteo_tsv(labeled), iter_criteo_tsv(unlabeled, labeled=False)
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert not b.labels.any()
    for path, out in ((labeled, "a.tsv"), (unlabeled, "b.tsv")):
        assert predict.main(["--model", str(model), "--data", str(path), "--out", str(tmp_path / out)]) == 0
    report = capsys.readouterr().out
    assert "(no labels: no log loss or AUC)" in report and report.count("  AUC 0.") == 1
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()
    broken = tmp_path / "broken.tsv"
    fields = lines[4].split("\t")[1:]
    fields[20] = "xyz"  # column 21 of an unlabeled line: cat_7
    broken.write_text("".join(line.split("\t", 1)[1] for line in lines[:4]) + "\t".join(fields))
    _fails(predict.main, ["--model", str(model), "--data", str(broken)], capsys, f"{broken}:5: column 21 (cat_7)")
