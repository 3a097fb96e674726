"""Evaluation metrics (TorchRec's NE / log loss, AUC, accuracy) and the run's metric log.

TorchRec's ``RecMetric`` s accumulate sufficient statistics per rank and reduce them across the process
group on ``compute``, so every rank gets the metrics of the whole evaluation set.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torchrec.metrics.accuracy import AccuracyMetric
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

__all__ = ["EvalMetrics", "MetricsLog"]

logger = logging.getLogger(__name__)

_TASK = RecTaskInfo(name="ctr")
_END_OF_RUN_EVENTS = ("final", "summary")
_NAMES = {
    "ne": "ne-ctr|lifetime_ne",
    "log_loss": "ne-ctr|lifetime_logloss",
    "auc": "auc-ctr|window_auc",
    "accuracy": "accuracy-ctr|lifetime_accuracy",
}


class EvalMetrics:
    """Log loss (nats), NE, AUC and accuracy (threshold 0.5) over all ranks' predictions.

    Args:
        world_size, rank: the process group's.
        batch_size: this rank's batch size (TorchRec sizes its buffers with it).
        max_samples: an upper bound on samples per rank; AUC keeps every prediction up to it.
        device: where predictions arrive and states live (the process group's device: NCCL needs GPU).
    """

    def __init__(
        self, world_size: int, rank: int, batch_size: int, max_samples: int, device: torch.device | None = None
    ) -> None:
        device = device if device is not None else torch.device("cpu")
        kw = dict(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=[_TASK], compute_on_all_ranks=True)
        window = max(max_samples, batch_size) * world_size  # per rank: RecMetric divides by world_size
        self._metrics = [
            NEMetric(**kw, window_size=window, include_logloss=True),
            AUCMetric(**kw, window_size=window),
            AccuracyMetric(**kw, window_size=window),
        ]
        for m in self._metrics:
            m.to(device)
        self.num_samples = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        preds = {"ctr": torch.sigmoid(logits.detach().float().reshape(-1))}
        target = {"ctr": labels.detach().float().reshape(-1)}
        weights = {"ctr": torch.ones_like(target["ctr"])}
        for m in self._metrics:
            m.update(predictions=preds, labels=target, weights=weights)
        self.num_samples += target["ctr"].numel()

    def compute(self) -> dict[str, float]:
        values: dict[str, Any] = {}
        for m in self._metrics:
            values.update(m.compute())
        out = {name: float(values[key].reshape(-1)[0]) for name, key in _NAMES.items()}
        out["log_loss"] *= math.log(2)  # TorchRec's is in bits; report nats, the unit of BCE and the paper
        return out


class MetricsLog:
    """``metrics.jsonl`` (one JSON record per event) and TensorBoard scalars; written by rank 0 only.

    On resume, records after the resumed step (and end-of-run records) are dropped, so the log reads as
    one uninterrupted run.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [json.dumps(r) for r in records if r["step"] <= resume_step and r["event"] not in _END_OF_RUN_EVENTS]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"{event}/{k}", v, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
