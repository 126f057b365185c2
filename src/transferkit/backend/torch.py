"""The PyTorch backend: eager calls and `torch.autograd`, as Keras' own torch trainer does."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import keras
import numpy as np
import torch

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

    def call(batch: Any) -> list[Any]:
        with torch.no_grad():
            # training=True: exactly what the layers compute inside `fit`.
            out = model(batch, training=training)
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]

    return call


def shared_training_state(shown: keras.Model, trained: keras.Model) -> AbstractContextManager[None]:
    """See `BackendModule.shared_training_state`: the variables are the state; nothing to do."""
    return nullcontext()


def local_variables(variables: list[keras.Variable]) -> list[str]:
    """See `BackendModule.local_variables`: `keras.distribution` does not run here."""
    return []


def runs_several_steps() -> bool:
    """See `BackendModule.runs_several_steps`: Keras 3.15.1 raises "`steps_per_execution` must be 1 with the PyTorch backend"."""
    return False


def runs_tensorflow_ops() -> bool:
    """See `BackendModule.runs_tensorflow_ops`."""
    return False


def feature_tensors(x: Any) -> Any:
    """See `BackendModule.feature_tensors`: the arrays as they are."""
    return x


def loss_replicas() -> int:
    """See `BackendModule.loss_replicas`."""
    return 1


def gradient_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, value_fn: ValueFn
) -> Callable[[Any, Any, Any], float]:
    """See `BackendModule.gradient_step`."""
    trainable = list(model.trainable_variables)

    def call(xb: Any, yb: Any, sw: Any) -> float:
        model.zero_grad()
        pred = model(xb, training=True)
        value = value_fn(yb, pred, sw)
        for extra in model.losses:
            value = value + extra
        value.backward()
        grads = [v.value.grad for v in trainable]
        with torch.no_grad():
            optimizer.apply(grads, trainable)
        return float(value)

    return call
