"""The Keras 3 stand-ins for what Keras 2 files hold and Keras 3 no longer has.

- `TFOpLambda` and `SlicingOpLambda`: TensorFlow operations called on Keras tensors
  (`tf.math.truediv` in `preprocess_input`, `x[:, 1:]`), where no built-in layer computes the
  op (`config` rewrites the others into built-in layers).
- `RandomHeight`, `RandomWidth` (removed in Keras 3) and `Keras2RandomCrop` (Keras 3's
  `RandomCrop` does not crop in inference).
- `keras2_hard_sigmoid`: Keras 2's `hard_sigmoid` (slope 0.2), which Keras 3 would silently
  replace with its own (slope 1/6).
- `Keras2Lambda`: a `Lambda` whose function finds Keras 2's `tf` and `np` globals.
- The `keras.applications` layers Keras 3 defines without registering (`LayerScale`,
  `CustomScaleLayer`): registered here under the names Keras 2 saved them with.

Every class is registered under `transferkit>ClassName`: saved files name them so, whatever
module they live in. Importing this module registers them.
"""

from __future__ import annotations

import json
import types
from typing import Any

import keras
import numpy as np

from transferkit import backend
from transferkit._utils.configs import map_config
from transferkit.errors import ModelLoadError
from transferkit.model.keras2.ops import PortableTF, keras_equivalent, random_size_message
from transferkit.model.keras2.safety import check_op_name, effective_safe_mode, resolve_function

__all__ = [
    "KERAS2_HARD_SIGMOID",
    "Keras2Lambda",
    "Keras2RandomCrop",
    "RandomHeight",
    "RandomWidth",
    "STAND_INS",
    "SlicingOpLambda",
    "TENSOR_KWARGS",
    "TFOpLambda",
    "application_layers",
    "builtin_layers",
    "keras2_hard_sigmoid",
]

#: The call keyword that names which keyword arguments arrive as extra input tensors.
TENSOR_KWARGS = "transferkit_tensor_kwargs"
#: The registered name of Keras 2's `hard_sigmoid`.
KERAS2_HARD_SIGMOID = "keras2_hard_sigmoid"


def _tensorflow() -> Any:
    # Imported when a TensorFlow-only stand-in runs, not with this module, which every model
    # load imports on every backend.
    import tensorflow as tf

    return tf


# ------------------------------------------------------------------- TensorFlow op layers


def _decode_node(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("class_name") == "__ellipsis__":
            return Ellipsis
        if set(node) == {"start", "stop", "step"}:
            return slice(node["start"], node["stop"], node["step"])
    return node


def _decode(value: Any) -> Any:
    # Keras 2 wrote slices as {"start", "stop", "step"} dicts and `...` as a tagged dict.
    return map_config(value, _decode_node)


@keras.saving.register_keras_serializable(package="transferkit")
class TFOpLambda(keras.layers.Layer):  # type: ignore[misc]
    """Keras 3 stand-in for Keras 2's `TFOpLambda`: calls `tf.<function>` on its inputs.

    On the TensorFlow backend it calls the TensorFlow function, as Keras 2 did; on any other
    backend its `keras.ops` equivalent (`model.keras2.ops`).

    Args:
        function: the dotted name under `tf` (`"math.truediv"`, `"__operators__.add"`).
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Raises:
        ModelLoadError: not on TensorFlow, and the function has no `keras.ops` equivalent.
    """

    def __init__(self, function: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.function = str(function)
        if _on_tensorflow() or self.function == "__operators__.getitem":
            self._fn = resolve_function(self.function)
        else:
            check_op_name(self.function, layer=self.name, safe_mode=False)
            self._fn = keras_equivalent(self.function, layer=self.name)

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
            safe_mode=effective_safe_mode(),
        )
        layer: TFOpLambda = super().from_config(config)
        return layer

    def compute_output_spec(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if _on_tensorflow():
            return super().compute_output_spec(inputs, *args, **kwargs)
        # Keras' JAX shape inference traces every argument, so the shape of `reshape` or the
        # `perm` of `transpose` would arrive as tracers; only the tensors may be traced.
        from keras.src.backend import compute_output_spec

        return compute_output_spec(lambda x: self.call(x, *args, **kwargs), inputs)

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("name", None)
        tensor_kwargs = kwargs.pop(TENSOR_KWARGS, None)
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

    Keras 2 laid images out as `channels_last` only. Training runs on the TensorFlow backend
    only: the output size is random, which a compiled JAX or PyTorch step cannot have (loading
    such a model there raises `ModelLoadError`, see `ops.check_portable`).
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
        if not _on_tensorflow():
            # A compiled JAX or PyTorch step has one output shape; this layer's is random.
            raise ModelLoadError(random_size_message(type(self).__name__, self.name))
        tf = _tensorflow()

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
    tf = _tensorflow()

    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    crop_h = tf.minimum(h, tf.cast(tf.cast(w * height, "float32") / width, "int32"))
    crop_w = tf.minimum(w, tf.cast(tf.cast(h * width, "float32") / height, "int32"))
    start = tf.stack([0, (h - crop_h) // 2, (w - crop_w) // 2, 0])
    window = tf.slice(images, start, tf.stack([-1, crop_h, crop_w, -1]))
    return tf.image.resize(window, (height, width))


def _portable_smart_resize(images: Any, height: int, width: int) -> Any:
    # `_smart_resize` for known shapes, in `keras.ops`; the window sizes computed as TensorFlow
    # does above (a float32 quotient, truncated).
    rows, cols = int(images.shape[1]), int(images.shape[2])
    crop_h = min(rows, int(np.float32(cols * height) / np.float32(width)))
    crop_w = min(cols, int(np.float32(rows * width) / np.float32(height)))
    top, left = (rows - crop_h) // 2, (cols - crop_w) // 2
    window = images[:, top : top + crop_h, left : left + crop_w, :]
    return keras.ops.image.resize(window, (height, width), interpolation="bilinear")


@keras.saving.register_keras_serializable(package="transferkit")
class Keras2RandomCrop(keras.layers.Layer):  # type: ignore[misc]
    """Keras 2's `RandomCrop`, which Keras 3's does not reproduce.

    In training, a random `(height, width)` window (images smaller than that are resized as in
    inference); in inference, the largest central window of the target aspect ratio, resized
    to `(height, width)`. Keras 3.15.1's `RandomCrop` returns the images unchanged in inference
    (larger than its own `compute_output_shape` says: a Keras 2 model predicts differently, or
    fails at a `Flatten`), and fails in training on images of unknown size (after Keras 2's
    `RandomHeight`). `channels_last`, like Keras 2; on JAX and PyTorch the same crops run in
    `keras.ops`.

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
        if not _on_tensorflow():
            return self._portable_call(inputs, training)
        tf = _tensorflow()

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

    def _portable_call(self, inputs: Any, training: bool) -> Any:
        # The same crops in `keras.ops`: on JAX and PyTorch every shape is known when a step
        # is traced, so the window sizes are Python numbers and only the offsets are drawn.
        ops = keras.ops
        images = ops.convert_to_tensor(inputs)
        unbatched = len(images.shape) == 3
        if unbatched:
            images = images[None]
        batch, rows, cols, channels = (int(d) for d in ops.shape(images))
        room = (rows - self.height, cols - self.width)
        if training and min(room) >= 0:
            draw = keras.random.uniform([2], 0.0, 1.0, seed=self.seed_generator)
            start = ops.minimum(
                ops.cast(draw * ops.convert_to_tensor([room[0] + 1.0, room[1] + 1.0]), "int32"),
                ops.convert_to_tensor(room, "int32"),
            )
            zero = ops.zeros((), "int32")
            outputs = ops.slice(
                images,
                ops.stack([zero, start[0], start[1], zero]),
                (batch, self.height, self.width, channels),
            )
        else:
            outputs = _portable_smart_resize(images, self.height, self.width)
        outputs = ops.cast(outputs, self.compute_dtype)
        return outputs[0] if unbatched else outputs

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-3], self.height, self.width, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(height=self.height, width=self.width, seed=self.seed)
        return config


# Keras 2 layers that Keras 3 no longer has, by their Keras 2 class names.
#: Keras 2 layers that Keras 3 no longer has, by their Keras 2 class names.
STAND_INS: dict[str, type] = {"RandomHeight": RandomHeight, "RandomWidth": RandomWidth}


# ---------------------------------------------------------------------- functions and lambdas


# Keras 2's hard_sigmoid is clip(0.2 * x + 0.5, 0, 1); Keras 3's is clip(x / 6 + 0.5, 0, 1).
# The name alone would load silently with the other function (ConvLSTM2D's default recurrent
# activation in Keras 2), so `config` rewrites it to Keras 2's function.
@keras.saving.register_keras_serializable(  # type: ignore[untyped-decorator]
    package="transferkit", name=KERAS2_HARD_SIGMOID
)
def keras2_hard_sigmoid(x: Any) -> Any:
    """Keras 2's `hard_sigmoid`: `clip(0.2 * x + 0.5, 0, 1)` (Keras 3's has slope 1/6)."""
    return keras.ops.clip(0.2 * x + 0.5, 0.0, 1.0)


@keras.saving.register_keras_serializable(package="transferkit")
class Keras2Lambda(keras.layers.Lambda):  # type: ignore[misc]
    """A Keras 2 `Lambda` whose function uses `tf` or `np` as globals.

    Keras 2 ran a deserialized lambda with its own module's globals, which held `tf` and `np`:
    `Lambda(lambda x: tf.math.l2_normalize(x, axis=1))` (every face-embedding model) loaded.
    Keras 3 gives it the globals of `keras.src.utils.python_utils`, where `tf` is undefined, and
    the load fails ("could not automatically infer the shape of the Lambda's output"). This
    layer rebuilds the function with those two names added; it is used (with `safe_mode=False`,
    as for any lambda) only for functions that name them. On JAX or PyTorch `tf` is a
    `PortableTF`: the function's TensorFlow calls run as their `keras.ops` equivalents, and one
    without an equivalent raises `ModelLoadError` saying the model needs TensorFlow.
    """

    def __init__(self, function: Any, *args: Any, **kwargs: Any) -> None:
        # On JAX or PyTorch `tf` stands for `keras.ops` equivalents (`model.keras2.ops`).
        tf = _tensorflow() if _on_tensorflow() else PortableTF(str(kwargs.get("name")))
        super().__init__(_with_module_globals(function, tf), *args, **kwargs)
        self._tf = tf

    def compute_output_shape(self, input_shape: Any) -> Any:
        try:
            return super().compute_output_shape(input_shape)
        except NotImplementedError as error:
            # Keras reports any failure as "could not infer the shape"; a TensorFlow function
            # without a portable equivalent is the real cause, and says what to do.
            if isinstance(self._tf, PortableTF) and self._tf.errors:
                raise self._tf.errors[-1] from error
            raise


def _on_tensorflow() -> bool:
    return backend.current().runs_tensorflow_ops()


def _with_module_globals(function: Any, tf: Any) -> Any:
    if not isinstance(function, types.FunctionType):
        return function
    extra = {k: v for k, v in {"tf": tf, "np": np}.items() if k not in function.__globals__}
    if not extra:
        return function
    return types.FunctionType(
        function.__code__,
        {**function.__globals__, **extra},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )


# ---------------------------------------------------------------------- class lookup


def builtin_layers() -> dict[str, Any]:
    """Keras' built-in layer classes by class name.

    A wrapped layer (Bidirectional's LSTM) is deserialized by Keras 3's new-style code, which
    needs a module for built-in classes; a Keras 2 `.keras` config loses its modules here
    (they name Keras 2 internals), so built-in layers are found by class name.
    """
    return {
        name: obj
        for name, obj in vars(keras.layers).items()
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
    }


def application_layers() -> dict[str, Any]:
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


def _registerapplication_layers() -> None:
    # Keras 3 saves these under their bare class names in `.h5` files and cannot read them back
    # (its own ConvNeXt and InceptionResNetV2 included); a `.keras` archive records their module
    # and reloads anywhere. Registering the names (without replacing a user's own entry) lets a
    # fine-tuned Keras 2 ConvNeXt saved as `.h5` reload wherever transferkit is imported.
    registry = keras.saving.get_custom_objects()
    for name, cls in application_layers().items():
        registry.setdefault(name, cls)


_registerapplication_layers()
