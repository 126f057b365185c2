"""The exception hierarchy of transferkit.

Every failure a user can cause raises a subclass of `TransferkitError`. The messages name the
problem and the fix. Several classes also derive from the built-in exception a Python user would
reach for (`KeyError`, `ValueError`), so existing `except` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "AdapterMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LayerNotFoundError",
    "ModelLoadError",
    "MissingExtraError",
    "NotCompiledError",
    "SaveError",
    "TransferkitError",
]


class TransferkitError(Exception):
    """Base class of every error transferkit raises on purpose."""


class LayerNotFoundError(TransferkitError, KeyError):
    """A layer reference (name, index, object or selector) matches no layer.

    The message lists the closest existing layer names and how many layers the model has.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would quote the whole message (repr of the first argument).
        return str(self.args[0]) if self.args else ""


class ModelLoadError(TransferkitError):
    """A model file is missing, of an unsupported format, or unreadable. Names the path."""


class NotCompiledError(TransferkitError):
    """`fit` (or a recipe that trains) was called before `compile_sgd()` or `compile()`."""


class ConfigError(TransferkitError, ValueError):
    """Contradictory or invalid arguments, or a request that cannot be honoured."""


class DataError(TransferkitError, ValueError):
    """Training or evaluation data that does not fit the model.

    Raised before any training step, so the model is unchanged afterwards.
    """


class SaveError(TransferkitError, OSError):
    """A model or result could not be written; any file that existed before is left intact."""


class CheckpointError(TransferkitError):
    """A checkpoint directory that cannot be used as it is.

    It belongs to another model or plan, another process is writing it, its manifest or every
    stored state is damaged (the message names the files), or a checkpoint could not be written
    (a full disk: "no space left"; what was committed before stays loadable).
    """


class MissingExtraError(TransferkitError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class AdapterMismatchError(TransferkitError):
    """An adapter file does not fit the model it is loaded into.

    The message names the first variable (or head layer) that differs and how.
    """
