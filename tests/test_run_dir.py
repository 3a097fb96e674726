"""The run directory is never mixed, deleted or taken over: name checks, overwrite only of runs of ours,
one job at a time (lock), and resume only with a config that trains the same (or named changes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from torchrec_qr.train.__main__ import _parse_args
from torchrec_qr.train.config import ConfigError, config_to_dict, load_config
from torchrec_qr.train.run_dir import (
    RUN_MARKER,
    RunLock,
    check_run_dir,
    mark_run_dir,
    remove_previous_run,
    run_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp / 'runs'}", *overrides])


def _fake_run(cfg, step: int = 8) -> Path:
    """A run directory as the trainer leaves it: marker, config.yaml and one checkpoint."""
    out = run_dir(cfg)
    mark_run_dir(out)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (out / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    return out


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs"])
def test_names_that_leave_output_dir_are_rejected(tmp_path: Path, name: str) -> None:
    (tmp_path / "runs" / "keep").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    cfg = _cfg(tmp_path, f"run.name={name}", "run.overwrite=true")
    with pytest.raises(ConfigError, match=r"^run.name: .* is not a plain directory name"):
        check_run_dir(cfg)
    with pytest.raises(ConfigError, match="not a plain directory name"):
        remove_previous_run(cfg)
    assert (tmp_path / "runs" / "keep").is_dir() and (tmp_path / "x").is_dir()


def test_overwrite_removes_only_a_run_of_ours(tmp_path: Path) -> None:
    foreign = tmp_path / "runs" / "data"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("x")
    cfg = _cfg(tmp_path, "run.name=data", "run.overwrite=true")
    with pytest.raises(ConfigError, match=r"is not a torchrec_qr run directory \(no \.torchrec_qr_run"):
        check_run_dir(cfg)
    with pytest.raises(ConfigError, match="not a torchrec_qr run directory"):
        remove_previous_run(cfg)
    assert (foreign / "precious.txt").read_text() == "x"

    ours = _fake_run(_cfg(tmp_path, "run.name=mine"))
    sibling = _fake_run(_cfg(tmp_path, "run.name=other"))
    check_run_dir(_cfg(tmp_path, "run.name=mine", "run.overwrite=true"))
    remove_previous_run(_cfg(tmp_path, "run.name=mine", "run.overwrite=true"))
    assert not ours.exists() and (sibling / RUN_MARKER).is_file() and foreign.is_dir()


def test_overwrite_with_separate_checkpoint_dir_removes_only_checkpoints(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_000004").mkdir(parents=True)
    (ckpt / ".step_000008.tmp").mkdir()
    (ckpt / "notes.txt").write_text("keep")
    remove_previous_run(_cfg(tmp_path, "run.name=r", f"checkpoint.dir={ckpt}", "run.overwrite=true"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]


def test_fresh_run_refuses_a_run_without_checkpoints(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "run.name=r")
    mark_run_dir(run_dir(cfg))
    check_run_dir(cfg)  # only the marker: an empty run
    (run_dir(cfg) / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"already holds a run \(no checkpoint yet\)"):
        check_run_dir(cfg)


def _hold_lock(output_dir: Path) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from torchrec_qr.train.config import load_config\n"
        "from torchrec_qr.train.run_dir import RunLock\n"
        f"lock = RunLock(load_config(None, ['run.output_dir={output_dir}', 'run.name=r']))\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_job_on_the_same_run_is_refused_and_a_dead_holder_frees_it(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "run.name=r")
    holder = _hold_lock(tmp_path / "runs")
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=rf"run.name: .* is in use by another job \(pid {holder.pid} on "):
            RunLock(cfg, wait_s=0.5)
        assert time.monotonic() - start < 10
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale remains
        holder.wait()
    with RunLock(cfg):
        with pytest.raises(ConfigError, match="in use by another job"):
            RunLock(cfg)  # exclusive within one host too (a new open file description)
    RunLock(cfg).release()


def test_cli_second_job_exits_before_touching_the_run(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path / "runs")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torchrec_qr.train",
                f"run.output_dir={tmp_path / 'runs'}",
                "run.name=r",
                "run.overwrite=true",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "is in use by another job" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_resume_refuses_training_changes_and_lists_them(tmp_path: Path) -> None:
    _fake_run(_cfg(tmp_path, "run.name=r"))
    same = _cfg(
        tmp_path,
        "run.name=r",
        "checkpoint.resume=true",
        "train.max_steps=50",
        "train.log_every_steps=5",
        "run.progress_bar=false",
    )
    check_run_dir(same)  # length, logging and outputs may change
    changed = _cfg(
        tmp_path,
        "run.name=r",
        "checkpoint.resume=true",
        "data.global_batch_size=4096",
        "run.seed=3",
        "embeddings.combine=add",
    )
    with pytest.raises(ConfigError) as e:
        check_run_dir(changed)
    msg = str(e.value)
    assert msg.startswith("checkpoint.resume: the config differs from the run's")
    for line in ("data.global_batch_size: 2048 -> 4096", "run.seed: 0 -> 3", "embeddings.combine: 'mult' -> 'add'"):
        assert line in msg
    assert "--allow-config-change data.global_batch_size,embeddings.combine,run.seed" in msg
    with pytest.raises(ConfigError, match=r"run.seed: 0 -> 3") as e:
        check_run_dir(changed, ["data.global_batch_size", "embeddings"])
    assert "global_batch_size" not in str(e.value)
    check_run_dir(changed, ["data.global_batch_size", "embeddings", "run.seed"])
    with pytest.raises(ConfigError, match=r"--allow-config-change: \['run.sed'\] name no config key"):
        check_run_dir(changed, ["run.sed"])


def test_resume_of_a_config_stored_before_a_key_existed(tmp_path: Path) -> None:
    out = _fake_run(_cfg(tmp_path, "run.name=r"))
    stored = yaml.safe_load((out / "config.yaml").read_text())
    del stored["embeddings"]["threshold"]  # as if written before the key existed: its default applies
    stored["data"]["retired_key"] = 1  # a key that no longer exists cannot change training
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    check_run_dir(_cfg(tmp_path, "run.name=r", "checkpoint.resume=true"))
    with pytest.raises(ConfigError, match=r"embeddings.threshold: 0 -> 5"):
        check_run_dir(_cfg(tmp_path, "run.name=r", "checkpoint.resume=true", "embeddings.threshold=5"))


def test_cli_accepts_overrides_after_flags_and_lists_allowed_changes() -> None:
    args = _parse_args(
        [
            "--config",
            "c.yaml",
            "a.b=1",
            "--resume",
            "c.d=2",
            "--allow-config-change",
            "run.seed,x.y",
            "--allow-config-change=z",
        ]
    )
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume
    assert args.allow_config_change == ["run.seed", "x.y", "z"]
