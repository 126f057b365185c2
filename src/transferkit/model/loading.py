"""Reading model files and making the working copy of a model.

Keras 3 trips on the classic ways of loading a pre-trained model: a Keras 2 `.h5` whose saved
optimizer uses `lr` or `decay`, or one saved after compiling with a string loss, fails to load
with its training configuration. The architecture and weights are all a fine-tune needs, so files
are loaded with `compile=False` and transferkit compiles them itself.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.errors import ConfigError, ModelLoadError
from transferkit.model.graph import (
    derived_model,
    fresh_inputs,
    graph_inputs,
    pack_inputs,
    quiet_dict_inputs,
    replay,
)
from transferkit.model.keras2.files import (
    h5_written_by_keras2,
    is_keras2_failure,
    load_keras2_h5,
    load_keras2_keras,
    written_by_keras2,
)
from transferkit.model.layers import own_trainable_variables, sublayers

__all__ = [
    "copy_model",
    "output_layer",
    "rebuilds_itself",
    "wrap_whole",
    "load_model",
    "safe_mode_scope",
    "to_functional",
]

_H5_SUFFIXES = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_model(
    path: str | os.PathLike[str],
    *,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> keras.Model:
    """Loads a `.keras` or legacy `.h5` model file without its training configuration.

    Args:
        path: path to a `.keras` zip archive or an HDF5 (`.h5`, `.hdf5`) full-model file,
            Keras 2 files included.
        custom_objects: custom layers or functions the file refers to.
        safe_mode: `True` (the default) for a file you did not write: no `Lambda` code runs
            and Keras 2 op layers may call only pure tensor operations (see
            docs/security.md). `False` is needed for files with `Lambda` layers.

    Returns:
        The loaded, uncompiled `keras.Model`.

    Raises:
        ModelLoadError: the file is missing, a directory (SavedModel), of another format,
            unreadable, or holds code that `safe_mode` refuses.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise ModelLoadError(f"model file not found: {str(p)!r}. Check the path.")
    if p.is_dir():
        raise ModelLoadError(
            f"{str(p)!r} is a directory. A TensorFlow SavedModel directory cannot be loaded as a "
            "Keras 3 model; load it with `keras.layers.TFSMLayer` or re-save it as `.keras`/`.h5`."
        )
    suffix = p.suffix.lower()
    if suffix not in (".keras", *_H5_SUFFIXES):
        raise ModelLoadError(
            f"unsupported model file {str(p)!r}: expected a `.keras` or `.h5`/`.hdf5` file, "
            f"got suffix {suffix or '(none)'!r}."
        )
    _check_signature(p, suffix)
    objects = dict(custom_objects or {})
    try:
        with keras.saving.custom_object_scope(objects):
            try:
                model = keras.models.load_model(
                    p, compile=False, custom_objects=objects, safe_mode=safe_mode
                )
            except ModelLoadError:
                raise  # refused on purpose (an op safe mode forbids): no second reading
            except Exception as exc:  # Keras raises many types for a config it cannot build.
                if suffix == ".keras":
                    if not written_by_keras2(p):
                        raise
                    model = load_keras2_keras(p, custom_objects=objects, safe_mode=safe_mode)
                elif is_keras2_failure(exc) or h5_written_by_keras2(p):
                    model = load_keras2_h5(p, custom_objects=objects, safe_mode=safe_mode)
                else:
                    raise
    except ModelLoadError as exc:
        raise ModelLoadError(f"could not load model from {str(p)!r}: {exc}") from exc
    except Exception as exc:  # Keras raises many unrelated types for a bad file.
        hint = _load_hint(exc)
        raise ModelLoadError(f"could not load model from {str(p)!r}: {exc}{hint}") from exc
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{str(p)!r} does not contain a Keras model (got {type(model)}).")
    return model


def _check_signature(p: Path, suffix: str) -> None:
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {str(p)!r}: {exc}") from exc
    if suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise ModelLoadError(
                f"{str(p)!r} is not a valid `.keras` archive (not a zip file): corrupt or not a "
                "model. Re-save the model with `model.save(...)`."
            )
    elif head != _HDF5_SIGNATURE:
        raise ModelLoadError(
            f"{str(p)!r} is not an HDF5 file (bad signature): corrupt, truncated or not a model."
        )


def _load_hint(exc: BaseException) -> str:
    text = str(exc)
    if "`Lambda`" in text or "safe_mode" in text:
        return " Hint: the file has a Lambda layer; pass safe_mode=False if you trust it."
    if "Unknown layer" in text or "Could not locate" in text or "custom_objects" in text:
        return " Hint: pass the custom classes with custom_objects={'Name': Class}."
    return ""


@contextmanager
def safe_mode_scope(safe_mode: bool) -> Iterator[None]:
    """Keras' deserialization safe mode for the duration of the block.

    `clone_model` rebuilds layers from their configs, and a `Lambda` layer refuses to
    deserialize its function in safe mode. Private Keras API, checked against Keras 3.15.1.
    """
    from keras.src.saving import serialization_lib

    with serialization_lib.SafeModeScope(safe_mode):
        yield


def copy_model(
    model: keras.Model,
    *,
    custom_objects: Mapping[str, Any] | None = None,
    safe_mode: bool = True,
) -> keras.Model:
    """A deep copy of `model`: same architecture, weights and trainable flags, new variables.

    Args:
        model: a built Functional or Sequential model.
        custom_objects: custom classes the model's layers need to be rebuilt.
        safe_mode: False allows copying `Lambda` layers (their code is re-created).

    Raises:
        ConfigError: the model is not built, or cannot be cloned (a subclassed model).
    """
    _require_built(model)
    # `clone_model` rebuilds every layer from its own config. A model class that builds its
    # graph itself (keras-hub's backbones and tasks) may only round-trip as a whole, as `.keras`
    # saving does it: ViT's patching layer refuses its own config. `clone_model` comes first:
    # `from_config` of DINOv2's backbone renames its layers after the model.
    ways = [("clone_model", _clone), ("from_config(get_config())", _from_config)]
    failures: list[tuple[str, Exception]] = []
    clone: keras.Model | None = None
    with (
        keras.saving.custom_object_scope(dict(custom_objects or {})),
        safe_mode_scope(safe_mode),
        quiet_dict_inputs(),
    ):
        for label, way in ways:
            try:
                clone = way(model)
                break
            except Exception as exc:  # Keras raises many types for a config it cannot rebuild.
                failures.append((label, exc))
    if clone is None:
        tried = "; ".join(f"{label}: {exc}" for label, exc in failures)
        raise ConfigError(
            f"cannot copy model {model.name!r} ({tried}). Pass copy=False to work on it in "
            f"place, or pass its custom classes with custom_objects=.{_load_hint(failures[0][1])}"
        ) from failures[0][1]
    clone.set_weights(model.get_weights())
    _check_same_model(model, clone)
    _copy_flags(model, clone)
    return clone


def _clone(model: keras.Model) -> keras.Model:
    clone = keras.models.clone_model(model)
    assert isinstance(clone, keras.Model)
    return clone


def _from_config(model: keras.Model) -> keras.Model:
    clone = type(model).from_config(model.get_config())
    if not isinstance(clone, keras.Model):
        raise TypeError(f"the config builds a {type(clone).__name__}, not a model")
    return clone


def _check_same_model(model: keras.Model, clone: keras.Model) -> None:
    # `set_weights` matches by position only: a copy rebuilt another way must have the same
    # layers and variables, in the same order, with the same values.
    def names(m: keras.Model) -> list[str]:
        # `clone_model` makes new InputLayers, with new generated names.
        return [layer.name for layer in m.layers if not isinstance(layer, keras.layers.InputLayer)]

    if names(clone) != names(model):
        raise ConfigError(
            f"cannot copy model {model.name!r}: its copy names its layers differently. Pass "
            "copy=False to work on it in place."
        )
    mine, theirs = model.weights, clone.weights
    if len(mine) != len(theirs) or any(
        a.name != b.name or tuple(a.shape) != tuple(b.shape) or not _same_values(a, b)
        for a, b in zip(mine, theirs, strict=False)
    ):
        raise ConfigError(
            f"cannot copy model {model.name!r}: its copy does not have the same weights. Pass "
            "copy=False to work on it in place."
        )


def rebuilds_itself(model: keras.Model) -> bool:
    """Whether `model`'s class builds its own graph from its config (keras-hub's backbones and
    tasks override `from_config`), rather than from the configs of its layers.

    Such a model round-trips only as a whole: a layer of keras-hub's ViT does not rebuild from
    its own config, so a Functional graph holding that layer directly cannot be reloaded.
    """
    if isinstance(model, keras.Sequential):
        return False
    own = getattr(type(model).from_config, "__func__", None)
    return own is not None and own is not getattr(keras.Model.from_config, "__func__", None)


def output_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The layer producing the only output of `model`, or None with several outputs."""
    if len(model.outputs) != 1:
        return None
    # Private API (Keras 3.15.1): a symbolic tensor's `_keras_history` names the layer that made it.
    history = getattr(model.outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None)
    return layer if isinstance(layer, keras.layers.Layer) else None


def wrap_whole(model: keras.Model) -> keras.Model:
    """A Functional whose one layer is `model`, called whole on inputs shaped like its own.

    A head built on it keeps `model` (and its class) intact inside the new model, so the result
    saves and reloads however `model`'s own layers serialize.
    """
    inputs = fresh_inputs(model)
    outputs = model(pack_inputs(model, inputs))
    return derived_model(model, inputs, outputs, model.name)


def _same_values(a: keras.Variable, b: keras.Variable) -> bool:
    # Bytes, not `==`: a NaN weight copied exactly is still the same weight.
    return bool(np.asarray(a).tobytes() == np.asarray(b).tobytes())


def _copy_flags(src: keras.layers.Layer, dst: keras.layers.Layer) -> None:
    # Containers first: their setter overwrites every sublayer's flag. Custom layers are walked
    # into too, with their own variables' flags: a keras-hub encoder may be trained from its
    # second block on (see `transferkit.model.layers`).
    if dst.trainable != src.trainable:
        dst.trainable = src.trainable
    if sublayers(src):
        for s_var, d_var in zip(
            own_trainable_variables(src), own_trainable_variables(dst), strict=False
        ):
            if d_var.trainable != s_var.trainable:
                d_var.trainable = s_var.trainable
    for s, d in zip(sublayers(src), sublayers(dst), strict=False):
        _copy_flags(s, d)


def _require_built(model: keras.Model) -> None:
    try:
        graph_inputs(model)
    except ValueError:
        raise ConfigError(
            f"model {model.name!r} is not built: it has no defined inputs. Build it first, e.g. "
            "`model.build((None, *input_shape))`, or start it with `keras.Input(shape)`."
        ) from None


def to_functional(model: keras.Model) -> keras.Model:
    """A Functional model with the same layers (shared weights) as `model`.

    A Functional model is returned unchanged. A Sequential becomes its Functional twin, which
    has defined `.input`/`.output` even when the Sequential was loaded from a file.

    Raises:
        ConfigError: the model is not built or is a subclassed model.
    """
    if isinstance(model, keras.Sequential):
        _require_built(model)
        inputs = fresh_inputs(model)
        outputs = replay(model, inputs)
        # A one-element list would make `.input` a list and the saved input structure nested.
        return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=model.name)
    if getattr(model, "_nodes_by_depth", None) is None:
        raise ConfigError(
            f"model {model.name!r} is a subclassed keras.Model: transferkit needs a Functional "
            "or Sequential model whose layers it can see."
        )
    return model
