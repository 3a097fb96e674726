"""Serving: quantized compositional collections, the module swap for whole models, export and scoring.

Mirrors ``torchrec.inference``: ``quantize_inference_model(model)`` swaps every EmbeddingBagCollection,
EmbeddingCollection and CompositionalEmbeddingBagCollection for its quantized (FBGEMM int-N TBE) class.
"""

from torchrec_qr.inference.modules import (
    DTYPES,
    QUANT_MAPPING,
    QuantCompositionalEmbeddingBagCollection,
    physical_data_types,
    quantize_inference_model,
)
from torchrec_qr.inference.quant_storage import DEFAULT_ROW_ALIGNMENT, QuantBatchedEmbeddingBags

__all__ = [
    "DEFAULT_ROW_ALIGNMENT",
    "DTYPES",
    "QUANT_MAPPING",
    "QuantBatchedEmbeddingBags",
    "QuantCompositionalEmbeddingBagCollection",
    "physical_data_types",
    "quantize_inference_model",
]
