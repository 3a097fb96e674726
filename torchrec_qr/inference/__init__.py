"""Serving: quantized compositional collections, the module swap for whole models, export and scoring.

Mirrors ``torchrec.inference``: ``quantize_inference_model(model)`` swaps every EmbeddingBagCollection,
EmbeddingCollection and CompositionalEmbeddingBagCollection for its quantized (FBGEMM int-N TBE) class;
``export_run`` / ``load_serving_model`` write and read the serving artifacts of training runs.
"""

from torchrec_qr.inference.artifact import (
    ArtifactError,
    export_program,
    load_artifact,
    script_model,
    storage_report,
    write_artifact,
)
from torchrec_qr.inference.modules import (
    DTYPES,
    QUANT_MAPPING,
    QuantCompositionalEmbeddingBagCollection,
    physical_data_types,
    quantize_inference_model,
)
from torchrec_qr.inference.quant_storage import DEFAULT_ROW_ALIGNMENT, QuantBatchedEmbeddingBags
from torchrec_qr.inference.serving import (
    InputSpec,
    export_run,
    float_model,
    load_serving_model,
    log_loss_auc,
    run_tables,
    saved_world_size,
    score_rows,
)

__all__ = [
    "ArtifactError",
    "DEFAULT_ROW_ALIGNMENT",
    "DTYPES",
    "InputSpec",
    "QUANT_MAPPING",
    "QuantBatchedEmbeddingBags",
    "QuantCompositionalEmbeddingBagCollection",
    "export_program",
    "export_run",
    "float_model",
    "load_artifact",
    "load_serving_model",
    "log_loss_auc",
    "physical_data_types",
    "quantize_inference_model",
    "run_tables",
    "saved_world_size",
    "score_rows",
    "script_model",
    "storage_report",
    "write_artifact",
]
