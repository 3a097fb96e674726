"""The training run: data, DMP model, optimizers, TrainPipelineSparseDist loop, eval, checkpoints.

The loop runs in *segments* between boundaries (evaluation, checkpoint, fault-injection and epoch
steps): each segment's batches are fed through the pipeline until it drains, so at every boundary all
consumed batches are fully applied and the step count is the data position. That is what makes
checkpoints exact: resuming at step k replays nothing and skips nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from tqdm import tqdm

from torchrec_qr.distributed import ShardedCompositionalEmbeddingBagCollection
from torchrec_qr.distributed.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from torchrec_qr.distributed.plan_io import load_plan_yaml, save_plan_yaml
from torchrec_qr.distributed.planner import default_sharders, plan_model
from torchrec_qr.train.config import ConfigError, TrainingConfig, config_to_dict, num_steps
from torchrec_qr.train.data import GlobalBatchIterator, HashIds, eval_batches, prepare_splits
from torchrec_qr.train.memory import memory_report, totals
from torchrec_qr.train.metrics import EvalMetrics, MetricsLog
from torchrec_qr.train.model import build_model, logical_tables, table_configs
from torchrec_qr.train.optim import build_optimizer, fused_params

__all__ = ["DistEnv", "check_plan_file", "check_run_dir", "checkpoint_root", "run_dir", "train"]

logger = logging.getLogger(__name__)

SHARDING_TYPES_FILE = "sharding_types.json"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def run_dir(cfg: TrainingConfig) -> Path:
    assert cfg.run.name is not None
    return Path(cfg.run.output_dir) / cfg.run.name


def checkpoint_root(cfg: TrainingConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def is_restart() -> bool:
    """Whether torchrun restarted this worker group after a failure (then the run always resumes)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def check_run_dir(cfg: TrainingConfig) -> None:
    """Refuse to mix a fresh run into an old one, or to resume nothing; runs before any process group."""
    found = list_checkpoints(checkpoint_root(cfg))
    if cfg.checkpoint.resume and not found and not is_restart():
        raise ConfigError(
            f"checkpoint.resume: no checkpoint under {checkpoint_root(cfg)}; start without --resume, or set "
            "run.name / checkpoint.dir to the run to continue"
        )
    if found and not cfg.checkpoint.resume and not cfg.run.overwrite and not is_restart():
        raise ConfigError(
            f"run.name: {run_dir(cfg)} already holds a run (latest checkpoint {found[-1].name}); continue it "
            "with --resume, replace it with run.overwrite=true, or choose another run.name"
        )


def check_plan_file(cfg: TrainingConfig, world_size: int, local_world_size: int, device_type: str) -> None:
    """Check ``sharding.plan_file`` against the model (built on meta from the config), before any process group."""
    if cfg.sharding.plan_file is None:
        return
    from torchrec_qr.plan import num_embeddings

    model = build_model(cfg, table_configs(cfg, num_embeddings(cfg)), torch.device("meta"))
    try:
        load_plan_yaml(cfg.sharding.plan_file, model, world_size, device_type, local_world_size=local_world_size)
    except ValueError as e:
        raise ConfigError(f"sharding.plan_file: {e}") from e


def _plan(cfg: TrainingConfig, model: torch.nn.Module, sharders: list, env: DistEnv,
          pinned: dict[str, str] | None) -> ShardingPlan:
    """The plan file's plan, else the planner's; ``pinned`` fixes each table's sharding type (on resume:
    a table keeps its optimizer, fused or dense, so its optimizer state loads at any world size)."""
    if cfg.sharding.plan_file is not None:
        return load_plan_yaml(cfg.sharding.plan_file, model, env.world_size, env.device.type,
                              local_world_size=env.local_world_size, sharders=sharders)
    names = [t.name for t in model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()]
    allowed = {n: list(cfg.sharding.sharding_types) for n in names} if cfg.sharding.sharding_types else {}
    allowed.update({n: [pinned[n]] for n in names if pinned and n in pinned})
    return plan_model(
        model, env.world_size,
        constraints={n: ParameterConstraints(sharding_types=types) for n, types in allowed.items()} or None,
        batch_size=cfg.data.global_batch_size // env.world_size, sharders=sharders,
        compute_device=env.device.type, local_world_size=env.local_world_size, pg=dist.GroupMember.WORLD,
    )


def _write_plan(plan: ShardingPlan, directory: Path, world_size: int) -> None:
    (directory / "plan.txt").write_text(str(plan) + "\n")
    save_plan_yaml(plan, directory / "plan.yaml", world_size)
    (directory / SHARDING_TYPES_FILE).write_text(json.dumps(_sharding_types(plan), indent=1) + "\n")


def _sharding_types(plan: ShardingPlan) -> dict[str, str]:
    return {table: ps.sharding_type for module in plan.plan.values() for table, ps in module.items()}


def _allow_pipelining(model: torch.nn.Module) -> None:
    """Let TrainPipelineSparseDist accept sharded compositional collections.

    Their physical sub-table collection is a ShardedEmbeddingBagCollection whose lookups are called
    locally; its own input dist never runs, and the pipeline asserts every sharded child's did.
    """
    for m in model.modules():
        if isinstance(m, ShardedCompositionalEmbeddingBagCollection):
            m._embedding_bag_collection._has_uninitialized_input_dist = False


def _mean_over_ranks(total: float, count: int) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1])


def _evaluate(pipeline, model, arrays, cfg: TrainingConfig, env: DistEnv, max_batches, transform) -> dict[str, float]:
    per_rank = -(-cfg.data.eval_batch_size // env.world_size)
    batches = eval_batches(arrays, cfg.data.eval_batch_size, env.rank, env.world_size, max_batches, transform)
    max_samples = len(arrays) // env.world_size
    metrics = EvalMetrics(env.world_size, env.rank, per_rank, max_samples)
    model.eval()
    with torch.no_grad():
        while True:
            try:
                _, logits, labels = pipeline.progress(batches)
            except StopIteration:
                break
            metrics.update(logits, labels)
    model.train()
    return {**metrics.compute(), "samples": metrics.num_samples * env.world_size}


def _maybe_fail(cfg: TrainingConfig, step: int, env: DistEnv) -> None:
    """Test hook: one rank SIGKILLs itself once at ``run.fail_at_step`` (a marker file makes it once)."""
    if cfg.run.fail_at_step != step or env.rank != min(1, env.world_size - 1):
        return
    marker = run_dir(cfg) / f".failed_at_step_{step}"
    if marker.exists():
        return
    marker.touch()
    logger.warning("run.fail_at_step=%d: rank %d kills itself (SIGKILL)", step, env.rank)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainingConfig, env: DistEnv) -> dict[str, Any]:
    """Run training to the end; returns the run summary (same on every rank)."""
    out = run_dir(cfg)
    ckpt_root = checkpoint_root(cfg)
    resume_from = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume or is_restart() else None
    if env.rank == 0:
        if resume_from is None and cfg.run.overwrite and not is_restart():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(ckpt_root, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    dist.barrier()

    torch.manual_seed(cfg.run.seed)
    splits = prepare_splits(cfg, env.rank, env.local_rank, dist.barrier)
    per_epoch, total = num_steps(cfg, len(splits.train))
    if per_epoch == 0:
        raise ValueError(
            f"data.global_batch_size={cfg.data.global_batch_size} exceeds the {len(splits.train)} training rows"
        )
    logical = logical_tables(splits.num_embeddings, cfg.model.embedding_dim)
    tables = table_configs(cfg, splits.num_embeddings)
    transform = None
    if cfg.embeddings.kind == "hash":
        transform = HashIds({t.feature_names[0]: t.num_embeddings for t in tables})

    model = build_model(cfg, tables, env.device)
    fp = fused_params(cfg.optimizer.sparse)
    sharders = default_sharders(fp)
    pinned_file = out / SHARDING_TYPES_FILE
    pinned = json.loads(pinned_file.read_text()) if resume_from is not None and pinned_file.exists() else None
    plan = _plan(cfg, model, sharders, env, pinned)
    if env.rank == 0:
        _write_plan(plan, out, env.world_size)
    dmp = DistributedModelParallel(model, device=env.device, sharders=sharders, plan=plan)
    optimizer = build_optimizer(dmp, cfg.optimizer.dense)

    step = 0
    if resume_from is not None:
        extra = load_checkpoint(resume_from, dmp, optimizer)
        step = int(extra["step"])
        logger.info("resumed from %s at step %d", resume_from, step)
    log = MetricsLog(out, env.rank == 0, cfg.run.tensorboard, step if resume_from is not None else None)
    last_saved = step if resume_from is not None else None

    def save() -> Path:
        nonlocal last_saved
        last_saved = step
        return save_checkpoint(ckpt_root, step, dmp, optimizer, extra={"step": step}, overwrite=True)

    t, ck, fail = cfg.train, cfg.checkpoint, cfg.run.fail_at_step
    _allow_pipelining(dmp)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
               disable=env.rank != 0 or not cfg.run.progress_bar)
    local_batch = cfg.data.global_batch_size // env.world_size
    loss_sum, loss_count, train_time, steps_run = 0.0, 0, 0.0, 0
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        batches = iter(GlobalBatchIterator(splits.train, cfg.data.global_batch_size, env.rank, env.world_size,
                                           cfg.data.shuffle, cfg.run.seed, epoch, in_epoch, transform))
        epoch_end = min((epoch + 1) * per_epoch, total)
        while step < epoch_end:
            stops = [epoch_end] + [(step // n + 1) * n for n in (t.eval_every_steps, ck.every_steps) if n]
            if fail is not None and fail > step:
                stops.append(fail)
            segment = itertools.islice(batches, min(stops) - step)
            start = time.perf_counter()
            while True:
                try:
                    loss, _, _ = pipeline.progress(segment)
                except StopIteration:
                    break
                step += 1
                steps_run += 1
                loss_sum, loss_count = loss_sum + float(loss), loss_count + 1
                bar.update(1)
                if step % t.log_every_steps == 0:
                    mean = _mean_over_ranks(loss_sum, loss_count)
                    rate = steps_run * cfg.data.global_batch_size / (train_time + time.perf_counter() - start)
                    bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}")
                    log.write("train", step, loss=mean, samples_per_s=rate, epoch=epoch)
                    loss_sum, loss_count = 0.0, 0
            train_time += time.perf_counter() - start
            if ck.every_steps and step % ck.every_steps == 0:
                save()
            _maybe_fail(cfg, step, env)
            if t.eval_every_steps and step % t.eval_every_steps == 0 and step < total:
                val = _evaluate(pipeline, dmp, splits.val, cfg, env, t.eval_max_batches, transform)
                log.write("eval", step, split="val", **val)
                logger.info("step %d val: %s", step, val)
    bar.close()

    checkpoint = None
    if ck.at_end and last_saved != step:
        checkpoint = save()
    elif last_saved is not None:
        checkpoint = ckpt_root / f"step_{last_saved:06d}"
    final = {split: _evaluate(pipeline, dmp, getattr(splits, split), cfg, env, None, transform)
             for split in ("val", "test")}
    for split, values in final.items():
        log.write("final", step, split=split, **values)

    sharding_types = _sharding_types(plan)
    report = memory_report(logical, tables, sharding_types, cfg.optimizer.sparse.type, cfg.optimizer.dense.type)
    samples_per_s = steps_run * cfg.data.global_batch_size / train_time if train_time > 0 else 0.0
    summary = {
        "run_dir": str(out),
        "world_size": env.world_size,
        "steps": step,
        "steps_this_run": steps_run,
        "resumed_from": str(resume_from) if resume_from else None,
        "global_batch_size": cfg.data.global_batch_size,
        "local_batch_size": local_batch,
        "train_seconds": train_time,
        "samples_per_s": samples_per_s,
        "metrics": final,
        "memory": totals(report),
        "tables": [r.as_dict() for r in report],
        "malformed_lines_skipped": splits.num_malformed,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "outputs": {"metrics": str(log.path), "tensorboard": str(out / "tensorboard"),
                    "config": str(out / "config.yaml"), "plan": str(out / "plan.yaml"),
                    "summary": str(out / "summary.json")},
    }
    log.write("summary", step, samples_per_s=samples_per_s, train_seconds=train_time,
              param_bytes=summary["memory"]["param_bytes"], compression=summary["memory"]["compression"])
    log.close()
    if env.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
