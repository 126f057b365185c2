"""transferkit: fine-tuning and transfer learning for Keras 3, short, correct and fast.

The public names are imported lazily (PEP 562): `import transferkit` does not import TensorFlow.
That lets transferkit's own entry points (`transferkit` CLI, `python -m transferkit.demo`) set
`TF_ENABLE_ONEDNN_OPTS` before TensorFlow loads, and keeps `import transferkit` cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transferkit._version import __version__
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

if TYPE_CHECKING:
    from transferkit import callbacks
    from transferkit.model.heads import HeadSpec
    from transferkit.recipes.lr_finder import LRFinder
    from transferkit.results.provenance import load
    from transferkit.results.result import FitResult
    from transferkit.train.callbacks import GradualUnfreezing, UnfreezeAt
    from transferkit.tuner import FineTuner

_LAZY = {
    "FineTuner": "transferkit.tuner",
    "FitResult": "transferkit.results.result",
    "GradualUnfreezing": "transferkit.train.callbacks",
    "HeadSpec": "transferkit.model.heads",
    "LRFinder": "transferkit.recipes.lr_finder",
    "UnfreezeAt": "transferkit.train.callbacks",
    "load": "transferkit.results.provenance",
}

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


def __getattr__(name: str) -> Any:
    if name == "callbacks":
        return importlib.import_module("transferkit.callbacks")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
