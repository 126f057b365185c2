"""Re-estimating BatchNormalization statistics on new data.

A pre-trained network carries the moving mean and variance of its pre-training data. On a new
domain (other images, other sensors) the inputs of each BatchNormalization layer are distributed
differently, and frozen BN layers then normalise with the wrong statistics. `adapt_batchnorm`
replaces them with the exact statistics of the new data, touching no other weight.

The statistics are the *population* moments over every sample and every reduced position of `x`,
pooled across batches as if `x` were one batch (Chan et al.'s parallel algorithm, in float64).
The variance is the biased one (divided by N, not N - 1): Keras 3.15's BatchNormalization gets its
batch variance from `ops.moments` (`tf.nn.moments` on TensorFlow), which divides by N, and feeds
that into `moving_variance` without a Bessel correction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from transferkit._utils.batches import iter_batches
from transferkit._utils.checks import check_int, check_optional_int
from transferkit.data.checks import is_array_like
from transferkit.errors import ConfigError, DataError
from transferkit.model.graph import Recorded, fresh_inputs, replay
from transferkit.model.layers import all_layers, is_batchnorm

__all__ = ["Moments", "adapt_batchnorm", "batchnorm_inputs", "iterate_inputs"]


@dataclass
class Moments:
    """Running count, mean and sum of squared deviations (M2), per channel, in float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, axes: tuple[int, ...]) -> Moments:
        """The moments of one batch, reduced over `axes`."""
        v = values.astype(np.float64, copy=False)
        count = int(np.prod([v.shape[a] for a in axes]))
        mean = v.mean(axis=axes)
        dev = v - np.expand_dims(mean, axes)
        return cls(count, mean, np.square(dev).sum(axis=axes))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise combination: exact, and stable where sums of squares are not."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def variance(self) -> np.ndarray:
        """The biased (population) variance, as Keras' BatchNormalization computes it."""
        return self.m2 / self.count


def _input_of(output: Any, layer: keras.layers.Layer) -> Any:
    # Keras 3.15: a KerasTensor's `_keras_history` names the call (node) that produced it; the
    # public `layer.input` only ever returns the first call's input, not the replayed one.
    history = output._keras_history
    if history.operation is not layer:
        raise ConfigError(f"could not trace the input of BatchNormalization layer {layer.name!r}.")
    node = layer._inbound_nodes[history.node_index]
    args = node.input_tensors
    if len(args) != 1:
        raise ConfigError(
            f"BatchNormalization layer {layer.name!r} is called with {len(args)} tensors; "
            "adapt_batchnorm supports single-input calls only."
        )
    return args[0]


def batchnorm_inputs(model: keras.Model) -> tuple[list[Any], list[tuple[keras.layers.Layer, Any]]]:
    """Fresh model inputs and, in graph order, each BatchNormalization layer with the tensor it
    receives from them (nested models are replayed layer by layer).

    Raises:
        ConfigError: a BatchNormalization layer is called more than once (shared), or on
            several tensors, or uses renormalisation.
    """
    inputs = fresh_inputs(model)
    record: Recorded = {}
    replay(model, inputs, inline=True, record=record)
    # `record` is filled in call order, which is graph (topological) order.
    found: list[tuple[keras.layers.Layer, Any]] = []
    layers_by_id = {id(layer): layer for layer in all_layers(model)}
    for key, outputs in record.items():
        layer = layers_by_id.get(key)
        if layer is None or not is_batchnorm(layer):
            continue
        if len(outputs) != 1:
            raise ConfigError(
                f"BatchNormalization layer {layer.name!r} is called {len(outputs)} times (a "
                "shared layer): its statistics cannot be re-estimated for one input."
            )
        if getattr(layer, "renorm", False):
            raise ConfigError(
                f"BatchNormalization layer {layer.name!r} uses renorm=True, whose extra moving "
                "statistics adapt_batchnorm does not re-estimate."
            )
        found.append((layer, _input_of(outputs[0], layer)))
    return inputs, found


def _reduction_axes(layer: keras.layers.BatchNormalization, rank: int) -> tuple[int, ...]:
    axis = layer.axis
    axes = [axis] if isinstance(axis, int) else list(axis)
    keep = {a % rank for a in axes}
    return tuple(a for a in range(rank) if a not in keep)


def iterate_inputs(x: Any, batch_size: int, steps: int | None) -> Iterator[Any]:
    """Yields the input part of each batch of `x` (arrays or a batched `tf.data.Dataset`).

    Raises:
        DataError: `x` is empty or of an unsupported type.
    """
    if isinstance(x, tf.data.Dataset):
        any_batch = False
        for element in iter_batches(x, batch_size, steps=steps):
            any_batch = True
            # As NumPy: a JAX or PyTorch model does not take TensorFlow tensors.
            inputs = element[0] if isinstance(element, tuple) else element
            yield keras.tree.map_structure(np.asarray, inputs)
        if not any_batch:
            raise DataError("adapt_batchnorm: the dataset is empty.")
        return
    if not is_array_like(x) or isinstance(x, (dict, list, tuple)):
        raise DataError(
            "adapt_batchnorm needs a NumPy array of inputs or a batched tf.data.Dataset, got "
            f"{type(x).__name__}."
        )
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise DataError("adapt_batchnorm: the data is empty; pass at least one sample.")
    yield from iter_batches(arr, batch_size, steps=steps)


def adapt_batchnorm(
    model: keras.Model, x: Any, *, batch_size: int = 32, steps: int | None = None
) -> list[str]:
    """Sets every BatchNormalization layer's moving statistics to the exact moments of `x`.

    Layers are processed in graph order; each one sees its inputs computed (in inference mode)
    with the statistics already re-estimated for the layers before it. Nothing but
    `moving_mean` and `moving_variance` changes.

    Args:
        model: a built Functional model.
        x: inputs as a NumPy array, or a batched `tf.data.Dataset` of inputs or `(x, y)` pairs.
        batch_size: batch size for arrays (ignored for datasets).
        steps: use only the first `steps` batches; None uses all of `x`.

    Returns:
        The names of the layers re-estimated, in order.

    Raises:
        ConfigError: invalid arguments, no BatchNormalization layer, or a shared one.
        DataError: empty or unsupported data.
    """
    check_int(batch_size, "batch_size", minimum=1)
    check_optional_int(steps, "steps", minimum=1)
    if len(model.inputs) != 1:
        raise ConfigError(
            f"adapt_batchnorm supports single-input models; {model.name!r} has "
            f"{len(model.inputs)} inputs."
        )
    inputs, found = batchnorm_inputs(model)
    if not found:
        raise ConfigError(
            f"model {model.name!r} has no BatchNormalization layer: nothing to adapt."
        )
    # Validate the data once, before any statistic changes.
    first = next(iter(iterate_inputs(x, batch_size, steps)))
    expected = tuple(inputs[0].shape[1:])
    got = tuple(np.shape(first)[1:])
    if len(got) != len(expected) or any(
        e is not None and e != g for e, g in zip(expected, got, strict=True)
    ):
        raise DataError(
            f"adapt_batchnorm: inputs of shape {got} do not fit the model input {expected}."
        )
    done: list[str] = []
    for layer, tensor in found:
        probe = keras.Model(inputs[0], tensor)
        axes = _reduction_axes(layer, len(tensor.shape))
        total: Moments | None = None
        for batch in iterate_inputs(x, batch_size, steps):
            # predict_on_batch runs in inference mode: earlier BN layers use their new statistics.
            values = np.asarray(probe.predict_on_batch(batch))
            part = Moments.of(values, axes)
            total = part if total is None else total.merge(part)
        assert total is not None
        layer.moving_mean.assign(total.mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(total.variance.astype(layer.moving_variance.dtype))
        done.append(layer.name)
    return done
