"""Serving artifacts: a directory with the model, a manifest, and a probe that proves a reload is exact.

Layout (written to a temporary sibling, then renamed: a directory of this name is always complete)::

    DIR/
        manifest.json   format, dtype, tables (storage, dtype, bytes), source run and config, files + sha256
        weights.pt      the quantized model's state dict (always: rebuilt from the config, then loaded)
        model.pt        TorchScript (torchrec.fx.symbolic_trace + torch.jit.script), when the model scripts
        probe.pt        a small input batch and the logits the exported model gave for it
        config.yaml     the training config the model came from

TorchScript is TorchRec's serving format (its C++ predictor loads it); the state dict is the fallback that
works for any model this package can build, and what makes the format independent of whether scripting
succeeds. A loader checks the checksums and that the model it gets back reproduces the probe's logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchrec.fx
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ArtifactError",
    "export_program",
    "load_artifact",
    "script_model",
    "storage_report",
    "write_artifact",
]

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST, WEIGHTS, SCRIPTED, PROBE, CONFIG = "manifest.json", "weights.pt", "model.pt", "probe.pt", "config.yaml"


class ArtifactError(ValueError):
    """An export directory is missing, incomplete, altered, or does not reproduce its probe."""


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchRec's serving format: ``torchrec.fx.symbolic_trace`` (KJT-aware), then ``torch.jit.script``."""
    return torch.jit.script(torchrec.fx.symbolic_trace(model))


def export_program(model: nn.Module, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of a DLRM-style ``model(dense, kjt)`` with a dynamic batch: the dense
    rows and every tensor of the KJT (values, lengths, offsets, weights) get ``Dim.AUTO``."""
    leaves, _ = torch.utils._pytree.tree_flatten(kjt)
    dynamic_kjt = [{0: Dim.AUTO} if leaf is not None else None for leaf in leaves]
    return torch.export.export(model, (dense, kjt), dynamic_shapes=({0: Dim.AUTO}, dynamic_kjt), strict=False)


def storage_report(model: nn.Module) -> list[dict[str, Any]]:
    """Every table stored in an int-N TBE kernel of ``model``: name, rows, dim, dtype, bytes (padded rows
    with scale/bias: what the kernel holds in memory)."""
    report = []
    for module in model.modules():
        if not isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen):
            continue
        weights = module.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
        for (name, rows, dim, sparse_type, _), (w, _, _) in zip(module.embedding_specs, weights):
            report.append(
                {
                    "name": name,
                    "rows": rows,
                    "dim": dim,
                    "dtype": sparse_type.name,
                    "bytes": w.numel() * w.element_size(),
                }
            )
    return report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _probe_logits(model: nn.Module, probe: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=probe["values"], lengths=probe["lengths"])
    with torch.no_grad():
        return model(probe["dense"], kjt)


def write_artifact(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    manifest: dict[str, Any],
    probe: tuple[torch.Tensor, KeyedJaggedTensor],
    config_yaml: str,
) -> Path:
    """Write the export directory atomically; ``manifest`` gets the files, checksums and scripting outcome.

    Raises FileExistsError if ``out_dir`` exists (nothing is overwritten).
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another --out, or remove it first")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dense, kjt = probe
        with torch.no_grad():
            logits = model(dense, kjt)
        keys = kjt.keys()
        torch.save({"dense": dense, "values": kjt.values(), "lengths": kjt.lengths(), "logits": logits}, tmp / PROBE)
        torch.save(model.state_dict(), tmp / WEIGHTS)
        (tmp / CONFIG).write_text(config_yaml)
        files = [WEIGHTS, PROBE, CONFIG]
        scripting_error = None
        try:
            torch.jit.save(script_model(model), str(tmp / SCRIPTED))
            files.append(SCRIPTED)
        except Exception as e:  # the state dict still serves; the manifest says why there is no TorchScript
            scripting_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("no TorchScript artifact (the state dict artifact is written): %s", scripting_error)
        manifest = {
            **manifest,
            "format": FORMAT,
            "feature_names": keys,
            "torchscript": SCRIPTED in files,
            "torchscript_error": scripting_error,
            "sha256": {name: _sha256(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%s)", out, ", ".join(sorted(manifest["sha256"])))
    return out


def load_artifact(
    path: str | os.PathLike[str], rebuild: Callable[[dict[str, Any]], nn.Module], prefer_torchscript: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The served model and its manifest, after checking files and the probe.

    ``rebuild(manifest)`` must return the model structure (quantized, empty) the state dict loads into; it
    is used when there is no TorchScript file or ``prefer_torchscript`` is False.
    """
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; pass a directory written by python -m torchrec_qr.export")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root}: artifact format {manifest.get('format')!r}, this version reads {FORMAT}")
    for name, digest in manifest["sha256"].items():
        if not (root / name).is_file() or _sha256(root / name) != digest:
            raise ArtifactError(f"{root / name}: missing or altered since export (sha256 mismatch); export again")
    if manifest["torchscript"] and prefer_torchscript:
        model: nn.Module = torch.jit.load(str(root / SCRIPTED), map_location="cpu")
    else:
        model = rebuild(manifest)
        with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):  # TorchRec's int4/int2 table buffers
            model.load_state_dict(torch.load(root / WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    probe = torch.load(root / PROBE, map_location="cpu", weights_only=True)
    got = _probe_logits(model, probe, manifest["feature_names"])
    if not torch.equal(got, probe["logits"]):
        raise ArtifactError(
            f"{root}: the loaded model does not reproduce the exported logits (max difference "
            f"{(got - probe['logits']).abs().max().item():.3g}); was it exported with another version?"
        )
    return model, manifest
