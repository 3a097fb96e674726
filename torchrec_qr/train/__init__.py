"""The training application: ``torchrun ... -m torchrec_qr.train --config configs/<name>.yaml [key=value ...]``.

DLRM (TorchRec) with full, hashed or compositional embedding tables, sharded with DistributedModelParallel,
trained with TrainPipelineSparseDist; configs, data, metrics, checkpoints and fault tolerance around it.
"""

from torchrec_qr.train.config import ConfigError, TrainingConfig, load_config, validate

__all__ = ["ConfigError", "TrainingConfig", "load_config", "validate"]
