"""The one seam between transferkit and the Keras backend in use.

Keras 3 runs on TensorFlow, JAX and PyTorch; almost all of transferkit is written against
`keras` and `keras.ops` and runs on any of them. The few places that need the backend's own
machinery (a compiled forward pass, a gradient step outside `fit`, the distribution engine) call
the module `current()` picks, one per backend: `backend/tensorflow.py`, `backend/jax.py`,
`backend/torch.py`. They share one interface, `BackendModule`.

The backend is chosen by Keras, not here: `KERAS_BACKEND` in the environment (or
`~/.keras/keras.json`) before `keras` is first imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast

import keras

__all__ = ["BackendModule", "ValueFn", "current", "name"]

ValueFn = Callable[[Any, Any, Any], Any]
"""`value_fn(y, y_pred, sample_weight)`: a scalar loss, written with `keras.ops`."""


class BackendModule(Protocol):
    """What every backend module provides."""

    def forward_function(
        self, model: keras.Model, training: bool = True
    ) -> Callable[[Any], list[Any]]:
        """A compiled `model(batch, training=training)` returning its outputs as NumPy arrays.

        Only for models whose variables it does not change (a frozen, deterministic prefix).
        """

    def gradient_step(
        self, model: keras.Model, optimizer: keras.optimizers.Optimizer, value_fn: ValueFn
    ) -> Callable[[Any, Any, Any], float]:
        """A compiled step `step(x, y, sample_weight) -> loss` that applies one update.

        The loss is `value_fn(y, model(x, training=True), sample_weight)` plus the model's own
        losses; `optimizer` (built on `model.trainable_variables`) applies the gradients with its
        current learning rate. The model's variables hold the new values after each call.
        """

    def shared_training_state(
        self, shown: keras.Model, trained: keras.Model
    ) -> AbstractContextManager[None]:
        """While `trained` fits, callbacks that read or write `shown` (which shares its
        variables: the feature cache) see and change the state `trained` trains on."""

    def local_variables(self, variables: list[keras.Variable]) -> list[str]:
        """The paths of the variables that live on a single device (not laid out over a
        `keras.distribution` mesh); empty where the backend has no such distinction."""

    def runs_several_steps(self) -> bool:
        """Whether Keras runs `steps_per_execution > 1` on this backend (not on PyTorch)."""

    def runs_tensorflow_ops(self) -> bool:
        """Whether TensorFlow functions run on this backend's tensors, inside compiled steps too
        (the Keras 2 stand-ins call them there, and `keras.ops` equivalents elsewhere)."""

    def feature_tensors(self, x: Any) -> Any:
        """Arrays of cached features as the tensors `fit` reads fastest, converted once."""

    def loss_replicas(self) -> int:
        """Over how many replicas a Keras loss divides itself inside such a step (1 but under a
        `tf.distribute` strategy, where each replica's loss is scaled by 1 / replicas)."""


_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def name() -> str:
    """The name of the Keras backend in use ("tensorflow", "jax", "torch", ...)."""
    return str(keras.backend.backend())


def current() -> BackendModule:
    """The backend module for the Keras backend in use.

    Raises:
        ConfigError: Keras runs on a backend transferkit has no module for (numpy, openvino).
    """
    from transferkit.errors import ConfigError

    backend = name()
    module = _MODULES.get(backend)
    if module is None:
        raise ConfigError(
            f"transferkit does not support the Keras backend {backend!r}; set KERAS_BACKEND to "
            "'tensorflow', 'jax' or 'torch' before keras is imported."
        )
    return cast(BackendModule, importlib.import_module(f"transferkit.backend.{module}"))
