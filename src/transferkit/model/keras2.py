"""Loading Keras 2 `.h5` and `.keras` files that Keras 3 rejects or misreads.

What stops `keras.models.load_model` on real Keras 2 files (checked on Keras 3.15.1), and what
this module does about it, all by rewriting the saved config before Keras builds the model:

- A nested Functional/Sequential model (a base model used as a layer) is referred to with a
  `node_index` one higher than Keras 3 counts ("nodes failed to be resolved"): shifted.
- TensorFlow operations called on Keras tensors (`tf.math.truediv` in `preprocess_input`,
  `x * 2.0`, `a + b`, `tf.concat`, `x[:, 1:]`) were saved as `TFOpLambda` and `SlicingOpLambda`
  layers, which Keras 3 no longer has: built-in layers where one computes the op, else the
  stand-ins defined here.
- Layer names with a `/` (every Keras 2 DenseNet: `conv1/conv`; MobileNetV3: `Conv/BatchNorm`;
  models ported from TF-Slim): "Argument `name` ... cannot contain character `/`". Such layers
  are renamed with `_` in place of `/` (`conv1_conv`), made unique if needed. Weights still load:
  `.h5` weights go by layer order, and a Keras 2 `.keras` archive keys them by class, not name.
- Keras 2 arguments Keras 3 refuses (`groups=1` on `DepthwiseConv2D` in every MobileNet,
  `time_major` on every recurrent layer, the unused `kernel_*` of `SeparableConv2D`, ...):
  dropped when they hold the value that changed nothing (`_OBSOLETE_ARGUMENTS`).
- Tensors passed by keyword (`initial_state=` of a decoder LSTM, `value=` of
  MultiHeadAttention), which Keras 3's legacy loader does not resolve: rewritten into the node
  format it does resolve.
- Keras 2's `hard_sigmoid` (slope 0.2), which Keras 3 would silently replace with its own (slope
  1/6): kept as `keras2_hard_sigmoid`.
- `keras.applications` layers Keras 3 does not register (`LayerScale`, `CustomScaleLayer`).
- tf-keras 2.16-2.21 (the Keras 2 of TensorFlow 2.16+) writes `rng_type` on every random layer
  (`_KERAS2_BASE_ARGUMENTS`: dropped for built-in layers) and `softmax_robust_masking` on
  MultiHeadAttention; Keras 3 has no `RandomHeight` / `RandomWidth` (stand-ins here) and its
  `RandomCrop` does not crop in inference (`Keras2RandomCrop`).

Keras 2.13-2.15 and tf-keras 2.16+ also wrote `.keras` archives, which Keras 3 cannot read at all (their config
names `keras.src.engine.functional`). `load_keras2_keras` reads them the same way.

`load_keras2_h5` rebuilds such a file from the corrected config, then loads the weights, using
the same private scopes as Keras' own legacy loader.

Safe mode: op layers resolve only exported TensorFlow names, and in safe mode only pure tensor
operations (`check_op_name`), checked on the config as read, before any layer is built; lambdas
are Keras' own business (refused in safe mode) and module fields of Keras 2 archives are dropped.
"""

from __future__ import annotations

import binascii
import codecs
import copy
import inspect
import json
import marshal
import types
from collections.abc import Callable, Container, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.errors import ModelLoadError

__all__ = [
    "Keras2Lambda",
    "Keras2RandomCrop",
    "RandomHeight",
    "RandomWidth",
    "SlicingOpLambda",
    "TFOpLambda",
    "check_op_layers",
    "check_op_name",
    "is_keras2_failure",
    "keras2_config",
    "keras2_hard_sigmoid",
    "keras2_nested_config",
    "keras3_name",
    "load_keras2_h5",
    "load_keras2_keras",
    "h5_written_by_keras2",
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
        or "cannot contain character `/`" in text
        or any(f"Unknown layer: '{name}'" in text for name in _OP_CLASSES)
        or any(
            f"Unrecognized keyword arguments passed to {cls}" in text for cls in _OBSOLETE_ARGUMENTS
        )
        or any(f"'{key}'" in text for key in _KERAS2_BASE_ARGUMENTS)
        or any(f"Unknown layer: '{name}'" in text for name in _STAND_INS)
    )


# ------------------------------------------------------------------- TensorFlow op layers


# Under safe_mode an op layer may call only these: pure tensor operations, what Keras 2 models
# built from `keras.applications` and common tutorials contain. Whole namespaces first (nothing in
# them reads or writes files, prints, or changes global state; checked against TF 2.21), then
# single names. Everything else TensorFlow exports (`io`, `print`, `summary`, `debugging`,
# `py_function`, `saved_model`, `data`, `config`, `distribute`, `compat`, `raw_ops`, ...) needs
# `safe_mode=False`.
_SAFE_OP_NAMESPACES = (
    "__operators__",
    "bitwise",
    "dtypes",
    "image",
    "linalg",
    "math",
    "nn",
    "signal",
)
_SAFE_OPS = frozenset(
    {
        # arithmetic, comparisons, elementwise maths exported at the top level
        *("abs", "acos", "acosh", "add", "add_n", "asin", "asinh", "atan", "atan2", "atanh"),
        *("complex", "cos", "cosh", "cumsum", "divide", "equal", "exp", "floor", "greater"),
        *("greater_equal", "less", "less_equal", "logical_and", "logical_not", "logical_or"),
        *("maximum", "minimum", "multiply", "negative", "not_equal", "pow", "realdiv", "round"),
        *("scalar_mul", "sigmoid", "sign", "sin", "sinh", "sqrt", "square", "subtract", "tan"),
        *("tanh", "truediv", "truncatediv", "truncatemod", "clip_by_norm", "clip_by_value"),
        # reductions and linear algebra
        *("argmax", "argmin", "einsum", "matmul", "norm", "reduce_all", "reduce_any"),
        *("reduce_logsumexp", "reduce_max", "reduce_mean", "reduce_min", "reduce_prod"),
        *("reduce_sum", "tensordot", "eye"),
        # casting and tensor creation from values
        *("bitcast", "cast", "saturate_cast", "constant", "convert_to_tensor", "fill", "linspace"),
        *("meshgrid", "one_hot", "ones", "ones_like", "range", "zeros", "zeros_like"),
        # array manipulation
        *("argsort", "batch_to_space", "boolean_mask", "broadcast_to", "concat", "ensure_shape"),
        *("expand_dims", "gather", "gather_nd", "identity", "pad", "rank", "repeat", "reshape"),
        *("reverse", "reverse_sequence", "roll", "scatter_nd", "searchsorted", "sequence_mask"),
        *("shape", "size", "slice", "sort", "space_to_batch", "space_to_batch_nd", "split"),
        *("squeeze", "stack", "stop_gradient", "strided_slice", "tensor_scatter_nd_add"),
        *("tensor_scatter_nd_sub", "tensor_scatter_nd_update", "tile", "transpose", "unstack"),
        *("where",),
        # random tensors (noise layers, VAE sampling); `random.set_seed` and generators are not
        *("random.normal", "random.uniform", "random.truncated_normal", "random.categorical"),
        *("random.stateless_normal", "random.stateless_uniform"),
        *("random.stateless_truncated_normal",),
    }
)


def _is_safe_op(name: str) -> bool:
    return name in _SAFE_OPS or name.split(".", 1)[0] in _SAFE_OP_NAMESPACES


def _tf_symbol(name: str) -> Any:
    """The TensorFlow API symbol exported as `tf.<name>`, or None.

    Only exported names: TensorFlow's own export registry, which Keras 2's `TFOpLambda` resolved
    against (private TensorFlow API, checked against TF 2.21). A path that merely exists under the
    module (`tf._sys.exit`, `tf.math._sys`) is not one.
    """
    import tensorflow as tf

    try:
        from tensorflow.python.util import tf_export
    except ImportError:  # a TensorFlow without the registry: walk the public attributes
        target: Any = tf
        for part in name.split("."):
            target = getattr(target, part, None)
        return target
    return tf_export.get_symbol_from_name(name)


def check_op_name(name: str, *, layer: str, safe_mode: bool) -> None:
    """Refuses an op-layer function name that the file must not make transferkit call.

    Private names (a path part starting with `_`, other than TensorFlow's exported
    `__operators__` module) are refused whatever `safe_mode` says; with `safe_mode`, so is every
    name outside the pure tensor operations. Nothing is resolved or called here.

    Args:
        name: the dotted name under `tf` the layer's config gives (`"math.truediv"`).
        layer: the layer's name, for the message.
        safe_mode: whether the file is untrusted.

    Raises:
        ModelLoadError: the name is private, or not allowed in safe mode.
    """
    parts = name.split(".")
    private = [
        p for i, p in enumerate(parts) if p.startswith("_") and (i, p) != (0, "__operators__")
    ]
    if not name or private or not all(parts):
        raise ModelLoadError(
            f"op layer {layer!r} names tf.{name}, which is not a public TensorFlow API name; "
            "transferkit calls only exported TensorFlow functions from a file (with or without "
            "safe_mode). The file is damaged or hostile."
        )
    if safe_mode and not _is_safe_op(name):
        raise ModelLoadError(
            f"op layer {layer!r} calls tf.{name}, which is not allowed in safe_mode: only pure "
            "tensor operations (arithmetic, math, nn, array manipulation, image, linalg, signal, "
            "casting, reductions) run from a file nobody vouched for. Pass safe_mode=False if "
            "you trust the file."
        )


def _resolve_function(name: str) -> Any:
    check_op_name(name, layer="?", safe_mode=False)
    target = _tf_symbol(name)
    if target is None:
        raise ValueError(
            f"TFOpLambda calls tf.{name}, which this TensorFlow does not export; pass a "
            "replacement with custom_objects={'TFOpLambda': ...}."
        )
    if not callable(target):
        raise ValueError(f"TFOpLambda refers to tf.{name}, which is not callable.")
    return target


def check_op_layers(config: Any, *, safe_mode: bool) -> None:
    """`check_op_name` for every op layer in a saved model config, nested models included.

    Run on the config as read from the file, before any layer is built.

    Raises:
        ModelLoadError: an op layer names a function it must not call.
    """
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            class_name = str(node.get("class_name", "")).rpartition(">")[2]
            inner = node.get("config")
            if class_name in _OP_CLASSES and isinstance(inner, dict):
                layer = str(inner.get("name", node.get("name", "?")))
                check_op_name(str(inner.get("function", "")), layer=layer, safe_mode=safe_mode)
            stack.extend(node.values())


def _effective_safe_mode() -> bool:
    # As Keras' own Lambda: outside any loading scope (a direct `from_config`), fail closed.
    from keras.src.saving import serialization_lib

    return serialization_lib.in_safe_mode() is not False


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

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TFOpLambda:
        """The layer from its config; in safe mode only pure tensor operations (see
        `check_op_name`), checked before anything is resolved.

        Raises:
            ModelLoadError: the config names a private function, or one that safe mode refuses.
        """
        check_op_name(
            str(config.get("function", "")),
            layer=str(config.get("name", "?")),
            safe_mode=_effective_safe_mode(),
        )
        layer: TFOpLambda = super().from_config(config)
        return layer

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


# ------------------------------------------------------------ layers Keras 3 removed


class _RandomSize(keras.layers.Layer):  # type: ignore[misc]
    """Keras 2's RandomHeight / RandomWidth: in training, resizes one spatial axis by a random
    factor drawn once per batch from `[1 + lower, 1 + upper]`; in inference, the identity.

    Keras 2 laid images out as `channels_last` only; like Keras 2 (and the TF ops stand-ins
    above) this runs on the TensorFlow backend.
    """

    _axis = -3  # the resized axis of `(..., height, width, channels)`

    def __init__(
        self,
        factor: float | tuple[float, float] | list[float],
        interpolation: str = "bilinear",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(factor, (tuple, list)):
            lower, upper = float(factor[0]), float(factor[1])
        else:
            lower, upper = -float(factor), float(factor)
        if upper < lower or lower < -1.0:
            raise ValueError(
                f"{type(self).__name__}: `factor` must be a number or a (lower, upper) pair with "
                f"lower <= upper and both above -1; got factor={factor!r}."
            )
        self.factor = factor
        self.interpolation = interpolation
        self.seed = seed
        self._range = (1.0 + lower, 1.0 + upper)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training:
            return inputs
        import tensorflow as tf

        shape = tf.shape(inputs)
        scale = keras.random.uniform([], *self._range, seed=self.seed_generator)
        size = [shape[-3], shape[-2]]
        size[self._axis + 3] = tf.cast(scale * tf.cast(shape[self._axis], "float32"), "int32")
        resized = tf.image.resize(inputs, tf.stack(size), method=self.interpolation)
        return tf.cast(resized, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        shape = list(input_shape)
        shape[self._axis] = None
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(factor=self.factor, interpolation=self.interpolation, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="transferkit")
class RandomHeight(_RandomSize):
    """Keras 3 stand-in for Keras 2's `RandomHeight` (removed in Keras 3).

    Args:
        factor: the height changes by a factor drawn from `[1 - factor, 1 + factor]`, or
            `[1 + lower, 1 + upper]` for a `(lower, upper)` pair.
        interpolation: a `tf.image.resize` method (`"bilinear"`, `"nearest"`, ...).
        seed: the random seed.
        **kwargs: base layer arguments.
    """

    _axis = -3


@keras.saving.register_keras_serializable(package="transferkit")
class RandomWidth(_RandomSize):
    """Keras 3 stand-in for Keras 2's `RandomWidth` (removed in Keras 3); see `RandomHeight`."""

    _axis = -2


def _smart_resize(images: Any, height: int, width: int) -> Any:
    # Keras 2's `smart_resize`: the largest central window of the target aspect ratio, resized
    # (bilinear) to the target size; shapes may be dynamic.
    import tensorflow as tf

    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    crop_h = tf.minimum(h, tf.cast(tf.cast(w * height, "float32") / width, "int32"))
    crop_w = tf.minimum(w, tf.cast(tf.cast(h * width, "float32") / height, "int32"))
    start = tf.stack([0, (h - crop_h) // 2, (w - crop_w) // 2, 0])
    window = tf.slice(images, start, tf.stack([-1, crop_h, crop_w, -1]))
    return tf.image.resize(window, (height, width))


@keras.saving.register_keras_serializable(package="transferkit")
class Keras2RandomCrop(keras.layers.Layer):  # type: ignore[misc]
    """Keras 2's `RandomCrop`, which Keras 3's does not reproduce.

    In training, a random `(height, width)` window (images smaller than that are resized as in
    inference); in inference, the largest central window of the target aspect ratio, resized
    to `(height, width)`. Keras 3.15.1's `RandomCrop` returns the images unchanged in inference
    (larger than its own `compute_output_shape` says: a Keras 2 model predicts differently, or
    fails at a `Flatten`), and fails in training on images of unknown size (after Keras 2's
    `RandomHeight`). `channels_last` and the TensorFlow backend, like Keras 2.

    Args:
        height: the output height.
        width: the output width.
        seed: the random seed.
        **kwargs: base layer arguments.
    """

    def __init__(self, height: int, width: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.height = int(height)
        self.width = int(width)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any, training: bool = False) -> Any:
        import tensorflow as tf

        images = tf.convert_to_tensor(inputs)
        unbatched = images.shape.rank == 3
        if unbatched:
            images = images[None]
        if training:
            shape = tf.shape(images)
            room = shape[1:3] - tf.constant([self.height, self.width])
            draw = keras.random.uniform([2], 0.0, 1.0, seed=self.seed_generator)
            start = tf.cast(draw * tf.cast(room + 1, "float32"), "int32")
            start = tf.minimum(start, tf.maximum(room, 0))
            outputs = tf.cond(
                tf.reduce_all(room >= 0),
                lambda: tf.slice(
                    images,
                    tf.stack([0, start[0], start[1], 0]),
                    tf.stack([-1, self.height, self.width, -1]),
                ),
                lambda: tf.cast(_smart_resize(images, self.height, self.width), images.dtype),
            )
        else:
            outputs = _smart_resize(images, self.height, self.width)
        outputs = tf.cast(outputs, self.compute_dtype)
        return outputs[0] if unbatched else outputs

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-3], self.height, self.width, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(height=self.height, width=self.width, seed=self.seed)
        return config


# Keras 2 layers that Keras 3 no longer has, by their Keras 2 class names.
_STAND_INS: dict[str, type] = {"RandomHeight": RandomHeight, "RandomWidth": RandomWidth}


# ---------------------------------------------------------------------- config rewrites


def _nested_model_names(layer_configs: list[Any]) -> set[str]:
    return {
        str(layer.get("name") or layer.get("config", {}).get("name"))
        for layer in layer_configs
        if isinstance(layer, dict) and layer.get("class_name") in _MODEL_CLASSES
    }


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _map_refs(node: Any, names: Container[str], change: Callable[[list[Any]], list[Any]]) -> Any:
    """`node` with `change` applied to every reference to a layer in `names`.

    A reference is `[layer_name, node_index, tensor_index, ...]`, in the old list format or
    under "keras_history" in the new one; what follows the three (a call's kwargs) is walked too,
    as is anything else.
    """
    if isinstance(node, list):
        if (
            len(node) >= 3
            and isinstance(node[0], str)
            and node[0] in names
            and _is_index(node[1])
            and _is_index(node[2])
        ):
            return [*change(list(node[:3])), *(_map_refs(v, names, change) for v in node[3:])]
        return [_map_refs(item, names, change) for item in node]
    if isinstance(node, dict):
        return {key: _map_refs(value, names, change) for key, value in node.items()}
    return node


def _shift_refs(node: Any, nested: set[str]) -> Any:
    """Keras 2 counted a nested model's first call as node 1; Keras 3 counts it as node 0."""
    return _map_refs(node, nested, lambda ref: [ref[0], max(ref[1] - 1, 0), ref[2]])


def _is_ref(value: Any, names: set[str]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and value[0] in names
        and _is_index(value[1])
        and _is_index(value[2])
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


def _has_ref(value: Any, names: set[str]) -> bool:
    if _is_ref(value, names):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_ref(v, names) for v in value)
    if isinstance(value, dict):
        return any(_has_ref(v, names) for v in value.values())
    return False


def _as_tensor(value: Any, names: set[str]) -> Any:
    # Keras 3's serialized form of a symbolic tensor; the loader swaps it for the real output
    # of `keras_history` (shape and dtype are placeholders it does not read).
    if _is_ref(value, names):
        history = list(value)
        return {
            "class_name": "__keras_tensor__",
            "config": {"shape": [], "dtype": "float32", "keras_history": history},
        }
    if isinstance(value, (list, tuple)):
        return [_as_tensor(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _as_tensor(v, names) for k, v in value.items()}
    return value


def _legacy_entries(node: Any) -> list[list[Any]] | None:
    # A legacy node: a list of `[layer_name, node_index, tensor_index, kwargs]` entries.
    if isinstance(node, list) and node and all(isinstance(e, list) and len(e) == 4 for e in node):
        return node
    return None


def _call_node(args: list[Any], kwargs: dict[str, Any], names: set[str]) -> dict[str, Any]:
    # The node format Keras 3 resolves, references serialized as symbolic tensors.
    return {"args": _as_tensor(args, names), "kwargs": _as_tensor(kwargs, names)}


def _tensor_kwarg_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Nodes whose keyword arguments hold tensors, in the node format Keras 3 resolves.

    Keras 2 saved tensors passed by keyword (`MultiHeadAttention()(q, value=v)`) as references
    inside the legacy node's kwargs, which Keras 3's loader passes on verbatim: the layer then
    gets lists of names instead of tensors. Such a node is rewritten with `_call_node`; other
    nodes are kept.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed: list[Any] = []
    for node in inbound_nodes:
        entries = _legacy_entries(node)
        kwargs = entries[-1][3] if entries else None
        if entries is None or not (isinstance(kwargs, dict) and _has_ref(kwargs, names)):
            fixed.append(node)
            continue
        inputs = [list(e[:3]) for e in entries]
        fixed.append(_call_node([inputs[0] if len(inputs) == 1 else inputs], kwargs, names))
    return fixed


_RNN_CLASSES = (
    "RNN",
    "SimpleRNN",
    "LSTM",
    "GRU",
    "ConvLSTM1D",
    "ConvLSTM2D",
    "ConvLSTM3D",
    "Bidirectional",
)


def _rnn_state_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Recurrent-layer nodes with initial states, in the node format Keras 3 resolves.

    Keras 2 saved `LSTM(...)(x, initial_state=[h, c])` (every encoder-decoder) as one node with
    the inputs `[x, h, c]`; Keras 3 would call the layer on that list ("expects 1 input(s), but
    it received 3"). Such a node becomes a call on `x` with `initial_state=[h, c]`.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed: list[Any] = []
    for node in inbound_nodes:
        entries = _legacy_entries(node)
        if entries is None or len(entries) < 2 or not all(_is_ref(e[:3], names) for e in entries):
            fixed.append(node)
            continue
        kwargs = dict(entries[0][3]) if isinstance(entries[0][3], dict) else {}
        kwargs["initial_state"] = [list(e[:3]) for e in entries[1:]]
        fixed.append(_call_node([list(entries[0][:3])], kwargs, names))
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


# Keras 2 arguments that Keras 3 layers refuse, each with the value it must hold to be dropped
# safely (`_ANY`: Keras 2 wrote it but never used it). Checked against Keras 2.15 configs.
_ANY = object()
_RNN_ARGUMENTS = {"time_major": False}
_SEPARABLE_ARGUMENTS = {
    "groups": 1,
    # Keras 2's SeparableConv inherited these from Conv; its kernels are the depthwise and
    # pointwise ones, which have their own initializer, regularizer and constraint.
    "kernel_initializer": _ANY,
    "kernel_regularizer": _ANY,
    "kernel_constraint": _ANY,
}
_OBSOLETE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "DepthwiseConv2D": {"groups": 1},
    "SeparableConv1D": _SEPARABLE_ARGUMENTS,
    "SeparableConv2D": _SEPARABLE_ARGUMENTS,
    "SeparableConvolution1D": _SEPARABLE_ARGUMENTS,
    "SeparableConvolution2D": _SEPARABLE_ARGUMENTS,
    "DepthwiseConv1D": {"groups": 1},
    "MultiHeadAttention": {
        # Keras 3 builds the layer from its first call, not from shapes in its config.
        "query_shape": _ANY,
        "key_shape": _ANY,
        "value_shape": _ANY,
        # tf-keras 2.16+: masked scores set to -1e9 (True) or -1e9 added to them (False, the
        # default); Keras 3 always sets them, which differs only where a whole row is masked.
        "softmax_robust_masking": _ANY,
    },
    # tf-keras 2.16+ writes it only when True, which is how Keras 3's Softmax masks.
    "Softmax": {"robust_masking": True},
    # Keras 3's Discretization takes no `trainable` (it has no weights).
    "Discretization": {"trainable": _ANY},
    # Keras 3's legacy loader turns the string "dot" into the function `keras.layers.dot` (it
    # resolves strings that name functions of the layers module) and Attention then refuses it.
    # "dot" is Keras 3's default.
    "Attention": {"score_mode": "dot"},
    # Keras 3 SpatialDropout takes neither (it has no weights: `trainable` is moot).
    **{f"SpatialDropout{n}D": {"noise_shape": None, "trainable": _ANY} for n in (1, 2, 3)},
    **{
        transpose: {"groups": 1}
        for transpose in (
            "Conv1DTranspose",
            "Conv2DTranspose",
            "Conv3DTranspose",
            "Convolution1DTranspose",
            "Convolution2DTranspose",
            "Convolution3DTranspose",
        )
    },
    **{
        rnn: _RNN_ARGUMENTS
        for rnn in ("RNN", "SimpleRNN", "LSTM", "GRU", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
    },
}

# Keras 2 base-class arguments that tf-keras 2.16+ writes into the configs of whole families of
# layers, with every value they can hold. `rng_type` comes from Keras 2's `BaseRandomLayer` and
# only chose how Keras 2 drew its random numbers: every random image layer writes "stateful";
# with the TF random generator on (`enable_tf_random_generator()`), so do Dropout, GaussianNoise,
# GaussianDropout, AlphaDropout, SpatialDropout, Attention and the recurrent layers and cells.
# Keras 3 draws from a SeedGenerator built from `seed`, which stays. Dropped only for built-in
# Keras 3 layers whose constructor does not name the argument: a custom class decides for itself.
_KERAS2_BASE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "rng_type": ("stateful", "stateless", "legacy_stateful"),
}


def _drop_base_arguments(class_name: str, config: dict[str, Any]) -> None:
    present = [k for k, values in _KERAS2_BASE_ARGUMENTS.items() if config.get(k) in values]
    if not present:
        return
    cls = _builtin_layers().get(class_name) or _STAND_INS.get(class_name)
    if cls is None:
        return
    accepted = inspect.signature(cls).parameters
    for key in present:
        if key not in accepted:
            config.pop(key)


# Keras 2's hard_sigmoid is clip(0.2 * x + 0.5, 0, 1); Keras 3's is clip(x / 6 + 0.5, 0, 1).
# The name alone would load silently with the other function (ConvLSTM2D's default recurrent
# activation in Keras 2), so it is rewritten to Keras 2's function, registered below.
_ACTIVATION_KEYS = ("activation", "recurrent_activation")
_KERAS2_HARD_SIGMOID = "keras2_hard_sigmoid"


@keras.saving.register_keras_serializable(  # type: ignore[untyped-decorator]
    package="transferkit", name=_KERAS2_HARD_SIGMOID
)
def keras2_hard_sigmoid(x: Any) -> Any:
    """Keras 2's `hard_sigmoid`: `clip(0.2 * x + 0.5, 0, 1)` (Keras 3's has slope 1/6)."""
    return keras.ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def _fix_arguments(layer: dict[str, Any]) -> None:
    config = layer.get("config")
    if not isinstance(config, dict):
        return
    _drop_base_arguments(str(layer.get("class_name")), config)
    if layer.get("class_name") == "RandomCrop":
        # Keras 3's RandomCrop does not crop in inference (see Keras2RandomCrop).
        layer["class_name"] = "transferkit>Keras2RandomCrop"
    if layer.get("class_name") == "ThresholdedReLU":
        # Removed in Keras 3; `ReLU(threshold=theta)` computes the same (x > theta ? x : 0).
        layer["class_name"] = "ReLU"
        theta = config.pop("theta", 1.0)
        config["threshold"] = theta
    obsolete = _OBSOLETE_ARGUMENTS.get(str(layer.get("class_name")), {})
    for key, neutral in obsolete.items():
        if key in config and (neutral is _ANY or config[key] == neutral):
            config.pop(key)
    for key in _ACTIVATION_KEYS:
        if config.get(key) == "hard_sigmoid":
            config[key] = _KERAS2_HARD_SIGMOID
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
        # Keras 2's mixed-precision policy object; Keras 3 takes the policy's name as dtype
        # (its loader would pass the dict on as a string and fail on `quantization_mode`).
        config["dtype"] = (dtype.get("config") or {}).get("name", "float32")
    # Wrapped layers (Bidirectional's `layer` and `backward_layer`, TimeDistributed's `layer`,
    # an RNN's `cell`, StackedRNNCells' `cells`) are configs inside the config.
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            wrapped = isinstance(item, dict) and "class_name" in item and "config" in item
            if wrapped and item.get("class_name") not in _MODEL_CLASSES:
                _fix_arguments(item)


def keras3_name(name: str) -> str:
    """The name a Keras 2 layer called `name` gets here (before any de-duplication)."""
    return name.replace("/", "_")


def _rename_refs(node: Any, renamed: Mapping[str, str]) -> Any:
    return _map_refs(node, renamed.keys(), lambda ref: [renamed[ref[0]], ref[1], ref[2]])


def _layer_name(layer: dict[str, Any]) -> str:
    # Functional layers carry their name twice; Sequential ones only inside "config".
    config = layer.get("config")
    inner = config.get("name") if isinstance(config, dict) else None
    return str(layer.get("name", inner))


def _rename_slashes(inner: dict[str, Any], layers: list[Any]) -> None:
    """Renames this level's layers whose names hold a `/`, which Keras 3 refuses."""
    names = [_layer_name(layer) for layer in layers if isinstance(layer, dict)]
    taken = set(names)
    renamed: dict[str, str] = {}
    for old in names:
        if "/" not in old:
            continue
        new = base = keras3_name(old)
        count = 0
        while new in taken:
            count += 1
            new = f"{base}_{count}"
        taken.add(new)
        renamed[old] = new
    if not renamed:
        return
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        old = _layer_name(layer)
        if old in renamed:
            if "name" in layer:
                layer["name"] = renamed[old]
            if isinstance(layer.get("config"), dict):
                layer["config"]["name"] = renamed[old]
        if "inbound_nodes" in layer:
            layer["inbound_nodes"] = _rename_refs(layer["inbound_nodes"], renamed)
    for key in ("input_layers", "output_layers"):
        if key in inner:
            inner[key] = _rename_refs(inner[key], renamed)


def _fix_level(model_config: dict[str, Any], *, shift_nested: bool) -> None:
    inner = model_config.get("config")
    if not isinstance(inner, dict):
        return
    layers = inner.get("layers")
    if not isinstance(layers, list):
        return
    _rename_slashes(inner, layers)
    nested = _nested_model_names(layers) if shift_nested else set()
    names = {str(layer.get("name")) for layer in layers if isinstance(layer, dict)}
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("class_name") in _MODEL_CLASSES:
            _fix_level(layer, shift_nested=shift_nested)
        _fix_arguments(layer)
        if "inbound_nodes" not in layer:
            continue
        if nested:
            layer["inbound_nodes"] = _shift_refs(layer["inbound_nodes"], nested)
        if layer.get("class_name") in _OP_CLASSES:
            layer["inbound_nodes"] = _op_nodes(layer["inbound_nodes"], names)
            _as_native_layer(layer)
        else:
            if layer.get("class_name") in _RNN_CLASSES:
                layer["inbound_nodes"] = _rnn_state_nodes(layer["inbound_nodes"], names)
            layer["inbound_nodes"] = _tensor_kwarg_nodes(layer["inbound_nodes"], names)
        if layer.get("class_name") == "SlicingOpLambda":
            _slice_spec_into_config(layer)
    for key in ("input_layers", "output_layers"):
        if nested and key in inner:
            inner[key] = _shift_refs(inner[key], nested)


def keras2_config(config: dict[str, Any], *, shift_nested: bool = True) -> dict[str, Any]:
    """A Keras 2 model config that Keras 3 can build (with `TFOpLambda` registered).

    Every reference to a nested model layer is shifted down by one node (when `shift_nested`),
    at every nesting depth; op-layer nodes take the form Keras 3 reads (tensor keyword
    arguments become inputs); obsolete Keras 2 arguments are dropped; `/` in layer names becomes
    `_`. The input is not modified.

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

    objects: dict[str, Any] = dict(_builtin_layers())
    objects.update({"TFOpLambda": TFOpLambda, "SlicingOpLambda": SlicingOpLambda})
    objects.update(_STAND_INS)
    objects[_KERAS2_HARD_SIGMOID] = keras2_hard_sigmoid
    objects.update(_application_layers())
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


def _builtin_layers() -> dict[str, Any]:
    # A wrapped layer (Bidirectional's LSTM) is deserialized by Keras 3's new-style code, which
    # needs a module for built-in classes; a Keras 2 `.keras` config loses its modules here
    # (they name Keras 2 internals), so built-in layers are found by class name.
    return {
        name: obj
        for name, obj in vars(keras.layers).items()
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
    }


_LAMBDA_DEP_ARGS = ("module", "function_type", "output_shape_type", "output_shape_module")
_LAMBDA_MODULES = ("tf", "np")


@keras.saving.register_keras_serializable(package="transferkit")
class Keras2Lambda(keras.layers.Lambda):  # type: ignore[misc]
    """A Keras 2 `Lambda` whose function uses `tf` or `np` as globals.

    Keras 2 ran a deserialized lambda with its own module's globals, which held `tf` and `np`:
    `Lambda(lambda x: tf.math.l2_normalize(x, axis=1))` (every face-embedding model) loaded.
    Keras 3 gives it the globals of `keras.src.utils.python_utils`, where `tf` is undefined, and
    the load fails ("could not automatically infer the shape of the Lambda's output"). This
    layer rebuilds the function with those two names added; it is used (with `safe_mode=False`,
    as for any lambda) only for functions that name them.
    """

    def __init__(self, function: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_with_module_globals(function), *args, **kwargs)


def _with_module_globals(function: Any) -> Any:
    if not isinstance(function, types.FunctionType):
        return function
    extra = {k: v for k, v in _lambda_globals().items() if k not in function.__globals__}
    if not extra:
        return function
    return types.FunctionType(
        function.__code__,
        {**function.__globals__, **extra},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )


def _code_names(code: Any) -> set[str]:
    # The names a marshalled Keras 2 lambda reads (nested code objects included). Only called
    # with safe_mode=False, when Keras itself will unmarshal and run the same bytes.
    try:
        try:
            raw = codecs.decode(str(code).encode("ascii"), "base64")
        except (UnicodeEncodeError, binascii.Error):
            raw = str(code).encode("raw_unicode_escape")
        stack = [marshal.loads(raw)]
    except Exception:  # bytecode of another Python version, or not code at all
        return set()
    names: set[str] = set()
    while stack:
        obj = stack.pop()
        if isinstance(obj, types.CodeType):
            names.update(obj.co_names)
            stack.extend(c for c in obj.co_consts if isinstance(c, types.CodeType))
    return names


def _lambda_code(function: Any) -> tuple[Any, Any, Any] | None:
    if isinstance(function, list) and len(function) == 3:
        return function[0], function[1], function[2]
    if isinstance(function, dict) and function.get("class_name") == "__lambda__":
        inner = function.get("config") or {}
        return inner.get("code"), inner.get("defaults"), inner.get("closure")
    return None


def _mark_global_lambdas(node: Any) -> None:
    """Turns Keras 2 lambdas that use `tf`/`np` into `Keras2Lambda` layers (see its doc)."""
    if isinstance(node, list):
        for item in node:
            _mark_global_lambdas(item)
        return
    if not isinstance(node, dict):
        return
    config = node.get("config")
    if node.get("class_name") == "Lambda" and isinstance(config, dict):
        code = _lambda_code(config.get("function"))
        if code is not None and set(_LAMBDA_MODULES) & _code_names(code[0]):
            for arg in _LAMBDA_DEP_ARGS:
                config.pop(arg, None)
            config["function"] = {
                "class_name": "__lambda__",
                "config": {"code": code[0], "defaults": code[1], "closure": code[2]},
            }
            node["class_name"] = "transferkit>Keras2Lambda"
        return
    for value in node.values():
        _mark_global_lambdas(value)


def _lambda_globals() -> dict[str, Any]:
    # What Keras 2's deserialized lambdas found among their globals.
    import tensorflow as tf

    return {"tf": tf, "np": np}


def _application_layers() -> dict[str, Any]:
    """Custom layers of `keras.applications` models that Keras 2 saved under their own names.

    Keras 3 defines the same layers (same arguments) without registering them for loading.
    Private modules, checked against Keras 3.15.1.
    """
    from keras.src.applications import convnext, inception_resnet_v2

    scale = inception_resnet_v2.CustomScaleLayer
    return {
        "LayerScale": convnext.LayerScale,
        "StochasticDepth": convnext.StochasticDepth,
        "CustomScaleLayer": scale,
        "Custom>CustomScaleLayer": scale,
    }


def _register_application_layers() -> None:
    # Keras 3 saves these under their bare class names in `.h5` files and cannot read them back
    # (its own ConvNeXt and InceptionResNetV2 included); a `.keras` archive records their module
    # and reloads anywhere. Registering the names (without replacing a user's own entry) lets a
    # fine-tuned Keras 2 ConvNeXt saved as `.h5` reload wherever transferkit is imported.
    registry = keras.saving.get_custom_objects()
    for name, cls in _application_layers().items():
        registry.setdefault(name, cls)


_register_application_layers()


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
        if not safe_mode:
            _mark_global_lambdas(config)
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
        saved = json.loads(archive.read("config.json"))
        check_op_layers(saved, safe_mode=safe_mode)
        config = keras2_config(_legacy_form(saved))
        if not safe_mode:
            _mark_global_lambdas(config)
        weights = archive.read("model.weights.h5")
    model = _build(config, custom_objects=custom_objects, safe_mode=safe_mode)
    with tempfile.TemporaryDirectory(prefix="transferkit-keras2-") as tmp:
        weights_path = Path(tmp) / "model.weights.h5"
        weights_path.write_bytes(weights)
        model.load_weights(weights_path)
    return model
