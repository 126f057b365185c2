"""Loading Keras 2 `.h5` files that Keras 3 rejects.

Two things in real Keras 2 files stop `keras.models.load_model` (checked on Keras 3.15.1):

- A nested Functional/Sequential model (a base model used as a layer) is referred to with a
  `node_index` one higher than Keras 3 counts: "nodes failed to be resolved".
- Keras 2 layer arguments Keras 3 rejects (`groups=1` on `DepthwiseConv2D`, in every Keras 2
  MobileNet): "Unrecognized keyword arguments passed to DepthwiseConv2D".
- TensorFlow operations called on Keras tensors (`tf.math.truediv` in `preprocess_input`,
  `x * 2.0`, `a + b`, `tf.concat`, `x[:, 1:]`) were saved as `TFOpLambda` and `SlicingOpLambda`
  layers, which Keras 3 no longer has: "Unknown layer: 'TFOpLambda'".

Keras 2.13-2.15 also wrote `.keras` archives, which Keras 3 cannot read at all (their config
names `keras.src.engine.functional`). `load_keras2_keras` reads them the same way.

`load_keras2_h5` rebuilds such a file from a corrected config with Keras 3 versions of those two
layers, then loads the weights, using the same private scopes as Keras' own legacy loader.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras

__all__ = [
    "SlicingOpLambda",
    "TFOpLambda",
    "is_keras2_failure",
    "keras2_config",
    "keras2_nested_config",
    "load_keras2_h5",
    "load_keras2_keras",
    "written_by_keras2",
]

_MODEL_CLASSES = ("Functional", "Model", "Sequential")
_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")
# The call keyword that names which keyword arguments arrive as extra input tensors.
_TENSOR_KWARGS = "transferkit_tensor_kwargs"


def is_keras2_failure(exc: BaseException) -> bool:
    """Whether `keras.models.load_model` failed on one of the Keras 2 quirks handled here."""
    text = str(exc)
    return (
        "failed to be resolved" in text
        or any(f"Unknown layer: '{name}'" in text for name in _OP_CLASSES)
        or any(
            f"Unrecognized keyword arguments passed to {cls}" in text for cls in _OBSOLETE_ARGUMENTS
        )
    )


# ------------------------------------------------------------------- TensorFlow op layers


def _resolve_function(name: str) -> Any:
    import tensorflow as tf

    target: Any = tf
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(
                f"TFOpLambda calls tf.{name}, which this TensorFlow does not have; pass a "
                "replacement with custom_objects={'TFOpLambda': ...}."
            )
    if not callable(target):
        raise ValueError(f"TFOpLambda refers to tf.{name}, which is not callable.")
    return target


def _decode(value: Any) -> Any:
    # Keras 2 wrote slices as {"start", "stop", "step"} dicts and `...` as a tagged dict.
    if isinstance(value, dict):
        if value.get("class_name") == "__ellipsis__":
            return Ellipsis
        if set(value) == {"start", "stop", "step"}:
            return slice(value["start"], value["stop"], value["step"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@keras.saving.register_keras_serializable(package="transferkit")
class TFOpLambda(keras.layers.Layer):  # type: ignore[misc]
    """Keras 3 stand-in for Keras 2's `TFOpLambda`: calls `tf.<function>` on its inputs.

    Args:
        function: the dotted name under `tf` (`"math.truediv"`, `"__operators__.add"`).
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).
    """

    def __init__(self, function: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.function = str(function)
        self._fn = _resolve_function(self.function)

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("name", None)
        tensor_kwargs = kwargs.pop(_TENSOR_KWARGS, None)
        if tensor_kwargs:
            first, *rest = inputs
            kwargs.update(zip(tensor_kwargs, rest, strict=True))
            inputs = first
        return self._fn(inputs, *args, **_decode(kwargs))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["function"] = self.function
        return config


@keras.saving.register_keras_serializable(package="transferkit")
class SlicingOpLambda(TFOpLambda):
    """Keras 3 stand-in for Keras 2's `SlicingOpLambda` (`x[...]` on a Keras tensor).

    Args:
        function: `"__operators__.getitem"`.
        slice_spec_json: the Keras 2 slice specification, as JSON (kept out of the call's
            arguments, which Keras 3 cannot serialize when they hold slices).
        **kwargs: base layer arguments.
    """

    def __init__(self, function: str, slice_spec_json: str | None = None, **kwargs: Any) -> None:
        super().__init__(function, **kwargs)
        self.slice_spec_json = slice_spec_json

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("name", None)
        raw = kwargs.pop("slice_spec", None)
        if self.slice_spec_json is not None:
            raw = json.loads(self.slice_spec_json)
        spec = _decode(raw)
        if isinstance(spec, list):
            spec = tuple(spec)
        return inputs[spec]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["slice_spec_json"] = self.slice_spec_json
        return config


# ---------------------------------------------------------------------- config rewrites


def _nested_model_names(layer_configs: list[Any]) -> set[str]:
    return {
        str(layer.get("name") or layer.get("config", {}).get("name"))
        for layer in layer_configs
        if isinstance(layer, dict) and layer.get("class_name") in _MODEL_CLASSES
    }


def _shift_refs(node: Any, nested: set[str]) -> Any:
    # A reference is `[layer_name, node_index, tensor_index, ...]`, in the old list format or
    # under "keras_history" in the new one; anything else is walked through unchanged.
    if isinstance(node, list):
        if (
            len(node) >= 3
            and isinstance(node[0], str)
            and node[0] in nested
            and isinstance(node[1], int)
            and not isinstance(node[1], bool)
            and node[1] >= 1
        ):
            return [node[0], node[1] - 1, *node[2:]]
        return [_shift_refs(item, nested) for item in node]
    if isinstance(node, dict):
        return {key: _shift_refs(value, nested) for key, value in node.items()}
    return node


def _is_ref(value: Any, names: set[str]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and value[0] in names
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
    )


def _op_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Op-layer nodes in the form Keras 3's legacy loader reads.

    Keras 2 wrote a one-input op call as the bare entry `[name, node, tensor, kwargs]` rather
    than a list of entries, and a tensor keyword argument (`a + b` saved as `add(a, y=b)`) as a
    reference list inside the kwargs, which Keras 3 would pass through verbatim. Each node
    becomes a list of entries, and such tensors become extra inputs named in the kwargs.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed = []
    for node in inbound_nodes:
        entries = [node] if isinstance(node, list) and node and isinstance(node[0], str) else node
        entry = entries[0] if isinstance(entries, list) and len(entries) == 1 else None
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not isinstance(entry[3], dict)
            or not any(_is_ref(v, names) for v in entry[3].values())
        ):
            fixed.append(entries)
            continue
        kwargs = {k: v for k, v in entry[3].items() if not _is_ref(v, names)}
        refs = [v for v in entry[3].values() if _is_ref(v, names)]
        kwargs[_TENSOR_KWARGS] = [k for k, v in entry[3].items() if _is_ref(v, names)]
        fixed.append([[*entry[:3], kwargs], *[[*ref, kwargs] for ref in refs]])
    return fixed


def _slice_spec_into_config(layer: dict[str, Any]) -> None:
    # One call per layer (Keras 2 made a layer per `x[...]`): its slice moves into the config.
    nodes = layer.get("inbound_nodes")
    config = layer.get("config")
    if not (isinstance(nodes, list) and len(nodes) == 1 and isinstance(config, dict)):
        return
    for entry in nodes[0]:
        if isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], dict):
            spec = entry[3].pop("slice_spec", None)
            if spec is not None:
                config["slice_spec_json"] = json.dumps(spec)


# Ops with a constant `y`, as `Rescaling(scale, offset)`: x * scale + offset.
_AFFINE: dict[str, Callable[[float], tuple[float, float]]] = {
    "math.truediv": lambda y: (1.0 / y, 0.0),
    "__operators__.truediv": lambda y: (1.0 / y, 0.0),
    "math.multiply": lambda y: (y, 0.0),
    "__operators__.mul": lambda y: (y, 0.0),
    "math.add": lambda y: (1.0, y),
    "__operators__.add": lambda y: (1.0, y),
    "math.subtract": lambda y: (1.0, -y),
    "__operators__.sub": lambda y: (1.0, -y),
}
# Ops of two tensors, as the Keras merge layer that computes the same.
_MERGE = {
    "math.add": "Add",
    "__operators__.add": "Add",
    "math.multiply": "Multiply",
    "__operators__.mul": "Multiply",
    "math.subtract": "Subtract",
    "__operators__.sub": "Subtract",
}


def _as_native_layer(layer: dict[str, Any]) -> None:
    """Rewrites a `TFOpLambda` whose op a built-in Keras 3 layer computes into that layer.

    A model made only of built-in layers saves to a file that plain `keras.models.load_model`
    reads in any process; the stand-in classes need `transferkit.keras2` imported. Covered:
    arithmetic with a constant (`preprocess_input`'s `x / 127.5 - 1`, `x * 2.0`) as
    `Rescaling`, the same ops on two tensors as `Add` / `Multiply` / `Subtract`, `tf.concat` as
    `Concatenate` and `tf.nn.relu` as `ReLU`. Anything else keeps the stand-in.
    """
    if layer.get("class_name") != "TFOpLambda":
        return
    config = layer.get("config")
    nodes = layer.get("inbound_nodes")
    if not (isinstance(config, dict) and isinstance(nodes, list) and len(nodes) == 1):
        return
    entries = nodes[0]
    if not (isinstance(entries, list) and entries and all(len(e) == 4 for e in entries)):
        return
    function = str(config.get("function"))
    kwargs = dict(entries[0][3])
    kwargs.pop("name", None)
    tensor_kwargs = kwargs.pop(_TENSOR_KWARGS, None)
    base = {k: config[k] for k in ("name", "trainable", "dtype") if k in config}
    native: tuple[str, dict[str, Any]] | None = None
    y = kwargs.pop("y", None)
    if (
        function in _AFFINE
        and len(entries) == 1
        and not kwargs
        and isinstance(y, (int, float))
        and not isinstance(y, bool)
        and y != 0
    ):
        scale, offset = _AFFINE[function](float(y))
        native = ("Rescaling", {"scale": scale, "offset": offset})
    elif function in _MERGE and tensor_kwargs == ["y"] and len(entries) == 2 and not kwargs:
        native = (_MERGE[function], {})
    elif function == "concat" and tensor_kwargs is None and y is None and set(kwargs) <= {"axis"}:
        native = ("Concatenate", {"axis": kwargs.get("axis", -1)})
    elif function == "nn.relu" and len(entries) == 1 and tensor_kwargs is None and not kwargs:
        native = ("ReLU", {})
    if native is None:
        return
    layer["class_name"] = native[0]
    layer["config"] = {**base, **native[1]}
    layer["inbound_nodes"] = [[[*entry[:3], {}] for entry in entries]]


# Keras 2 arguments that Keras 3 layers no longer accept, dropped when they hold the value that
# meant "no change" in Keras 2.
_OBSOLETE_ARGUMENTS = {"DepthwiseConv2D": {"groups": 1}}


def _drop_obsolete(layer: dict[str, Any]) -> None:
    obsolete = _OBSOLETE_ARGUMENTS.get(str(layer.get("class_name")), {})
    config = layer.get("config")
    if not isinstance(config, dict):
        return
    for key, neutral in obsolete.items():
        if config.get(key, neutral) == neutral:
            config.pop(key, None)


def _fix_level(model_config: dict[str, Any], *, shift_nested: bool) -> None:
    inner = model_config.get("config")
    if not isinstance(inner, dict):
        return
    layers = inner.get("layers")
    if not isinstance(layers, list):
        return
    nested = _nested_model_names(layers) if shift_nested else set()
    names = {str(layer.get("name")) for layer in layers if isinstance(layer, dict)}
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("class_name") in _MODEL_CLASSES:
            _fix_level(layer, shift_nested=shift_nested)
        _drop_obsolete(layer)
        if "inbound_nodes" not in layer:
            continue
        if nested:
            layer["inbound_nodes"] = _shift_refs(layer["inbound_nodes"], nested)
        if layer.get("class_name") in _OP_CLASSES:
            layer["inbound_nodes"] = _op_nodes(layer["inbound_nodes"], names)
            _as_native_layer(layer)
        if layer.get("class_name") == "SlicingOpLambda":
            _slice_spec_into_config(layer)
    for key in ("input_layers", "output_layers"):
        if nested and key in inner:
            inner[key] = _shift_refs(inner[key], nested)


def keras2_config(config: dict[str, Any], *, shift_nested: bool = True) -> dict[str, Any]:
    """A Keras 2 model config that Keras 3 can build (with `TFOpLambda` registered).

    Every reference to a nested model layer is shifted down by one node (when `shift_nested`),
    at every nesting depth; op-layer nodes take the form Keras 3 reads (tensor keyword
    arguments become inputs); obsolete Keras 2 arguments are dropped. The input is not modified.

    Args:
        config: a `{"class_name": ..., "config": {...}}` model config from a Keras 2 `.h5`.
        shift_nested: correct the references to nested models.

    Returns:
        The corrected deep copy.
    """
    fixed = copy.deepcopy(config)
    _fix_level(fixed, shift_nested=shift_nested)
    return fixed


def keras2_nested_config(config: dict[str, Any]) -> dict[str, Any]:
    """`keras2_config` for a file whose only quirk is nested models (kept for callers)."""
    return keras2_config(config)


def _build(
    config: dict[str, Any], *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """A model from a corrected Keras 2 config, in the scopes Keras' own legacy loader uses
    (private Keras APIs, checked against Keras 3.15.1)."""
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    objects = {"TFOpLambda": TFOpLambda, "SlicingOpLambda": SlicingOpLambda}
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


def load_keras2_h5(
    path: Path, *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """Loads a Keras 2 `.h5` that `keras.models.load_model` cannot (see the module docstring):
    the corrected config, then the weights as Keras' legacy loader reads them."""
    import h5py  # type: ignore[import-untyped]
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
        config = keras2_config(json.loads(raw), shift_nested=not version.startswith("3"))
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


def _legacy_form(obj: Any) -> Any:
    # Keras 2's `.keras` config is its `.h5` config plus serialization metadata that Keras 3
    # would resolve against modules that no longer exist.
    if isinstance(obj, dict):
        return {
            k: _legacy_form(v)
            for k, v in obj.items()
            if k not in ("module", "registered_name", "build_config", "compile_config")
        }
    if isinstance(obj, list):
        return [_legacy_form(v) for v in obj]
    return obj


def load_keras2_keras(
    path: Path, *, custom_objects: Mapping[str, Any], safe_mode: bool
) -> keras.Model:
    """Loads a `.keras` archive written by Keras 2.13-2.15: its config read as a Keras 2 `.h5`
    config (corrected as in `keras2_config`), then its weights file, whose layout Keras 3's
    `load_weights` reads."""
    import tempfile
    import zipfile

    with zipfile.ZipFile(path) as archive:
        config = keras2_config(_legacy_form(json.loads(archive.read("config.json"))))
        weights = archive.read("model.weights.h5")
    model = _build(config, custom_objects=custom_objects, safe_mode=safe_mode)
    with tempfile.TemporaryDirectory(prefix="transferkit-keras2-") as tmp:
        weights_path = Path(tmp) / "model.weights.h5"
        weights_path.write_bytes(weights)
        model.load_weights(weights_path)
    return model
