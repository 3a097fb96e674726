"""Config loading: every mistake is reported with its key path, before any process group starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrec_qr.train.config import (
    ConfigError,
    load_config,
    num_steps,
    parse_overrides,
    validate,
)
from torchrec_qr.train.run_dir import RUN_MARKER, check_run_dir

ROOT = Path(__file__).resolve().parents[1]


def _validated(*overrides: str, world_size: int = 2, cuda: bool = False):
    cfg = load_config(None, list(overrides))
    validate(cfg, world_size, cuda)
    return cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("embeddings.combine=mul", "embeddings.combine: must be one of mult/add/concat/path, got 'mul'"),
        ("embeddings.combin=mult", "embeddings.combin: unknown key; did you mean 'embeddings.combine'?"),
        ("embeddings.kind=qr", "embeddings.kind: must be one of full/hash/compositional/auto, got 'qr'"),
        ("data.global_batch_size=abc", "data.global_batch_size: expected an integer, got 'abc'"),
        ("data.global_batch_size=1.5", "data.global_batch_size: expected an integer, got 1.5"),
        ("model.dense_arch_layer_sizes=[64,x]", "model.dense_arch_layer_sizes[1]: expected an integer, got 'x'"),
        ("optimizer.dense.lr=fast", "optimizer.dense.lr: expected a number, got 'fast'"),
        ("run.overwrite=yes please", "run.overwrite: expected true/false, got 'yes please'"),
        ("optimizer.sparse=adagrad", "optimizer.sparse: expected a mapping of SparseOptimizerConfig keys"),
        ("sharding.sharding_types=[row_wize]", "sharding.sharding_types[0]: must be one of table_wise/"),
        ("data.synthetic.cardinalities=[5,6]", "data.synthetic: cardinalities must be 26 ints >= 2"),
        ("dat.source=criteo", "dat: unknown key; did you mean 'data'?"),
        ("novalue", "override 'novalue': expected key=value"),
        ("embeddings.path.kind=conv", "embeddings.path: path function kind must be one of ('linear', 'mlp')"),
        ("embeddings.path.hidden=[0]", "embeddings.path: path function hidden sizes must be positive ints"),
    ],
)
def test_type_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.embedding_dim=32"],
            "model.dense_arch_layer_sizes: the last size (16) must equal model.embedding_dim (32)",
        ),
        (["model.over_arch_layer_sizes=[64,2]"], "model.over_arch_layer_sizes: must end with 1"),
        (["data.global_batch_size=255"], "data.global_batch_size: must be a positive multiple of the world size 2"),
        (
            ["embeddings.kind=compositional", "embeddings.num_partitions=3"],
            "embeddings.num_partitions: scheme qr has exactly 2",
        ),
        (
            [
                "embeddings.kind=compositional",
                "embeddings.combine=concat",
                "embeddings.scheme=mixed_radix",
                "embeddings.num_partitions=4",
                "model.embedding_dim=24",
                "model.dense_arch_layer_sizes=[24]",
            ],
            "embeddings.combine: concat sub-tables of width 6 are not a multiple of 4",
        ),
        (
            [
                "embeddings.kind=compositional",
                "embeddings.combine=concat",
                "embeddings.scheme=mixed_radix",
                "embeddings.num_partitions=3",
            ],
            "embeddings.combine: concat splits model.embedding_dim=16 into 3 parts",
        ),
        (
            [
                "embeddings.kind=compositional",
                "embeddings.combine=concat",
                "embeddings.scheme=chinese_remainder",
                "embeddings.num_partitions=8",
                "model.embedding_dim=4",
                "model.dense_arch_layer_sizes=[4]",
            ],
            "embeddings: table 't_cat_0': embedding_dim=4 cannot be split into 8 parts",
        ),  # the library's own check
        (["optimizer.sparse.type=adam"], "optimizer.sparse.type: fused 'adam' needs a GPU"),
        (["run.device=cuda"], "run.device: 'cuda' requested but no GPU is visible"),
        (["data.source=criteo"], "invalid config:\n  data.criteo_path: required when data.source=criteo"),
        (["sharding.plan_file=/nonexistent.yaml"], "sharding.plan_file: /nonexistent.yaml is not a file"),
        (
            ["model.embedding_dim=18", "model.dense_arch_layer_sizes=[18]"],
            "model.embedding_dim: fused TBE kernels need a multiple of 4",
        ),
        (["train.max_steps=0"], "train.max_steps: must be > 0, got 0"),
        (
            ["embeddings.kind=compositional", "embeddings.combine=path", "embeddings.composition=pooled"],
            "embeddings.composition: combine=path composes each id; use per_id",
        ),
    ],
)
def test_impossible_combinations_are_rejected(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _validated(*overrides)
    assert str(info.value).startswith(message), str(info.value)


def test_all_errors_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        _validated("model.over_arch_layer_sizes=[8,2]", "data.global_batch_size=3", "train.epochs=0")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 4


def test_all_type_errors_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.global_batch_size=x", "run.overwrite=maybe", "embeddings.combin=add"])
    assert str(info.value).splitlines() == [
        "invalid config:",
        "  run.overwrite: expected true/false, got 'maybe'",
        "  data.global_batch_size: expected an integer, got 'x'",
        (
            "  embeddings.combin: unknown key; did you mean 'embeddings.combine'? known keys: kind, scheme, "
            "collisions, num_partitions, combine, composition, threshold, path, hot_rows, memory_per_rank"
        ),
    ]


def test_overrides_parse_yaml_values() -> None:
    tree = parse_overrides(["a.b=1", "a.c=[1, 2]", "a.d=null", "e=true", "f=0.5", "g=text"])
    assert tree == {"a": {"b": 1, "c": [1, 2], "d": None}, "e": True, "f": 0.5, "g": "text"}
    cfg = _validated("embeddings.kind=hash", "train.max_steps=7", "data.synthetic.num_rows=1000")
    assert (cfg.embeddings.kind, cfg.train.max_steps, cfg.data.synthetic.num_rows) == ("hash", 7, 1000)
    assert cfg.run.name == "default"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, [f"data.criteo_path={tmp_path}"] if "criteo" in path.name else [])
    assert cfg.run.name == path.stem
    validate(cfg, world_size=2, cuda_available="dcn" in path.name)  # fused Adam (DCN config) needs a GPU


def test_unknown_section_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("embeddings:\n  kind: hash\noptimiser:\n  dense: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"^optimiser: unknown key; did you mean 'optimizer'\?"):
        load_config(path)


def test_steps_count_whole_global_batches() -> None:
    cfg = _validated("data.global_batch_size=100", "train.epochs=3")
    assert num_steps(cfg, 1050) == (10, 30)
    cfg = _validated("data.global_batch_size=100", "train.epochs=3", "train.max_steps=25")
    assert num_steps(cfg, 1050) == (10, 25)


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "r" / "checkpoints" / "step_000010").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step_000010" / ".metadata").write_text("")
    (tmp_path / "r" / RUN_MARKER).write_text("{}")
    base = [f"run.output_dir={tmp_path}", "run.name=r"]
    with pytest.raises(ConfigError, match=r"^run.name: .* already holds a run \(latest checkpoint step_000010\)"):
        check_run_dir(load_config(None, base))
    check_run_dir(load_config(None, base + ["checkpoint.resume=true"]))
    check_run_dir(load_config(None, base + ["run.overwrite=true"]))
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: no checkpoint under"):
        check_run_dir(load_config(None, [f"run.output_dir={tmp_path}", "run.name=other", "checkpoint.resume=true"]))


def test_cli_rejects_bad_config_before_starting_processes() -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrec_qr.train",
            "--config",
            str(ROOT / "configs" / "synthetic_qr_mult.yaml"),
            "embeddings.combine=mul",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: embeddings.combine: must be one of mult/add/concat/path, got 'mul'" in proc.stderr
    assert "process group" not in proc.stderr.lower()
    assert time.monotonic() - start < 60


def test_yaml11_exponent_floats_are_numbers_and_non_finite_values_are_rejected() -> None:
    cfg = load_config(None, ["optimizer.dense.lr=1e-3", "optimizer.sparse.lr=2E+1"])
    assert cfg.optimizer.dense.lr == 0.001 and cfg.optimizer.sparse.lr == 20.0
    with pytest.raises(ConfigError, match=r"optimizer.dense.lr: expected a number, got 'fast'"):
        load_config(None, ["optimizer.dense.lr=fast"])
    for value in (".inf", ".nan", "-.inf"):
        with pytest.raises(ConfigError, match=r"optimizer.sparse.lr: must be a finite number, got"):
            validate(load_config(None, [f"optimizer.sparse.lr={value}"]), 1, False)
