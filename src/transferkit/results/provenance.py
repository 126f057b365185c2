"""Provenance: the JSON record written beside a saved model, and `transferkit.load`.

`FitResult.save("model.keras")` writes `model.keras.transferkit.json` next to the model: where the
base model came from (path and SHA-256), what was frozen, the head, the optimizer, the fit
arguments, the history, and the versions of the libraries that produced it. The record holds the
SHA-256 of the model file it describes, so `load` notices a record that no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import keras
import numpy as np

from transferkit._utils.files import hash_arrays
from transferkit.errors import ModelLoadError
from transferkit.model.layers import leaf_layers, unit_trainable, unit_weights

__all__ = [
    "PROVENANCE_SUFFIX",
    "FitContext",
    "describe_value",
    "file_sha256",
    "fit_context",
    "load",
    "provenance_path",
    "provenance_text",
    "versions",
]

PROVENANCE_SUFFIX = ".transferkit.json"


class FitContext(TypedDict):
    """What a FineTuner knows about a fit, as the provenance record holds it (`fit_context`).

    Attributes:
        base_model: `{"path": ..., "sha256": ...}` of the file the base model came from (both
            None for a model object).
        frozen_layers: the names of the leaf layers with weights that did not train.
        head: `HeadSpec.to_dict()`, or None when the output was kept.
        optimizer: the optimizer's configuration, described by `describe_value`.
        fit_arguments: the arguments of the fit, described by `describe_value` (data by its
            shape, dtype and SHA-256, never stored).
    """

    base_model: dict[str, str | None]
    frozen_layers: list[str]
    head: dict[str, Any] | None
    optimizer: Any
    fit_arguments: Any


def provenance_path(path: str | os.PathLike[str]) -> Path:
    """`<path>.transferkit.json`."""
    p = Path(os.fspath(path))
    return p.with_name(p.name + PROVENANCE_SUFFIX)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """The versions of transferkit, keras, tensorflow and numpy, and the Keras backend in use
    (`keras_backend`, with its version when it is not TensorFlow)."""
    from transferkit._version import __version__

    out = {"transferkit": __version__, "keras": keras.__version__, "numpy": np.__version__}
    backend = str(keras.backend.backend())
    out["keras_backend"] = backend
    if backend != "tensorflow":
        module = sys.modules.get(backend)
        out[backend] = str(getattr(module, "__version__", "unknown"))
    try:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    except ImportError:  # pragma: no cover - tensorflow is a dependency
        out["tensorflow"] = "not installed"
    return out


def describe_value(value: Any, *, digest: bool = False) -> Any:
    """A JSON-friendly description of a fit argument.

    Arrays become their shape and dtype (and SHA-256 when `digest`), datasets their element
    spec, callbacks and other objects their class name.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__array__")
    ):
        arr = np.asarray(value)
        out: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        if digest:
            out["sha256"] = hash_arrays([arr])
        return out
    if isinstance(value, Mapping):
        return {str(k): describe_value(v, digest=digest) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_value(v, digest=digest) for v in value]
    spec = getattr(value, "element_spec", None)
    if spec is not None:
        return {"type": type(value).__name__, "element_spec": str(spec)}
    return {"type": type(value).__name__}


def fit_context(
    model: keras.Model,
    *,
    source: Path | None,
    source_sha256: str | None,
    head: Mapping[str, Any] | None,
    optimizer_config: Mapping[str, Any] | None,
    fit_arguments: Mapping[str, Any],
) -> FitContext:
    """What a FineTuner knows about a fit, for the provenance record.

    Args:
        model: the working model (its frozen layers are listed).
        source: the file the base model was loaded from, if any.
        source_sha256: that file's SHA-256 when it was loaded.
        head: `HeadSpec.to_dict()` or None when the output was kept.
        optimizer_config: the optimizer's `get_config()`.
        fit_arguments: the arguments of the fit (data is described, not stored).

    Returns:
        The context `FitResult.save` writes into the record.
    """
    frozen = [
        layer.name
        for layer in leaf_layers(model)
        if unit_weights(layer) and not unit_trainable(layer)
    ]
    return {
        "base_model": {
            "path": str(source.resolve()) if source is not None else None,
            "sha256": source_sha256,
        },
        "frozen_layers": frozen,
        "head": dict(head) if head is not None else None,
        "optimizer": describe_value(dict(optimizer_config or {})),
        "fit_arguments": describe_value(dict(fit_arguments)),
    }


def provenance_text(
    model_path: Path,
    context: Mapping[str, Any],
    outcome: Mapping[str, Any],
    *,
    name: str | None = None,
) -> str:
    """The JSON text of the record of the model file at `model_path`.

    Args:
        model_path: the saved model file (a temporary file before its rename, with `name`).
        context: `fit_context(...)` (may be empty for a bare model).
        outcome: history, epochs, best epoch and flags of the fit.
        name: the file name to record, when `model_path` is not yet at its final name.
    """
    record = {
        "format": "transferkit.provenance",
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_file": {"name": name or model_path.name, "sha256": file_sha256(model_path)},
        **{k: v for k, v in context.items()},
        **{k: describe_value(v) for k, v in outcome.items()},
        "versions": versions(),
    }
    return json.dumps(record, indent=2, sort_keys=True, allow_nan=True)


def load(
    path: str | os.PathLike[str],
    *,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> tuple[keras.Model, dict[str, Any]]:
    """Loads a model saved by `FitResult.save` and its provenance record.

    Args:
        path: the `.keras` or `.h5` file.
        custom_objects: custom classes the file refers to.
        safe_mode: as for `FineTuner`; False allows `Lambda` layers and any public
            TensorFlow op in Keras 2 op layers.

    Returns:
        `(model, provenance)`: the uncompiled model and the record as a dictionary (empty when
        the file has no `.transferkit.json` beside it). A record whose model checksum does not
        match the file triggers a warning.

    Raises:
        ModelLoadError: the model or its record cannot be read.

    Example:

    ```python
    model, info = transferkit.load("digits.keras")
    info["base_model"]["sha256"], info["history"]["loss"][-1]
    ```
    """
    from transferkit.model.loading import load_model

    model = load_model(path, custom_objects=custom_objects, safe_mode=safe_mode)
    record_path = provenance_path(path)
    if not record_path.exists():
        return model, {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(
            f"cannot read the provenance record {str(record_path)!r}: {exc}"
        ) from exc
    if not isinstance(record, dict):
        raise ModelLoadError(f"{str(record_path)!r} is not a transferkit provenance record.")
    model_file = record.get("model_file", {})
    if not isinstance(model_file, dict):
        raise ModelLoadError(
            f"{str(record_path)!r} is damaged: its 'model_file' entry is not a mapping."
        )
    stored = model_file.get("sha256")
    if stored and stored != file_sha256(path):
        warnings.warn(
            f"the provenance record {str(record_path)!r} describes a different file than "
            f"{os.fspath(path)!r} (checksum mismatch): the model was replaced after it was saved.",
            stacklevel=2,
        )
    return model, record
