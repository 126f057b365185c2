"""`keras.ops` equivalents of the TensorFlow functions Keras 2 op layers call.

A Keras 2 `TFOpLambda` names a TensorFlow function (`"math.truediv"`) and the keyword arguments
it was called with, by TensorFlow's parameter names (`input_tensor`, `axis`, `keepdims`). On the
TensorFlow backend the stand-in calls the function itself, exactly as Keras 2 did. On any other
backend a TensorFlow function cannot run inside a compiled step (a JAX tracer is no TensorFlow
tensor), so the stand-in calls the equivalent below instead: the same computation written with
`keras.ops`, taking TensorFlow's parameter names. A function missing here has no portable
equivalent, and the model needs the TensorFlow backend (`check_portable`, before anything is
built).

`tests/test_keras2_ops.py` checks every entry against the TensorFlow function it replaces:
same parameter names, same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from transferkit import backend
from transferkit._utils.configs import nodes
from transferkit.errors import ModelLoadError

__all__ = [
    "EQUIVALENTS",
    "PortableTF",
    "check_portable",
    "keras_equivalent",
    "needs_tensorflow",
    "random_size_message",
]

Op = Callable[..., Any]


def _binary(op: Op) -> Op:
    def call(x: Any, y: Any) -> Any:
        return op(x, y)

    return call


def _unary(op: Op) -> Op:
    def call(x: Any) -> Any:
        return op(x)

    return call


def _features(op: Op) -> Op:
    # `tf.nn` activations name their input `features`.
    def call(features: Any) -> Any:
        return op(features)

    return call


def _reduce(op: Op) -> Op:
    def call(input_tensor: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return op(input_tensor, axis=axis, keepdims=keepdims)

    return call


def _softmax(logits: Any, axis: int | None = None) -> Any:
    return ops.softmax(logits, axis=-1 if axis is None else axis)


def _log_softmax(logits: Any, axis: int | None = None) -> Any:
    return ops.log_softmax(logits, axis=-1 if axis is None else axis)


def _gelu(features: Any, approximate: bool = False) -> Any:
    return ops.gelu(features, approximate=approximate)


def _silu(features: Any, beta: float = 1.0) -> Any:
    # ops.multiply, not `*`: a NumPy input times a torch tensor raises TypeError.
    return ops.multiply(features, ops.sigmoid(ops.multiply(beta, features)))


def _leaky_relu(features: Any, alpha: float = 0.2) -> Any:
    return ops.leaky_relu(features, negative_slope=alpha)


def _l2_normalize(x: Any, axis: Any = None, epsilon: float = 1e-12) -> Any:
    squares = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return ops.multiply(x, ops.rsqrt(ops.maximum(squares, epsilon)))


def _reshape(tensor: Any, shape: Any) -> Any:
    return ops.reshape(tensor, tuple(shape))


def _concat(values: Any, axis: int) -> Any:
    return ops.concatenate(list(values), axis=axis)


def _stack(values: Any, axis: int = 0) -> Any:
    return ops.stack(list(values), axis=axis)


def _expand_dims(input: Any, axis: int) -> Any:
    return ops.expand_dims(input, axis)


def _squeeze(input: Any, axis: Any = None) -> Any:
    return ops.squeeze(input, axis=axis)


def _transpose(a: Any, perm: Any = None, conjugate: bool = False) -> Any:
    out = ops.transpose(a, axes=None if perm is None else tuple(perm))
    return ops.conj(out) if conjugate else out


def _cast(x: Any, dtype: Any) -> Any:
    return ops.cast(x, dtype)


def _identity(input: Any) -> Any:
    return input


def _clip_by_value(t: Any, clip_value_min: Any, clip_value_max: Any) -> Any:
    return ops.clip(t, clip_value_min, clip_value_max)


def _matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
    if transpose_a:
        a = ops.swapaxes(a, -1, -2)
    if transpose_b:
        b = ops.swapaxes(b, -1, -2)
    return ops.matmul(a, b)


def _resize(
    images: Any,
    size: Any,
    method: str = "bilinear",
    preserve_aspect_ratio: bool = False,
    antialias: bool = False,
) -> Any:
    if preserve_aspect_ratio:
        raise ValueError(
            "tf.image.resize(preserve_aspect_ratio=True) has no keras.ops equivalent: this "
            "layer needs the TensorFlow backend."
        )
    return ops.image.resize(images, tuple(size), interpolation=method, antialias=antialias)


EQUIVALENTS: dict[str, Op] = {
    # Python operators on Keras tensors, as Keras 2 recorded them.
    "__operators__.add": _binary(ops.add),
    "math.add": _binary(ops.add),
    "math.subtract": _binary(ops.subtract),
    "math.multiply": _binary(ops.multiply),
    "math.truediv": _binary(ops.divide),
    "math.divide": _binary(ops.divide),
    "math.floordiv": _binary(ops.floor_divide),
    "math.pow": _binary(ops.power),
    "math.maximum": _binary(ops.maximum),
    "math.minimum": _binary(ops.minimum),
    "math.squared_difference": _binary(lambda x, y: ops.square(ops.subtract(x, y))),
    "math.negative": _unary(ops.negative),
    "math.abs": _unary(ops.abs),
    "math.exp": _unary(ops.exp),
    "math.log": _unary(ops.log),
    "math.sqrt": _unary(ops.sqrt),
    "math.rsqrt": _unary(ops.rsqrt),
    "math.square": _unary(ops.square),
    "math.reciprocal": _unary(lambda x: ops.divide(1.0, x)),
    "math.sign": _unary(ops.sign),
    "math.sin": _unary(ops.sin),
    "math.cos": _unary(ops.cos),
    "math.tanh": _unary(ops.tanh),
    "math.sigmoid": _unary(ops.sigmoid),
    "math.reduce_mean": _reduce(ops.mean),
    "math.reduce_sum": _reduce(ops.sum),
    "math.reduce_max": _reduce(ops.max),
    "math.reduce_min": _reduce(ops.min),
    "math.reduce_prod": _reduce(ops.prod),
    "math.l2_normalize": _l2_normalize,
    "nn.l2_normalize": _l2_normalize,
    "nn.relu": _features(ops.relu),
    "nn.relu6": _features(ops.relu6),
    "nn.elu": _features(ops.elu),
    "nn.selu": _features(ops.selu),
    "nn.softplus": _features(ops.softplus),
    "nn.softsign": _features(ops.softsign),
    "nn.gelu": _gelu,
    "nn.silu": _silu,
    "nn.swish": _silu,
    "nn.leaky_relu": _leaky_relu,
    "nn.softmax": _softmax,
    "nn.log_softmax": _log_softmax,
    "reshape": _reshape,
    "concat": _concat,
    "stack": _stack,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "cast": _cast,
    "identity": _identity,
    "clip_by_value": _clip_by_value,
    "linalg.matmul": _matmul,
    "image.resize": _resize,
}
"""TensorFlow function names (as `TFOpLambda` saves them) -> `keras.ops` equivalents taking
TensorFlow's parameter names. `__operators__.getitem` (`SlicingOpLambda`) is Python indexing,
which every backend's tensors support."""


def needs_tensorflow(function: str) -> bool:
    """Whether an op layer calling `tf.<function>` can run only on the TensorFlow backend."""
    return function != "__operators__.getitem" and function not in EQUIVALENTS


def keras_equivalent(function: str, *, layer: str = "?") -> Op:
    """The `keras.ops` equivalent of `tf.<function>`.

    Raises:
        ModelLoadError: there is none; the message says the model needs TensorFlow.
    """
    op = EQUIVALENTS.get(function)
    if op is None:
        raise ModelLoadError(_needs_tf_message(function, layer))
    return op


def _needs_tf_message(function: str, layer: str, kind: str = "op layer") -> str:
    return (
        f"{kind} {layer!r} calls tf.{function}, which has no keras.ops equivalent, so this "
        f"Keras 2 model runs only on the TensorFlow backend (Keras runs on "
        f"{keras.backend.backend()!r}): set KERAS_BACKEND=tensorflow before keras is imported "
        "(or `transferkit --backend tensorflow`). Portable ops: "
        f"{', '.join(sorted(EQUIVALENTS))}."
    )


# Keras 2 layers whose output size is random in training (removed in Keras 3 for that reason).
_RANDOM_SIZE = frozenset({"RandomHeight", "RandomWidth"})


def random_size_message(class_name: str, layer: str) -> str:
    """Why a Keras 2 `RandomHeight` / `RandomWidth` needs the TensorFlow backend."""
    return (
        f"layer {layer!r} is Keras 2's {class_name}, which resizes images by a random factor in "
        "training: a compiled step on the "
        f"{keras.backend.backend()!r} backend needs one output shape, so this Keras 2 model "
        "trains only on the TensorFlow backend: set KERAS_BACKEND=tensorflow before keras is "
        "imported (or `transferkit --backend tensorflow`)."
    )


def check_portable(config: Any) -> None:
    """On a backend other than TensorFlow, refuses a model config whose op layers call a
    TensorFlow function without a `keras.ops` equivalent, or which holds Keras 2's
    `RandomHeight` / `RandomWidth`; run before anything is built.

    Raises:
        ModelLoadError: the first such layer, named with its function or class.
    """
    if backend.current().runs_tensorflow_ops():
        return
    for node in nodes(config):
        if not isinstance(node, dict):
            continue
        class_name = str(node.get("class_name", "")).rpartition(">")[2]
        inner = node.get("config")
        if class_name in ("TFOpLambda", "SlicingOpLambda") and isinstance(inner, dict):
            function = str(inner.get("function", ""))
            if needs_tensorflow(function):
                layer = str(inner.get("name", node.get("name", "?")))
                raise ModelLoadError(_needs_tf_message(function, layer))
        if class_name in _RANDOM_SIZE and isinstance(inner, dict):
            layer = str(inner.get("name", node.get("name", "?")))
            raise ModelLoadError(random_size_message(class_name, layer))


# Sub-namespaces of `tf` with portable functions, and the dtype names `tf.<dtype>` stands for.
_NAMESPACES = frozenset({"math", "nn", "linalg", "image"})
_DTYPES = frozenset(
    {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "bool",
    }
)


class PortableTF:
    """What a Keras 2 `Lambda` finds as its `tf` global on a backend other than TensorFlow.

    A lambda such as `lambda t: tf.math.l2_normalize(t, axis=-1)` calls TensorFlow on whatever
    tensors the backend passes it; a JAX tracer is none. Attribute lookups here resolve to the
    `keras.ops` equivalents of `EQUIVALENTS` (`tf.math.l2_normalize`, and the top-level aliases
    TensorFlow exports: `tf.reduce_mean` is `tf.math.reduce_mean`), dtype names to their
    strings, `tf.newaxis` to `None`, `tf.shape` to `keras.ops.shape`. Any other name raises
    `ModelLoadError` saying the model needs TensorFlow, and is kept in `errors` because Keras'
    `Lambda` hides exceptions raised while it infers its output shape.

    Args:
        layer: the lambda layer's name, for messages.
    """

    def __init__(self, layer: str = "?", _prefix: str = "", _errors: list[Exception] | None = None):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_prefix", _prefix)
        object.__setattr__(self, "errors", [] if _errors is None else _errors)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        path = f"{self._prefix}{name}"
        if not self._prefix:
            if name in _DTYPES:
                return name
            if name == "newaxis":
                return None
            if name == "shape":
                return ops.shape
            if name in _NAMESPACES:
                return PortableTF(self._layer, f"{name}.", self.errors)
        for candidate in (path, f"math.{path}"):
            op = EQUIVALENTS.get(candidate)
            if op is not None:
                return op
        error = ModelLoadError(_needs_tf_message(path, self._layer, kind="Lambda layer"))
        self.errors.append(error)
        raise error
