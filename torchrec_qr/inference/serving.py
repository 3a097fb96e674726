"""The training app's models as serving artifacts: build from a run's config, fill from its checkpoint,
quantize, export; and the reverse, an export directory back to a model that scores batches.

The served model is the run's ``DLRM`` (``DLRMTrain.model``): ``model(dense, kjt)`` returns logits
``[B, 1]``. Inputs are preprocessed as in training (DLRM's dense transform, the run's ``max_ind_range`` /
cardinality moduli, and for hashed tables the run's ``id mod rows``): ``InputSpec`` carries those settings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_qr.data.criteo import CriteoArrays
from torchrec_qr.data.dataloader import make_batch
from torchrec_qr.distributed.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from torchrec_qr.inference.artifact import CONFIG, load_artifact, storage_report, write_artifact
from torchrec_qr.inference.modules import DTYPES, quantize_inference_model
from torchrec_qr.inference.quant_storage import DEFAULT_ROW_ALIGNMENT
from torchrec_qr.modules.compositional_embedding_modules import CompositionalEmbeddingBagCollection
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig
from torchrec_qr.plan import budget_plan
from torchrec_qr.train.config import CRITEO_NUM_DENSE, TrainingConfig, config_to_dict, load_config
from torchrec_qr.train.data import HashIds, num_embeddings
from torchrec_qr.train.model import build_model, logical_tables, table_configs

__all__ = [
    "InputSpec",
    "export_run",
    "float_model",
    "load_serving_model",
    "log_loss_auc",
    "run_tables",
    "saved_world_size",
    "score_rows",
]

logger = logging.getLogger(__name__)

_PROBE_BATCH = 8


@dataclass
class InputSpec:
    """How raw Criteo lines become model input, as the run's training did.

    Args:
        max_ind_range: ids are taken modulo this while parsing (None: as parsed).
        cardinalities: per-feature moduli applied while parsing (Criteo source only).
        hash_rows: hashed tables: feature -> rows; ids are taken mod rows before the lookup.

    Example::

        cfg = load_config("runs/<name>/config.yaml")
        spec = InputSpec.of(cfg, run_tables(cfg, world_size=2))
        chunks = iter_criteo_tsv("day_23.tsv", max_ind_range=spec.max_ind_range, cardinalities=spec.cardinalities)
        probs, labels = score_rows(model, spec, manifest["feature_names"], chunks, batch_size=4096)
    """

    max_ind_range: int | None
    cardinalities: list[int] | None
    hash_rows: dict[str, int] | None

    @staticmethod
    def of(cfg: TrainingConfig, tables: list[EmbeddingBagConfig]) -> InputSpec:
        d = cfg.data
        cardinalities = d.num_embeddings_per_feature if d.source == "criteo" else None
        hashed = {t.feature_names[0]: t.num_embeddings for t in tables} if cfg.embeddings.kind == "hash" else None
        return InputSpec(d.max_ind_range, list(cardinalities) if cardinalities else None, hashed)

    def transform(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return HashIds(self.hash_rows).kjt(kjt) if self.hash_rows else kjt


def run_tables(cfg: TrainingConfig, world_size: int) -> list[EmbeddingBagConfig]:
    """The tables a run trained, as the training app chooses them without reading data.

    ``embeddings.kind=auto`` runs plan storage for their world size (deterministic, so the saving world size,
    on one host, gives the run's tables back; a checkpoint that does not match is refused when loaded);
    ``HotIds`` tables get placeholder hot ids, which a checkpoint or quantized state dict replaces with the
    trained lists.
    """
    sizes = num_embeddings(cfg)
    if cfg.embeddings.kind == "auto":
        return budget_plan(cfg, sizes, world_size, local_world_size=world_size).tables
    return table_configs(cfg, sizes)


def float_model(cfg: TrainingConfig, tables: list[EmbeddingBagConfig]) -> nn.Module:
    """The run's ``DLRMTrain`` over ``tables`` on CPU with real (randomly initialized) tables, ready for a
    checkpoint.

    The training app builds tables on ``meta`` (DMP allocates the shards); here each embedding collection
    is rebuilt on CPU from its own configs.
    """
    model = build_model(cfg, tables, torch.device("cpu"))
    collections = (EmbeddingBagCollection, CompositionalEmbeddingBagCollection)
    for name, module in list(model.named_modules()):
        if isinstance(module, collections) and module.device.type == "meta":
            parent_name, _, attr = name.rpartition(".")
            cpu = type(module)(module.embedding_bag_configs(), is_weighted=module.is_weighted(), device="cpu")
            setattr(model.get_submodule(parent_name), attr, cpu)
    return model


def _quantized(model: nn.Module, dtype: str, row_alignment: int) -> nn.Module:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    return quantize_inference_model(model, DTYPES[dtype], row_alignment=row_alignment).eval()


def _table_manifest(cfg: TrainingConfig, tables: list[EmbeddingBagConfig], model: nn.Module) -> list[dict[str, Any]]:
    """Per logical table: how it is stored, its physical tables (dtype, bytes)."""
    stored = {r["name"]: r for r in storage_report(model)}
    out = []
    for logical, t in zip(logical_tables(num_embeddings(cfg), cfg.model.embedding_dim), tables):
        if isinstance(t, CompositionalEmbeddingBagConfig):
            kind = f"compositional {type(t.partition).__name__} {t.combine}"
            physical = [stored[s.name] for s in t.sub_table_configs()]
        else:
            kind, physical = ("hashed" if t.num_embeddings < logical.num_embeddings else "full"), [stored[t.name]]
        out.append(
            {
                "name": t.name,
                "features": list(t.feature_names),
                "rows": logical.num_embeddings,
                "dim": t.embedding_dim,
                "stored_as": kind,
                "storage": physical,
                "bytes": sum(p["bytes"] for p in physical),
            }
        )
    return out


def _probe(tables: list[EmbeddingBagConfig]) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """A fixed batch: in-range ids (one per feature and sample) and random dense rows."""
    g = torch.Generator().manual_seed(0)
    keys = [f for t in tables for f in t.feature_names]
    values = torch.cat(
        [torch.randint(t.num_embeddings, (_PROBE_BATCH,), generator=g) for t in tables for _ in t.feature_names]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, torch.ones(len(keys) * _PROBE_BATCH, dtype=torch.int32))
    return torch.rand(_PROBE_BATCH, CRITEO_NUM_DENSE, generator=g), kjt


def export_run(
    run: str | Path,
    out: str | Path,
    dtype: str = "int8",
    checkpoint: str | Path | None = None,
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> Path:
    """Quantize a training run's latest checkpoint (any world size) and write a serving artifact.

    Raises ValueError for an unknown dtype, a run without config or checkpoint, or a checkpoint that does
    not match the config (the message names the table entry); FileExistsError if ``out`` exists.
    """
    run = Path(run)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists: choose another --out, or remove it first")
    config_path = run / CONFIG
    if not config_path.is_file():
        raise ValueError(f"{run}: no {CONFIG}; pass a run directory written by python -m torchrec_qr.train")
    cfg = load_config(config_path)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints"
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(root)
    if path is None:
        raise ValueError(f"{root}: no complete checkpoint; train with checkpoint.at_end=true or pass --checkpoint")
    tables = run_tables(cfg, saved_world_size(path))
    train_model = float_model(cfg, tables)
    try:
        load_checkpoint(path, train_model, restore_rng=False)
    except ValueError as e:
        raise ValueError(
            f"the checkpoint does not match {config_path} (edited config, or another run's checkpoint?): {e}"
        ) from e
    model = _quantized(train_model.model, dtype, row_alignment)
    report = _table_manifest(cfg, tables, model)
    manifest = {
        "dtype": dtype,
        "row_alignment": row_alignment,
        "run": str(run),
        "checkpoint": str(path),
        "step": checkpoint_step(path),
        "world_size": saved_world_size(path),
        "input": asdict(InputSpec.of(cfg, tables)),
        "tables": report,
        "total_bytes": sum(t["bytes"] for t in report),
        "fp32_full_bytes": sum(4 * t["rows"] * t["dim"] for t in report),
        "config": config_to_dict(cfg),
    }
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return write_artifact(out, model, manifest, _probe(tables), config_yaml)


def saved_world_size(checkpoint: Path) -> int:
    """The world size a checkpoint was saved at (its ``meta.json``; 1 if absent)."""
    meta = checkpoint / "meta.json"
    return int(json.loads(meta.read_text()).get("world_size", 1)) if meta.is_file() else 1


def load_serving_model(path: str | Path, prefer_torchscript: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """An export directory's model (TorchScript when present, else rebuilt from the config and the
    quantized state dict: the rebuild briefly allocates the float tables it quantizes), verified against
    its probe; and its manifest."""

    def rebuild(manifest: dict[str, Any]) -> nn.Module:
        cfg = load_config(Path(path) / CONFIG)
        model = float_model(cfg, run_tables(cfg, manifest["world_size"])).model
        return _quantized(model, manifest["dtype"], manifest["row_alignment"])

    return load_artifact(path, rebuild, prefer_torchscript)


def score_rows(
    model: nn.Module,
    spec: InputSpec,
    keys: list[str],
    chunks: Iterable[CriteoArrays],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities (float64) and labels of every row of ``chunks``, in order, scored in batches;
    ``on_batch(rows)`` after each batch (progress)."""
    probs, labels = [], []
    with torch.no_grad():
        for chunk in chunks:
            for start in range(0, len(chunk), batch_size):
                part = chunk.slice(start, start + batch_size)
                batch = make_batch(part.dense, part.sparse, part.labels, keys)
                logits = model(batch.dense_features, spec.transform(batch.sparse_features))
                probs.append(torch.sigmoid(logits.reshape(-1)).double().numpy())
                labels.append(np.asarray(part.labels, dtype=np.float32))
                if on_batch is not None:
                    on_batch(len(part))
    if not probs:
        return np.zeros(0), np.zeros(0, dtype=np.float32)
    return np.concatenate(probs), np.concatenate(labels)


def log_loss_auc(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Log loss and AUC (nan when the labels hold one class only)."""
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    log_loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    if labels.min() == labels.max():
        return log_loss, math.nan
    return log_loss, float(binary_auroc(torch.from_numpy(probs), torch.from_numpy(labels).long()))
