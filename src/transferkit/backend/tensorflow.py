"""The TensorFlow backend: `tf.function` and `tf.GradientTape`, with `tf.distribute`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import keras
import tensorflow as tf

from transferkit.backend import ValueFn

__all__ = [
    "feature_tensors",
    "forward_function",
    "gradient_step",
    "local_variables",
    "loss_replicas",
    "runs_several_steps",
    "runs_tensorflow_ops",
    "shared_training_state",
]


def forward_function(model: keras.Model, training: bool = True) -> Callable[[Any], list[Any]]:
    """See `BackendModule.forward_function`."""

    # training=True: exactly what the layers compute inside `fit` (a frozen BatchNormalization
    # uses its moving statistics either way).
    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def run(batch: Any) -> Any:
        return model(batch, training=training)

    def call(batch: Any) -> list[Any]:
        return [out.numpy() for out in keras.tree.flatten(run(batch))]

    return call


def shared_training_state(shown: keras.Model, trained: keras.Model) -> AbstractContextManager[None]:
    """See `BackendModule.shared_training_state`: the variables are the state; nothing to do."""
    return nullcontext()


def local_variables(variables: list[keras.Variable]) -> list[str]:
    """See `BackendModule.local_variables`: `keras.distribution` does not run here."""
    return []


def runs_several_steps() -> bool:
    """See `BackendModule.runs_several_steps`: Keras runs several steps per call here."""
    return True


def runs_tensorflow_ops() -> bool:
    """See `BackendModule.runs_tensorflow_ops`."""
    return True


def feature_tensors(x: Any) -> Any:
    """See `BackendModule.feature_tensors`: Keras' array adapter converts NumPy inputs to
    tensors again in every epoch (Keras 3.15.1: a copy of all the features per epoch); converted
    once, the epochs slice the same tensor. Peak memory is unchanged: Keras held that copy."""
    return keras.tree.map_structure(tf.convert_to_tensor, x)


def loss_replicas() -> int:
    """See `BackendModule.loss_replicas`."""
    if tf.distribute.has_strategy():
        return int(tf.distribute.get_strategy().num_replicas_in_sync)
    return 1


def gradient_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, value_fn: ValueFn
) -> Callable[[Any, Any, Any], float]:
    """See `BackendModule.gradient_step`.

    Under a tf.distribute strategy (FineTuner enters its scope) each replica takes its slice of
    the batch; the optimizer sums the replicas' gradients, so each loss is divided by their
    number to step on the batch mean, as Keras' own train step does.
    """
    trainable = list(model.trainable_variables)
    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    replicas = loss_replicas()

    def train_step(xb: Any, yb: Any, sw: Any) -> Any:
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            value = value_fn(yb, pred, sw)
            if model.losses:
                value = value + tf.add_n(model.losses)
            scaled = value / replicas
        grads = tape.gradient(scaled, trainable)
        optimizer.apply(grads, trainable)
        return value

    if strategy is None:
        compiled = tf.function(train_step, reduce_retracing=True)
        return lambda xb, yb, sw: float(compiled(xb, yb, sw))
    distributed = _distributed_step(strategy, train_step)
    return lambda xb, yb, sw: float(distributed(xb, yb, sw))


def _distributed_step(
    strategy: Any, train_step: Callable[[Any, Any, Any], Any]
) -> Callable[[Any, Any, Any], Any]:
    """`train_step` run on every replica of `strategy`, each on its slice of the batch; returns
    the mean of the replicas' losses."""

    def replicated(xb: Any, yb: Any, sw: Any) -> Any:
        per_replica = strategy.run(train_step, args=(xb, yb, sw))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    on_replicas = tf.function(replicated, reduce_retracing=True)

    def split(value: Any) -> Any:
        if value is None:
            return None

        def part(ctx: Any) -> Any:
            i, n = ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync
            return keras.tree.map_structure(lambda a: a[i::n], value)

        return strategy.experimental_distribute_values_from_function(part)

    def step(xb: Any, yb: Any, sw: Any) -> Any:
        return on_replicas(split(xb), split(yb), split(sw))

    return step
