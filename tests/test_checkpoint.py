"""Checkpoints of DMP-sharded models: atomic save, resharded load (other plan, other world size, unsharded),
full gather, extras and RNG states.

One world-size-2 run (module fixture) trains, saves, crashes a save, and reloads into another plan; the
tests below check its results, and load its checkpoint at world size 1 in this process.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemWriter
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.distributed.checkpoint import (
    checkpoint_step,
    gather_full_state_dict,
    latest_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", num_embeddings=40, embedding_dim=8, feature_names=[f"f{i}"]) for i in range(3)
]
CW_TABLES = [EmbeddingBagConfig(name="c0", num_embeddings=30, embedding_dim=16, feature_names=["g0"])]
FUSED = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
BATCH = 4


class EbcDense(nn.Module):
    """An EBC and a linear layer over its pooled outputs (the sparse + dense split DMP works with)."""

    def __init__(self, tables: list[EmbeddingBagConfig], device: str | None = None) -> None:
        super().__init__()
        self.features = [f for t in tables for f in t.feature_names]
        self.ebc = EmbeddingBagCollection(tables, device=torch.device(device) if device else None)
        self.dense = nn.Linear(sum(t.embedding_dim for t in tables), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt)  # a sharded EBC may order keys differently: index by key
        return self.dense(torch.cat([kt[f] for f in self.features], dim=1))


class _CpuSharder(EmbeddingBagCollectionSharder):
    """Row-wise runs on CPU, but the base sharder lists it for GPUs only."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return sorted({*super().sharding_types(compute_device_type), "row_wise"})


def _batch(seed: int, tables: list[EmbeddingBagConfig] = TABLES) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in tables for f in t.feature_names]
    lengths = torch.randint(0, 4, (len(keys) * BATCH,), generator=g)
    values = torch.randint(0, tables[0].num_embeddings, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def _sharded(
    generators: dict[str, Any], tables: list[EmbeddingBagConfig] = TABLES, dtensor: bool = False
) -> DistributedModelParallel:
    ws = dist.get_world_size()
    model = EbcDense(tables, device="meta")
    sharder = _CpuSharder(fused_params=FUSED)
    plan = construct_module_sharding_plan(
        model.ebc, per_param_sharding=generators, sharder=sharder, local_size=ws, world_size=ws, device_type="cpu"
    )
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    env.output_dtensor = dtensor  # state dicts hold DTensor instead of ShardedTensor
    return DistributedModelParallel(
        model, env=env, device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}), sharders=[sharder]
    )


def _fused_kernels(opt: Any) -> list[SplitTableBatchedEmbeddingBagsCodegen]:
    """FBGEMM kernels are outside the module tree (sharded modules keep lookups in a list): ask the optimizer."""
    if isinstance(opt, CombinedOptimizer):
        return [k for _, o in opt.optimizers for k in _fused_kernels(o)]
    kernel = getattr(opt, "_emb_module", None)
    return [kernel] if isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen) else []


def _optimizer(dmp: DistributedModelParallel) -> CombinedOptimizer:
    """TorchRec's usual pair: the fused (in-backward) table optimizer and a keyed Adam for dense weights."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda params: torch.optim.Adam(params, lr=0.01)
    )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, kjt: KeyedJaggedTensor) -> None:
    opt.zero_grad()
    model(kjt).pow(2).mean().backward()
    opt.step()


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _gather_vs_local_shards(dmp: DistributedModelParallel, full: dict[str, torch.Tensor] | None) -> float:
    """Every rank's local shards against rank 0's gathered tensors (broadcast back)."""
    box = [full]
    dist.broadcast_object_list(box, src=0)
    full = box[0]
    worst = 0.0
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                worst = max(worst, (shard.tensor - full[key][r : r + h, c : c + w]).abs().max().item())
        else:
            worst = max(worst, (value - full[key]).abs().max().item())
    return worst


def _resume_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Train on plan A, save, crash a save, reload into plan B; continue both for one step."""
    root_path = Path(root)
    torch.manual_seed(0)
    plan_a = {
        "t0": table_wise(rank=0, compute_kernel="fused"),
        "t1": table_wise(rank=1, compute_kernel="fused"),
        "t2": table_wise(rank=1, compute_kernel="fused"),
    }
    plan_b = {
        "t0": row_wise(compute_kernel="fused"),
        "t1": row_wise(compute_kernel="fused"),
        "t2": table_wise(rank=0, compute_kernel="fused"),
    }
    dmp = _sharded(plan_a)
    opt = _optimizer(dmp)
    for step in range(3):
        _train_step(dmp, opt, _batch(100 * step + rank))
    for kernel in _fused_kernels(dmp.fused_optimizer):  # FBGEMM's Adam step counter (GPU); CPU Adagrad: 0
        kernel.iter.fill_(3)
    extra = {"data_pos": 3 + 10 * rank, "nested": {"ids": [rank, 7]}}
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(1000 + rank)
    path = save_checkpoint(root, 3, dmp, opt, extra=extra)
    draws_after_save = _draws()

    full = gather_full_state_dict(dmp)
    gather_err = _gather_vs_local_shards(dmp, full)
    eval_kjt, next_kjt = _batch(999), _batch(300 + rank)
    out_a = dmp(eval_kjt).detach()
    if rank == 0:
        torch.save({"full": full, "out": out_a}, root_path / "reference.pt")
    _train_step(dmp, opt, next_kjt)
    after_a = gather_full_state_dict(dmp)

    # A save that fails on rank 1 while rank 0's files are already in the temporary directory.
    write_data = FileSystemWriter.write_data

    def failing_write(self, plan, planner):  # type: ignore[no-untyped-def]
        if rank == 1:
            raise OSError("disk full (simulated)")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = failing_write  # type: ignore[method-assign]
    crash_error = None
    try:
        save_checkpoint(root, 4, dmp, opt)
    except Exception as e:
        crash_error = type(e).__name__
    finally:
        FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    latest_after_crash = latest_checkpoint(root)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    dmp_b = _sharded(plan_b)
    opt_b = _optimizer(dmp_b)
    loaded_extra = load_checkpoint(latest_after_crash, dmp_b, opt_b)
    draws_after_load = _draws()
    fused_steps = {int(k.iter) for k in _fused_kernels(dmp_b.fused_optimizer)}
    out_b = dmp_b(eval_kjt).detach()
    _train_step(dmp_b, opt_b, next_kjt)
    after_b = gather_full_state_dict(dmp_b)

    # Column-wise: 2 column shards saved, 4 wanted. Weights reshard; the rowwise momentum cannot.
    dmp_cw2 = _sharded({"c0": column_wise(ranks=[0, 1], compute_kernel="fused")}, CW_TABLES)
    cw_path = save_checkpoint(root_path / "cw", 0, dmp_cw2, dmp_cw2.fused_optimizer)
    dmp_cw4 = _sharded({"c0": column_wise(ranks=[0, 1, 0, 1], compute_kernel="fused")}, CW_TABLES)
    cw_error = ""
    try:
        load_checkpoint(cw_path, dmp_cw4, dmp_cw4.fused_optimizer)
    except ValueError as e:
        cw_error = str(e)
    load_checkpoint(cw_path, dmp_cw4)
    cw_kjt = _batch(5, CW_TABLES)
    cw_out_diff = (dmp_cw2(cw_kjt) - dmp_cw4(cw_kjt)).abs().max().item()

    # DTensor state dicts (env.output_dtensor): load the ShardedTensor checkpoint, save, load back.
    dmp_d = _sharded(
        {
            "t0": table_wise(rank=1, compute_kernel="fused"),
            "t1": row_wise(compute_kernel="fused"),
            "t2": table_wise(rank=0, compute_kernel="fused"),
        },
        dtensor=True,
    )
    opt_d = _optimizer(dmp_d)
    load_checkpoint(path, dmp_d, opt_d)
    full_d = gather_full_state_dict(dmp_d)
    d_path = save_checkpoint(root_path / "dtensor", 3, dmp_d, opt_d)
    dmp_e = _sharded(plan_b)
    load_checkpoint(d_path, dmp_e, _optimizer(dmp_e))
    full_e = gather_full_state_dict(dmp_e)

    return {
        "dtensor_diff": max(_max_diff(full_d, full), _max_diff(full_e, full)) if rank == 0 else 0.0,
        "fused_steps": fused_steps,
        "path": str(path),
        "crash_error": crash_error,
        "latest_after_crash": str(latest_after_crash),
        "step4_exists": (root_path / "step_000004").exists(),
        "extra": extra,
        "loaded_extra": loaded_extra,
        "draws_after_save": draws_after_save,
        "draws_after_load": draws_after_load,
        "gather_err": gather_err,
        "out_diff": (out_a - out_b).abs().max().item(),
        "continue_diff": _max_diff(after_a, after_b) if rank == 0 else 0.0,
        "cw_error": cw_error,
        "cw_out_diff": cw_out_diff,
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_ranks(_resume_worker, 2, str(root), timeout=120.0)


def test_reload_into_other_plan_gives_same_outputs_and_next_step(resumed) -> None:
    _, results = resumed
    for r in results:
        assert r["out_diff"] < 1e-6
    # Same parameters after one more step: fused rowwise-Adagrad momentum (table-wise -> row-wise) and the
    # dense Adam state were restored, not restarted.
    assert results[0]["continue_diff"] < 1e-6
    for r in results:
        assert r["fused_steps"] == {3}  # FBGEMM's own step counter, in no TorchRec state dict


def test_dtensor_state_dicts_save_load_and_gather(resumed) -> None:
    _, results = resumed
    assert results[0]["dtensor_diff"] == 0.0


def test_failed_save_leaves_previous_checkpoint_latest(resumed) -> None:
    root, results = resumed
    for r in results:
        assert r["crash_error"] is not None  # every rank learns of rank 1's failure (none hangs)
        assert r["latest_after_crash"] == r["path"] == str(root / "step_000003")
        assert not r["step4_exists"]
    assert latest_checkpoint(root) == root / "step_000003"
    assert checkpoint_step(latest_checkpoint(root)) == 3


def test_extras_and_rng_round_trip_per_rank(resumed) -> None:
    _, results = resumed
    for r in results:
        assert r["loaded_extra"] == r["extra"]
        assert r["draws_after_load"] == r["draws_after_save"]
    assert results[0]["extra"] != results[1]["extra"]


def test_column_shard_count_change_names_the_limitation(resumed) -> None:
    _, results = resumed
    for r in results:
        assert "column shard" in r["cw_error"] and "optimizer=None" in r["cw_error"]
        assert r["cw_out_diff"] < 1e-6  # weights alone reshard fine


def test_load_unsharded_at_world_size_1_without_process_group(resumed) -> None:
    root, results = resumed
    ref = torch.load(root / "reference.pt", weights_only=False)
    model = EbcDense(TABLES)
    extra = load_checkpoint(latest_checkpoint(root), model)
    assert extra == results[0]["extra"]  # another world size: rank 0's extras
    sd = model.state_dict()
    assert sd.keys() == ref["full"].keys()
    for key, value in sd.items():
        assert torch.equal(value, ref["full"][key]), key
    assert torch.allclose(model(_batch(999)), ref["out"], atol=1e-6)


def test_gather_full_state_dict(resumed) -> None:
    root, results = resumed
    full = torch.load(root / "reference.pt", weights_only=False)["full"]
    assert set(full) == set(EbcDense(TABLES).state_dict())  # no DMP / DDP prefixes
    assert all(type(v) is torch.Tensor for v in full.values())
    for r in results:
        assert r["gather_err"] == 0.0


@pytest.fixture
def gloo_world_of_one() -> Any:
    """A world-size-1 gloo group in this process (DMP needs one), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    from dist_harness import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_load_at_world_size_1_with_gloo_group(resumed, gloo_world_of_one) -> None:
    """Into DMP with another plan (every table on the one rank) and into the unsharded module."""
    root, _ = resumed
    ref = torch.load(root / "reference.pt", weights_only=False)
    dmp = _sharded({t.name: table_wise(rank=0, compute_kernel="fused") for t in TABLES})
    load_checkpoint(latest_checkpoint(root), dmp, _optimizer(dmp))
    assert _max_diff(gather_full_state_dict(dmp), ref["full"]) == 0.0
    plain = EbcDense(TABLES)
    load_checkpoint(latest_checkpoint(root), plain)
    kjt = _batch(999)
    assert torch.allclose(dmp(kjt), ref["out"], atol=1e-6)
    assert torch.allclose(plain(kjt), ref["out"], atol=1e-6)


# ------------------------------------------------------------------ single process: files and optimizers


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _mlp_step(model: nn.Module, opt: torch.optim.Optimizer | dict, seed: int) -> None:
    opts = list(opt.values()) if isinstance(opt, dict) else [opt]
    for o in opts:
        o.zero_grad()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    for o in opts:
        o.step()


def _mlp_opts(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    return {
        "first": torch.optim.Adam(model[0].parameters(), lr=0.01),
        "last": torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9),
    }


def test_plain_torch_optimizers_resume_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opts = _mlp_opts(model)
    fresh = save_checkpoint(tmp_path, 0, model, opts)  # before the first step: no Adam / momentum state yet
    fresh_model = _mlp()
    fresh_opts = _mlp_opts(fresh_model)
    load_checkpoint(fresh, fresh_model, fresh_opts)
    assert not any(o.state for o in fresh_opts.values())  # still fresh, as saved
    for s in range(2):
        _mlp_step(model, opts, s)
    opts["first"].param_groups[0]["lr"] = 0.005  # as a scheduler would
    path = save_checkpoint(tmp_path, 2, model, opts)
    _mlp_step(model, opts, 2)

    resumed_model = _mlp()
    resumed_opts = _mlp_opts(resumed_model)  # lazily created Adam / momentum states: empty until loaded
    load_checkpoint(path, resumed_model, resumed_opts)
    assert resumed_opts["first"].param_groups[0]["lr"] == 0.005
    _mlp_step(resumed_model, resumed_opts, 2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)

    other = _mlp()
    with pytest.raises(ValueError, match="same structure"):
        load_checkpoint(path, other, torch.optim.Adam(other.parameters()))


def test_optimizer_over_foreign_parameters_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a parameter of the model"):
        save_checkpoint(tmp_path, 0, _mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1))


def test_crash_before_publish_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    first = save_checkpoint(tmp_path, 1, model)

    def failing_write(self, plan, planner):  # type: ignore[no-untyped-def]
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(FileSystemWriter, "write_data", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, model)
    monkeypatch.undo()
    assert (tmp_path / ".step_000002.tmp").is_dir() and not (tmp_path / "step_000002").exists()
    assert latest_checkpoint(tmp_path) == first
    restored = _mlp()
    load_checkpoint(first, restored)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    save_checkpoint(tmp_path, 3, model)  # the next save clears the leftover
    assert not (tmp_path / ".step_000002.tmp").exists()


def test_latest_ignores_incomplete_and_keep_last_prunes(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    model = _mlp()
    for step in (5, 10, 20, 40):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [20, 40]
    (tmp_path / ".step_000080.tmp").mkdir()  # being written: never listed
    (tmp_path / "step_000090").mkdir()  # published, then emptied: listed, and found damaged
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000090"
    assert latest_intact_checkpoint(tmp_path) == tmp_path / "step_000040"
    with pytest.raises(ValueError, match="overwrite=True"):
        save_checkpoint(tmp_path, 40, model)
    save_checkpoint(tmp_path, 40, model, overwrite=True)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [20, 40, 90]
    with pytest.raises(ValueError, match="step_000090 is damaged: meta.json is missing"):
        load_checkpoint(tmp_path / "step_000090", model)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_000090", model, verify=False)


# ------------------------------------------------------------------------------ compositional collection


def _compositional_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from torchrec_qr import CompositionalEmbeddingBagCollection
    from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    module = _CompositionalModel(CompositionalEmbeddingBagCollection(_compositional_tables(), device="meta"))
    sharder = CompositionalEmbeddingBagCollectionSharder(fused_params=FUSED)
    plan = construct_module_sharding_plan(
        module.ebc,
        per_param_sharding={
            t.name: table_wise(rank=i % world_size, compute_kernel="fused")
            for i, t in enumerate(_compositional_tables())
        },
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        module,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder, EmbeddingBagCollectionSharder(fused_params=FUSED)],
    )
    kjt = _batch(7 + rank, _compositional_tables())
    dmp(kjt).pow(2).mean().backward()  # one fused update, so the weights are not just the initial ones
    path = save_checkpoint(root, 1, dmp, dmp.fused_optimizer)
    full = gather_full_state_dict(dmp)
    return {"path": str(path), "full": full, "out": dmp(_batch(11, _compositional_tables())).detach()}


def _compositional_tables() -> list[EmbeddingBagConfig]:
    from torchrec_qr import CompositionalEmbeddingBagConfig, QuotientRemainder

    return [
        CompositionalEmbeddingBagConfig(
            name="q0",
            num_embeddings=40,
            embedding_dim=8,
            feature_names=["f0"],
            partition=QuotientRemainder(7),
            combine="mult",
        ),
        EmbeddingBagConfig(name="p1", num_embeddings=40, embedding_dim=8, feature_names=["f1"]),
    ]


class _CompositionalModel(nn.Module):
    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt)
        return torch.cat([kt["f0"], kt["f1"]], dim=1)


def test_compositional_dmp_checkpoint_loads_into_unsharded_module(tmp_path: Path) -> None:
    from torchrec_qr import CompositionalEmbeddingBagCollection

    results = run_ranks(_compositional_worker, 2, str(tmp_path), timeout=90.0)
    model = _CompositionalModel(CompositionalEmbeddingBagCollection(_compositional_tables()))
    load_checkpoint(results[0]["path"], model)
    sd = model.state_dict()
    assert sd.keys() == results[0]["full"].keys()
    for key, value in sd.items():
        assert torch.equal(value, results[0]["full"][key]), key
    out = model(_batch(11, _compositional_tables()))
    for r in results:
        assert torch.allclose(out, r["out"], atol=1e-6)
