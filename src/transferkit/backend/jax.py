"""The JAX backend: `jax.jit` over Keras' stateless calls.

A JAX function cannot change Keras variables, so each compiled function takes the variables'
values and returns new ones (`model.stateless_call`, `optimizer.stateless_apply`), and the
wrapper assigns them back, as Keras' own JAX trainer does between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import keras
import numpy as np

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


def _values(variables: list[Any]) -> list[Any]:
    return [v.value for v in variables]


def _arrays(data: Any) -> Any:
    # Batches of a tf.data pipeline arrive as TensorFlow tensors, which jax.jit does not take.
    if data is None:
        return None
    return keras.tree.map_structure(np.asarray, data)


def forward_function(model: keras.Model, training: bool = True) -> Callable[[Any], list[Any]]:
    """See `BackendModule.forward_function`."""

    @jax.jit  # type: ignore[untyped-decorator]
    def run(trainable: list[Any], non_trainable: list[Any], batch: Any) -> Any:
        # training=True: exactly what the layers compute inside `fit` (a frozen
        # BatchNormalization uses its moving statistics either way).
        return model.stateless_call(trainable, non_trainable, batch, training=training)

    def call(batch: Any) -> list[Any]:
        non_trainable = list(model.non_trainable_variables)
        out, state = run(_values(model.trainable_variables), _values(non_trainable), _arrays(batch))
        # The new state holds the random layers' seeds: without it every pass of an augmenting
        # prefix would draw the same flips (as Keras' own JAX trainer, assign it back).
        for variable, value in zip(non_trainable, state, strict=True):
            variable.assign(value)
        return [np.asarray(o) for o in keras.tree.flatten(out)]

    return call


@contextmanager
def shared_training_state(shown: keras.Model, trained: keras.Model) -> Iterator[None]:
    """See `BackendModule.shared_training_state`.

    Inside `fit`, Keras' JAX trainer keeps the state in arrays and writes it back to the
    variables only when a callback reads `callback.model`, which calls `jax_state_sync()` on it.
    Callbacks see `shown`; its sync is pointed at `trained`'s, which also makes `trained` read
    the variables again before its next step (a learning rate a callback set is used).
    """
    object.__setattr__(shown, "jax_state_sync", trained.jax_state_sync)
    try:
        yield
    finally:
        object.__delattr__(shown, "jax_state_sync")


def local_variables(variables: list[keras.Variable]) -> list[str]:
    """See `BackendModule.local_variables`: a variable created outside a distribution's
    scope holds an array with a `SingleDeviceSharding`."""
    return [
        str(v.path)
        for v in variables
        if isinstance(getattr(v.value, "sharding", None), jax.sharding.SingleDeviceSharding)
    ]


def runs_several_steps() -> bool:
    """See `BackendModule.runs_several_steps`: Keras runs several steps per call here."""
    return True


def runs_tensorflow_ops() -> bool:
    """See `BackendModule.runs_tensorflow_ops`."""
    return False


def feature_tensors(x: Any) -> Any:
    """See `BackendModule.feature_tensors`: Keras' JAX trainer slices NumPy arrays directly."""
    return x


def loss_replicas() -> int:
    """See `BackendModule.loss_replicas`: a sharded JAX step computes one global loss."""
    return 1


def gradient_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, value_fn: ValueFn
) -> Callable[[Any, Any, Any], float]:
    """See `BackendModule.gradient_step`."""
    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)

    def loss(tv: list[Any], ntv: list[Any], xb: Any, yb: Any, sw: Any) -> Any:
        pred, new_ntv, losses = model.stateless_call(tv, ntv, xb, training=True, return_losses=True)
        value = value_fn(yb, pred, sw)
        for extra in losses:
            value = value + extra
        return value, new_ntv

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    @jax.jit  # type: ignore[untyped-decorator]
    def step(
        tv: list[Any], ntv: list[Any], ov: list[Any], xb: Any, yb: Any, sw: Any
    ) -> tuple[Any, list[Any], list[Any], list[Any]]:
        (value, new_ntv), grads = grad_fn(tv, ntv, xb, yb, sw)
        new_tv, new_ov = optimizer.stateless_apply(ov, grads, tv)
        return value, new_tv, new_ntv, new_ov

    def call(xb: Any, yb: Any, sw: Any) -> float:
        # The optimizer's variables include its learning rate: a change between calls counts.
        value, tv, ntv, ov = step(
            _values(trainable),
            _values(non_trainable),
            _values(optimizer.variables),
            _arrays(xb),
            _arrays(yb),
            _arrays(sw),
        )
        for variables, new in ((trainable, tv), (non_trainable, ntv), (optimizer.variables, ov)):
            for variable, v in zip(variables, new, strict=True):
                variable.assign(v)
        return float(value)

    return call
