"""transferkit: fine-tuning and transfer learning for Keras 3, short, correct and fast."""

from transferkit import callbacks
from transferkit._version import __version__
from transferkit.callbacks import GradualUnfreezing, UnfreezeAt
from transferkit.errors import (
    AdapterMismatchError,
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
from transferkit.lr_finder import LRFinder
from transferkit.provenance import load
from transferkit.result import FitResult
from transferkit.tuner import FineTuner

__all__ = [
    "AdapterMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FineTuner",
    "FitResult",
    "GradualUnfreezing",
    "HeadSpec",
    "LRFinder",
    "LayerNotFoundError",
    "MissingExtraError",
    "ModelLoadError",
    "NotCompiledError",
    "SaveError",
    "TransferkitError",
    "UnfreezeAt",
    "__version__",
    "callbacks",
    "load",
]
