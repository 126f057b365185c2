"""transferkit: fine-tuning and transfer learning for Keras 3, short, correct and fast."""

import os as _os

# oneDNN crashes on some 1x1 stride-2 convolutions on AVX-512 CPUs (README, Troubleshooting). The
# variable only counts before TensorFlow is first imported, and `transferkit` / `python -m
# transferkit` import this package before the CLI's own code runs; a value already set wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from transferkit._version import __version__
from transferkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LayerNotFoundError,
    MissingExtraError,
    ModelLoadError,
    NotCompiledError,
    SaveError,
    TransferkitError,
)
from transferkit.heads import HeadSpec
from transferkit.result import FitResult
from transferkit.tuner import FineTuner

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FineTuner",
    "FitResult",
    "HeadSpec",
    "LayerNotFoundError",
    "MissingExtraError",
    "ModelLoadError",
    "NotCompiledError",
    "SaveError",
    "TransferkitError",
    "__version__",
]
