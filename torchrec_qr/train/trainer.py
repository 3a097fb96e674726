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
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from torchrec_qr.data.criteo import CriteoArrays
from torchrec_qr.data.id_counts import cached_id_counts
from torchrec_qr.data.synthetic import bayes_log_loss
from torchrec_qr.distributed.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from torchrec_qr.distributed.planner import default_sharders
from torchrec_qr.plan import budget_plan
from torchrec_qr.train.config import TrainingConfig, config_to_dict, num_steps
from torchrec_qr.train.data import HashIds, eval_batches, prepare_splits, train_batches
from torchrec_qr.train.memory import memory_report, totals
from torchrec_qr.train.metrics import EvalMetrics, MetricsLog
from torchrec_qr.train.model import build_model, logical_tables, table_configs
from torchrec_qr.train.optim import build_optimizer, fused_params
from torchrec_qr.train.run_dir import checkpoint_root, is_restart, mark_run_dir, remove_previous_run, run_dir
from torchrec_qr.train.sharding import SHARDING_TYPES_FILE, make_plan, sharding_types, write_plan

__all__ = ["DistEnv", "Trainer", "TrainingDiverged", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


class TrainingDiverged(RuntimeError):
    """The loss (or a weight about to be checkpointed) is NaN or infinite: the run stops, saving nothing."""


def _nonfinite_entries(model: nn.Module) -> list[str]:
    """Names of this rank's floating-point state entries (its shards of sharded tables) holding NaN / inf."""
    bad = []
    for name, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            local = [s.tensor for s in value.local_shards()]
        elif isinstance(value, DTensor):
            local = [value.to_local()]
        else:
            local = [value] if isinstance(value, torch.Tensor) else []
        if any(t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()) for t in local):
            bad.append(name)
    return bad


class Trainer:
    """One run on this rank: built (and resumed) by the constructor, trained by ``fit``.

    Every rank constructs one with the same config; collectives (planning, checkpoints, metrics) keep
    them in step.
    """

    def __init__(self, cfg: TrainingConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.out, self.ckpt_root = run_dir(cfg), checkpoint_root(cfg)
        self.resume_from = None
        if cfg.checkpoint.resume or is_restart():  # the newest checkpoint that verifies (or strict: the newest)
            self.resume_from = latest_intact_checkpoint(self.ckpt_root, strict=cfg.checkpoint.strict_resume)
        if env.rank == 0:
            if self.resume_from is None and cfg.run.overwrite and not is_restart():
                remove_previous_run(cfg)
            mark_run_dir(self.out)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        dist.barrier()

        torch.manual_seed(cfg.run.seed)
        self.splits = prepare_splits(cfg, env.rank, env.local_rank, dist.barrier)
        self.steps_per_epoch, self.total_steps = num_steps(cfg, len(self.splits.train))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.global_batch_size={cfg.data.global_batch_size} exceeds the "
                f"{len(self.splits.train)} training rows"
            )
        self.logical = logical_tables(self.splits.num_embeddings, cfg.model.embedding_dim)
        counts = None
        if cfg.embeddings.hot_rows:  # every rank counts or reads the same cached counts (atomic writes)
            counts = cached_id_counts(self.splits.train.sparse, self.splits.num_embeddings, self.splits.cache_dir)
        budget = None  # kind=auto: storage and plan chosen together for embeddings.memory_per_rank
        if cfg.embeddings.kind == "auto":
            budget = budget_plan(
                cfg,
                self.splits.num_embeddings,
                env.world_size,
                local_world_size=env.local_world_size,
                device_type=env.device.type,
            )
        self.tables = budget.tables if budget else table_configs(cfg, self.splits.num_embeddings, counts)
        self.transform = None
        if cfg.embeddings.kind == "hash":
            self.transform = HashIds({t.feature_names[0]: t.num_embeddings for t in self.tables})

        model = build_model(cfg, self.tables, env.device)
        sharders = default_sharders(fused_params(cfg.optimizer.sparse))
        pinned_file = self.out / SHARDING_TYPES_FILE
        pinned = json.loads(pinned_file.read_text()) if self.resume_from and pinned_file.exists() else None
        self.plan = (
            budget.plan
            if budget
            else make_plan(cfg, model, sharders, env.world_size, env.local_world_size, env.device.type, pinned)
        )
        if env.rank == 0:
            write_plan(self.plan, self.out, env.world_size)
        self.model = DistributedModelParallel(model, device=env.device, sharders=sharders, plan=self.plan)
        self.optimizer = build_optimizer(self.model, cfg.optimizer.dense)

        self.step = 0
        if self.resume_from is not None:
            self.step = int(load_checkpoint(self.resume_from, self.model, self.optimizer, verify=False)["step"])
            logger.info("resumed from %s at step %d", self.resume_from, self.step)
        self.last_saved = self.step if self.resume_from is not None else None
        self.log = MetricsLog(
            self.out, env.rank == 0, cfg.run.tensorboard, self.step if self.resume_from is not None else None
        )
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, env.device, execute_all_batches=True)
        self.steps_run, self.train_seconds = 0, 0.0

    def fit(self) -> None:
        """Train from the current step to the last one, evaluating and checkpointing on the way."""
        cfg, t, ck = self.cfg, self.cfg.train, self.cfg.checkpoint
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=self.env.rank != 0 or not cfg.run.progress_bar,
        )
        # Losses stay on the device between log boundaries: no host sync per step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        loss_count = 0
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = iter(
                train_batches(
                    cfg, self.splits.train, self.env.rank, self.env.world_size, epoch, in_epoch, self.transform
                )
            )
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            while self.step < epoch_end:
                segment = itertools.islice(batches, self._next_boundary(epoch_end) - self.step)
                start = time.perf_counter()
                while True:
                    try:
                        loss, _, _ = self.pipeline.progress(segment)
                    except StopIteration:
                        break
                    self.step += 1
                    self.steps_run += 1
                    loss_sum, loss_count = loss_sum + loss.detach().double().sum(), loss_count + 1
                    bar.update(1)
                    if self.step % t.log_every_steps == 0:
                        mean = self._mean_loss(loss_sum, loss_count)
                        rate = self._samples_per_s(self.train_seconds + time.perf_counter() - start)
                        bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}")
                        self.log.write("train", self.step, loss=mean, samples_per_s=rate, epoch=epoch)
                        loss_sum, loss_count = torch.zeros_like(loss_sum), 0
                self.train_seconds += time.perf_counter() - start
                if loss_count:  # a boundary: no step since the last check goes unchecked
                    self._mean_loss(loss_sum.clone(), loss_count)
                if ck.every_steps and self.step % ck.every_steps == 0:
                    self.save()
                self._maybe_fail()
                if t.eval_every_steps and self.step % t.eval_every_steps == 0 and self.step < self.total_steps:
                    val = self.evaluate(self.splits.val, t.eval_max_batches)
                    self.log.write("eval", self.step, split="val", **val)
                    logger.info("step %d val: %s", self.step, val)
        bar.close()
        if ck.at_end and self.last_saved != self.step:
            self.save()

    def _mean_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        """The mean loss over ranks since the last log; raises ``TrainingDiverged`` on every rank if any
        rank's loss was NaN or infinite (a non-finite term makes the sum non-finite)."""
        t = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)])
        dist.all_reduce(t)
        total, n = t.tolist()
        if not math.isfinite(total):
            raise TrainingDiverged(
                f"step {self.step}: the training loss is {total} (NaN or infinite) in the last {count} steps; the "
                f"run stops without checkpointing it (last checkpoint: {self._last_checkpoint()}). Lower "
                "optimizer.sparse.lr / optimizer.dense.lr, or check the data for NaN or infinite dense features"
            )
        return total / n

    def _last_checkpoint(self) -> str:
        return f"step {self.last_saved}" if self.last_saved is not None else "none"

    def _next_boundary(self, epoch_end: int) -> int:
        every = (self.cfg.train.eval_every_steps, self.cfg.checkpoint.every_steps)
        stops = [epoch_end] + [(self.step // n + 1) * n for n in every if n]
        fail = self.cfg.run.fail_at_step
        return min(stops + ([fail] if fail is not None and fail > self.step else []))

    def _samples_per_s(self, seconds: float) -> float:
        return self.steps_run * self.cfg.data.global_batch_size / seconds if seconds > 0 else 0.0

    def _maybe_fail(self) -> None:
        """Test hook: one rank SIGKILLs itself once at ``run.fail_at_step`` (a marker file makes it once)."""
        if self.cfg.run.fail_at_step != self.step or self.env.rank != min(1, self.env.world_size - 1):
            return
        marker = self.out / f".failed_at_step_{self.step}"
        if marker.exists():
            return
        marker.touch()
        logger.warning("run.fail_at_step=%d: rank %d kills itself (SIGKILL)", self.step, self.env.rank)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def save(self) -> Path:
        """Checkpoint the current step, unless some rank's weights are NaN or infinite (then raise)."""
        box: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(box, _nonfinite_entries(self.model))
        bad = [(r, names) for r, names in enumerate(box) if names]
        if bad:
            rank, names = bad[0]
            raise TrainingDiverged(
                f"step {self.step}: {len(names)} weights hold NaN or infinite values on rank "
                f"{rank} (e.g. {names[:3]}); not checkpointing them (last checkpoint: {self._last_checkpoint()}). "
                "Lower optimizer.sparse.lr / optimizer.dense.lr"
            )
        self.last_saved = self.step
        return save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            extra={"step": self.step},
            keep_last=self.cfg.checkpoint.keep_last,
            overwrite=True,
        )

    def evaluate(self, arrays: CriteoArrays, max_batches: int | None = None) -> dict[str, float]:
        """Metrics of the current model over ``arrays`` (all ranks' shards), through the same pipeline."""
        cfg, env = self.cfg, self.env
        batches = eval_batches(arrays, cfg.data.eval_batch_size, env.rank, env.world_size, max_batches, self.transform)
        metrics = EvalMetrics(
            env.world_size,
            env.rank,
            -(-cfg.data.eval_batch_size // env.world_size),
            max_samples=len(arrays) // env.world_size,
            device=env.device,
        )
        self.model.eval()
        with torch.no_grad():
            while True:
                try:
                    _, logits, labels = self.pipeline.progress(batches)
                except StopIteration:
                    break
                metrics.update(logits, labels)
        self.model.train()
        return {**metrics.compute(), "samples": metrics.num_samples * env.world_size}

    def summary(self) -> dict[str, Any]:
        """Final val/test metrics, throughput and memory; written to ``summary.json`` and the metric log."""
        cfg = self.cfg
        final = {split: self.evaluate(getattr(self.splits, split)) for split in ("val", "test")}
        for split, values in final.items():
            self.log.write("final", self.step, split=split, **values)
        reference = None
        if cfg.data.source == "synthetic":  # what no model can beat, and what knowing nothing gives
            bayes = bayes_log_loss(cfg.data.synthetic)
            reference = {"bayes_log_loss": bayes.bayes_log_loss, "constant_log_loss": bayes.constant_log_loss}
        report = memory_report(
            self.logical, self.tables, sharding_types(self.plan), cfg.optimizer.sparse.type, cfg.optimizer.dense.type
        )
        summary = {
            "run_dir": str(self.out),
            "world_size": self.env.world_size,
            "steps": self.step,
            "steps_this_run": self.steps_run,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "global_batch_size": cfg.data.global_batch_size,
            "local_batch_size": cfg.data.global_batch_size // self.env.world_size,
            "train_seconds": self.train_seconds,
            "samples_per_s": self._samples_per_s(self.train_seconds),
            "metrics": final,
            "reference": reference,
            "memory": totals(report),
            "tables": [r.as_dict() for r in report],
            "malformed_lines_skipped": self.splits.num_malformed,
            "checkpoint": str(self.ckpt_root / f"step_{self.last_saved:06d}") if self.last_saved is not None else None,
            "outputs": {
                "metrics": str(self.log.path),
                "tensorboard": str(self.out / "tensorboard"),
                "config": str(self.out / "config.yaml"),
                "plan": str(self.out / "plan.yaml"),
                "summary": str(self.out / "summary.json"),
            },
        }
        self.log.write(
            "summary",
            self.step,
            samples_per_s=summary["samples_per_s"],
            train_seconds=self.train_seconds,
            param_bytes=summary["memory"]["param_bytes"],
            compression=summary["memory"]["compression"],
        )
        self.log.close()
        if self.env.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def train(cfg: TrainingConfig, env: DistEnv) -> dict[str, Any]:
    """Run training to the end; returns the run summary (the same on every rank)."""
    trainer = Trainer(cfg, env)
    trainer.fit()
    return trainer.summary()
