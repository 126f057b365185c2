"""Which TensorFlow functions a Keras 2 op layer read from a file may make transferkit call.

Keras 2 saved TensorFlow operations called on Keras tensors as `TFOpLambda` layers that name the
function (`"math.truediv"`). A file is data, so the name is checked before anything resolves
it: only exported TensorFlow names, and in safe mode only pure tensor operations
(`check_op_name`), on the config as read, before any layer is built (`check_op_layers`).
Lambdas are Keras' own business (refused in safe mode).
"""

from __future__ import annotations

from typing import Any

from transferkit._utils.configs import nodes
from transferkit.errors import ModelLoadError

__all__ = [
    "OP_CLASSES",
    "check_op_layers",
    "check_op_name",
    "effective_safe_mode",
    "resolve_function",
]

#: The Keras 2 class names of op layers.
OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")

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


def resolve_function(name: str) -> Any:
    """The TensorFlow function `tf.<name>`, once `check_op_name` allows it (without safe mode:
    the layer's `from_config` has checked safe mode already).

    Raises:
        ModelLoadError: a private name.
        ValueError: this TensorFlow does not export the name, or it is not callable (Keras
            turns it into its own deserialization error).
    """
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
    for node in nodes(config):
        if not isinstance(node, dict):
            continue
        class_name = str(node.get("class_name", "")).rpartition(">")[2]
        inner = node.get("config")
        if class_name in OP_CLASSES and isinstance(inner, dict):
            layer = str(inner.get("name", node.get("name", "?")))
            check_op_name(str(inner.get("function", "")), layer=layer, safe_mode=safe_mode)


def effective_safe_mode() -> bool:
    """Whether the current deserialization is in safe mode; as Keras' own Lambda, outside any
    loading scope (a direct `from_config`) it is (fail closed)."""
    from keras.src.saving import serialization_lib

    return serialization_lib.in_safe_mode() is not False
