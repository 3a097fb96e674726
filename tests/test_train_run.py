"""Real runs under torchrun (2 CPU processes, gloo) on a tiny generated data set.

One uninterrupted run is the reference. A run whose rank 1 SIGKILLs itself mid-training under
``--max-restarts=1``, and a run stopped early and continued with ``--resume``, must end with the same
metrics and weights (1e-6). A resume at world size 1 and a two-"node" run (two torchrun invocations with a
c10d rendezvous on 127.0.0.1) must do the work. Success is judged from the outputs, not exit codes alone
(torchrun occasionally aborts at exit after finishing).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from torchrec_qr.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = str(ROOT / "configs" / "synthetic_qr_mult.yaml")  # launch/train.sh's default
CARDINALITIES = (
    "[10,12,15,20,30,40,50,70,100,130,170,220,300,400,500,700,900,1200,1600,2000,3000,4000,5000,7000,9000,12000]"
)
STEPS = 23  # 2 training days x 3000 rows // 256


def _tiny(out: Path, cache: Path, name: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"run.name={name}",
        f"data.cache_dir={cache}",
        "run.progress_bar=false",
        "data.synthetic.num_rows=3000",
        "data.synthetic.num_days=3",
        f"data.synthetic.cardinalities={CARDINALITIES}",
        "data.global_batch_size=256",
        "data.eval_batch_size=1024",
        "model.dense_arch_layer_sizes=[32,16]",
        "model.over_arch_layer_sizes=[32,1]",
        "train.eval_every_steps=8",
        "train.eval_max_batches=1",
        "train.log_every_steps=4",
        "checkpoint.every_steps=8",
    ]


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in sessions of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split() if (task / "children").exists() else []:
            out += [int(child), *_descendants(int(child))]
    return out


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run to completion; on timeout kill the process, its group and every descendant, then fail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = proc.returncode, out.read(), err.read()
    if timed_out:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{result[2][-4000:]}")
    return result


def _torchrun(args: list[str], timeout: float = 150, restarts: int = 0) -> tuple[int, str, str]:
    return _run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node=2",
            f"--max-restarts={restarts}",
            "-m",
            "torchrec_qr.train",
            "--config",
            CONFIG,
            *args,
        ],
        timeout,
    )


def _summary(run_dir: Path, output: tuple[int, str, str]) -> dict:
    path = run_dir / "summary.json"
    assert path.is_file(), f"no summary (exit code {output[0]}):\n{output[2][-4000:]}"
    return json.loads(path.read_text())


def _records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return {k: v for k, v in torch.load(out, weights_only=False)["model"].items() if isinstance(v, torch.Tensor)}


def _assert_same_run(a: dict, b: dict, tol: float = 1e-6) -> None:
    for split in ("val", "test"):
        for name in ("log_loss", "ne", "auc", "accuracy"):
            assert b["metrics"][split][name] == pytest.approx(a["metrics"][split][name], abs=tol), (split, name)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(dirs) -> tuple[Path, dict]:
    out, cache = dirs
    result = _torchrun(_tiny(out, cache, "reference"))
    assert "Run " in result[1] and "samples/s" in result[1], result[2][-4000:]
    return out / "reference", _summary(out / "reference", result)


def test_default_config_run_writes_metrics_checkpoints_and_summary(reference) -> None:
    run_dir, summary = reference
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["samples_per_s"] > 0
    assert [r["step"] for r in _records(run_dir, "train")] == list(range(4, STEPS + 1, 4))
    assert [r["step"] for r in _records(run_dir, "eval")] == [8, 16]
    finals = _records(run_dir, "final")
    assert [r["split"] for r in finals] == ["val", "test"] and all(0 < r["ne"] < 1.5 for r in finals)
    assert 0.5 < summary["metrics"]["test"]["auc"] <= 1.0
    assert summary["reference"]["bayes_log_loss"] < summary["metrics"]["test"]["log_loss"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000008", "step_000016", "step_000023"]
    assert summary["checkpoint"].endswith("step_000023")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "table_wise" in (run_dir / "plan.txt").read_text() or "data_parallel" in (run_dir / "plan.txt").read_text()
    compressed = [t for t in summary["tables"] if t["stored_as"].startswith("qr(c=4)/mult")]
    assert len(compressed) == 15 and summary["memory"]["compression"] > 2.5  # the 15 tables above 200 rows
    resolved = load_config(run_dir / "config.yaml")  # the resolved config is a runnable config
    assert resolved.embeddings.kind == "compositional" and resolved.data.global_batch_size == 256


def test_sigkill_mid_run_restarts_and_matches_uninterrupted(reference, dirs, tmp_path) -> None:
    out, cache = dirs
    result = _torchrun(_tiny(out, cache, "killed") + ["run.fail_at_step=12"], timeout=240, restarts=1)
    run_dir = out / "killed"
    summary = _summary(run_dir, result)
    assert (run_dir / ".failed_at_step_12").exists(), "the fault was not injected"
    assert summary["resumed_from"].endswith("step_000008") and summary["steps"] == STEPS
    _assert_same_run(reference[1], summary)
    assert [r["step"] for r in _records(run_dir, "eval")] == [8, 16]  # the replayed steps are not logged twice
    a = _weights(reference[0] / "checkpoints" / "step_000023", tmp_path)
    b = _weights(run_dir / "checkpoints" / "step_000023", tmp_path)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_resume_continues_exactly_and_at_another_world_size(reference, dirs, tmp_path) -> None:
    out, cache = dirs
    first = _torchrun(_tiny(out, cache, "resumed") + ["train.max_steps=12"])
    assert _summary(out / "resumed", first)["steps"] == 12
    shutil.copytree(out / "resumed", out / "resumed_ws1")

    summary = _summary(out / "resumed", _torchrun(["--resume", *_tiny(out, cache, "resumed")]))
    assert summary["resumed_from"].endswith("step_000012") and summary["steps_this_run"] == STEPS - 12
    _assert_same_run(reference[1], summary)
    assert [(r["step"], r["split"]) for r in _records(out / "resumed", "final")] == [(STEPS, "val"), (STEPS, "test")]
    a = _weights(reference[0] / "checkpoints" / "step_000023", tmp_path)
    b = _weights(out / "resumed" / "checkpoints" / "step_000023", tmp_path)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)

    # One process, no torchrun: the checkpoint is resharded and the same global batches follow.
    single = _run(
        [sys.executable, "-m", "torchrec_qr.train", "--config", CONFIG, "--resume", *_tiny(out, cache, "resumed_ws1")],
        timeout=150,
    )
    summary = _summary(out / "resumed_ws1", single)
    assert summary["world_size"] == 1 and summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - 12
    _assert_same_run(reference[1], summary, tol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(dirs) -> None:
    out, cache = dirs
    endpoint = f"127.0.0.1:{_free_port()}"
    # The planner's plan: across hosts it mixes table_row_wise plain tables with row_wise compositional ones.
    args = _tiny(out, cache, "two_nodes") + ["train.max_steps=10"]
    env = {"NPROC": "1", "MAX_RESTARTS": "0", "RDZV_ID": f"test{os.getpid()}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        nodes = [
            pool.submit(_run, ["bash", "launch/multinode.sh", "2", str(rank), endpoint, CONFIG, *args], 180, env)
            for rank in (0, 1)
        ]
        outputs = [node.result() for node in nodes]
    summary = _summary(out / "two_nodes", outputs[0])
    assert summary["world_size"] == 2 and summary["steps"] == 10 and summary["steps_this_run"] == 10
    assert [r["split"] for r in _records(out / "two_nodes", "final")] == ["val", "test"]
    assert "Run " in outputs[0][1] + outputs[1][1]
