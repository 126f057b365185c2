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

from transferkit.errors import ConfigError, ModelLoadError
from transferkit.model.graph import fresh_inputs, graph_inputs, quiet_dict_inputs, replay
from transferkit.model.keras2.files import (
    h5_written_by_keras2,
    is_keras2_failure,
    load_keras2_h5,
    load_keras2_keras,
    written_by_keras2,
)

__all__ = [
    "copy_model",
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
    try:
        with (
            keras.saving.custom_object_scope(dict(custom_objects or {})),
            safe_mode_scope(safe_mode),
            quiet_dict_inputs(),
        ):
            clone = keras.models.clone_model(model)
    except Exception as exc:
        raise ConfigError(
            f"cannot copy model {model.name!r}: {exc}. Pass copy=False to work on it in place, "
            f"or pass its custom classes with custom_objects=.{_load_hint(exc)}"
        ) from exc
    clone.set_weights(model.get_weights())
    _copy_flags(model, clone)
    return clone


def _copy_flags(src: keras.layers.Layer, dst: keras.layers.Layer) -> None:
    # Containers first: their setter overwrites every sublayer's flag.
    if dst.trainable != src.trainable:
        dst.trainable = src.trainable
    src_children = list(getattr(src, "layers", []))
    dst_children = list(getattr(dst, "layers", []))
    src_children = [c for c in src_children if not isinstance(c, keras.layers.InputLayer)]
    dst_children = [c for c in dst_children if not isinstance(c, keras.layers.InputLayer)]
    for s, d in zip(src_children, dst_children, strict=False):
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
