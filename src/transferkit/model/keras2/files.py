"""Reading Keras 2 `.h5` and `.keras` files that `keras.models.load_model` rejects or misreads.

Keras 2.13-2.15 and tf-keras 2.16+ also wrote `.keras` archives, which Keras 3 cannot read at
all (their config names `keras.src.engine.functional`). Both kinds of file are read the same
way: the config as saved is checked (`safety.check_op_layers`), rewritten (`config`), built
with the stand-ins of `layers` in the private scopes Keras' own legacy loader uses, and the
weights are loaded into it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras

from transferkit.model.keras2.config import (
    KERAS2_BASE_ARGUMENTS,
    OBSOLETE_ARGUMENTS,
    keras2_config,
    legacy_form,
    mark_global_lambdas,
)
from transferkit.model.keras2.layers import (
    KERAS2_HARD_SIGMOID,
    STAND_INS,
    SlicingOpLambda,
    TFOpLambda,
    application_layers,
    builtin_layers,
    keras2_hard_sigmoid,
)
from transferkit.model.keras2.ops import check_portable
from transferkit.model.keras2.safety import OP_CLASSES, check_op_layers

__all__ = [
    "h5_written_by_keras2",
    "is_keras2_failure",
    "load_keras2_h5",
    "load_keras2_keras",
    "written_by_keras2",
]


def is_keras2_failure(exc: BaseException) -> bool:
    """Whether `keras.models.load_model` failed on one of the Keras 2 quirks handled here."""
    text = str(exc)
    return (
        "failed to be resolved" in text
        or "cannot contain character `/`" in text
        or any(f"Unknown layer: '{name}'" in text for name in OP_CLASSES)
        or any(
            f"Unrecognized keyword arguments passed to {cls}" in text for cls in OBSOLETE_ARGUMENTS
        )
        or any(f"'{key}'" in text for key in KERAS2_BASE_ARGUMENTS)
        or any(f"Unknown layer: '{name}'" in text for name in STAND_INS)
    )


def _build(
    config: dict[str, Any], *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """A model from a corrected Keras 2 config, in the scopes Keras' own legacy loader uses
    (private Keras APIs, checked against Keras 3.15.1)."""
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    objects: dict[str, Any] = dict(builtin_layers())
    objects.update({"TFOpLambda": TFOpLambda, "SlicingOpLambda": SlicingOpLambda})
    objects.update(STAND_INS)
    objects[KERAS2_HARD_SIGMOID] = keras2_hard_sigmoid
    objects.update(application_layers())
    objects.update(custom_objects)
    with (
        keras.saving.custom_object_scope(objects),
        saving_options.keras_option_scope(use_legacy_config=True),
        serialization_lib.SafeModeScope(safe_mode),
    ):
        model = saving_utils.model_from_config(config, custom_objects=objects)
    if not isinstance(model, keras.Model):
        raise ValueError("the file does not contain a Keras model")
    return model


def h5_written_by_keras2(path: Path) -> bool:
    """Whether an HDF5 model file was written by Keras 2 (its `keras_version` attribute)."""
    import h5py  # type: ignore[import-untyped]

    try:
        with h5py.File(path, mode="r") as f:
            version = f.attrs.get("keras_version", b"")
    except OSError:
        return False
    version = version.decode() if hasattr(version, "decode") else str(version)
    return str(version).startswith("2.")


def load_keras2_h5(
    path: Path, *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """Loads a Keras 2 `.h5` that `keras.models.load_model` cannot (see the module docstring):
    the corrected config, then the weights as Keras' legacy loader reads them."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, mode="r") as f:
        raw = f.attrs.get("model_config")
        if raw is None:
            raise ValueError(f"no model config found in {str(path)!r}")
        if hasattr(raw, "decode"):
            raw = raw.decode("utf-8")
        # Files from Keras 3 never hold op layers and count nested nodes the Keras 3 way.
        version = f.attrs.get("keras_version", b"")
        version = version.decode() if hasattr(version, "decode") else str(version)
        saved = json.loads(raw)
        check_op_layers(saved, safe_mode=safe_mode)
        config = keras2_config(saved, shift_nested=not version.startswith("3"))
        check_portable(config)  # the op layers the rewrite left, on JAX / PyTorch
        if not safe_mode:
            mark_global_lambdas(config)
        model = _build(config, custom_objects=custom_objects, safe_mode=safe_mode)
        legacy_h5_format.load_weights_from_hdf5_group(f["model_weights"], model)
    return model


def written_by_keras2(path: Path) -> bool:
    """Whether a `.keras` archive was written by Keras 2 (its `metadata.json` says so)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return str(meta.get("keras_version", "")).startswith("2.")


def load_keras2_keras(
    path: Path, *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """Loads a `.keras` archive written by Keras 2.13-2.15: its config read as a Keras 2 `.h5`
    config (corrected as in `keras2_config`), then its weights file, whose layout Keras 3's
    `load_weights` reads."""
    import tempfile
    import zipfile

    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))
        check_op_layers(saved, safe_mode=safe_mode)
        config = keras2_config(legacy_form(saved))
        check_portable(config)
        if not safe_mode:
            mark_global_lambdas(config)
        weights = archive.read("model.weights.h5")
    model = _build(config, custom_objects=custom_objects, safe_mode=safe_mode)
    with tempfile.TemporaryDirectory(prefix="transferkit-keras2-") as tmp:
        weights_path = Path(tmp) / "model.weights.h5"
        weights_path.write_bytes(weights)
        model.load_weights(weights_path)
    return model
