"""The Dropout policy: whether Dropout-family and noise layers in frozen ranges stay random.

Keras runs every Dropout, SpatialDropout, GaussianNoise, GaussianDropout and AlphaDropout layer
(and stochastic-depth layers such as keras-hub's `DINOV2DropPath`) in training mode during
`fit`, frozen or not (`trainable=False` only stops weight updates). The
Keras transfer-learning guide therefore calls a frozen base as `base(x, training=False)`. The
policy "frozen" gets the same effect without rewriting the graph: each such layer whose
`trainable` flag is False runs in inference mode (the identity), whatever `training` it is
called with; layers that are trainable (a new head, an unfrozen range) keep Keras semantics.

The override is a per-instance `call` that reads the layer's `trainable` flag at call time, so
a later freeze or unfreeze is honoured without re-applying the policy (Keras retraces the train
function when trainable flags change, since the model is recompiled). It is a runtime setting of
the working model, like the tf.function it runs in: `get_config` and saved files do not carry
it, and a saved model reloaded with plain Keras has Keras semantics again.
"""

from __future__ import annotations

import types
from typing import Any, Literal

import keras

from transferkit.errors import ConfigError

__all__ = [
    "DROPOUT_LAYER_TYPES",
    "DropoutPolicy",
    "apply_dropout_policy",
    "check_dropout_policy",
    "is_dropout_like",
    "runs_in_inference",
    "stochastic_depth_rate",
]

DropoutPolicy = Literal["train", "frozen"]

DROPOUT_LAYER_TYPES: tuple[type[Any], ...] = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D derive from it
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
"""The layer classes the policy acts on: random in training mode, identity in inference."""

_MARK = "_transferkit_frozen_dropout"

# Stochastic depth is no Keras built-in: keras-hub's `DINOV2DropPath` (and other libraries'
# `DropPath` / `StochasticDepth`) draw with `keras.random` and no `SeedGenerator`, so nothing but
# the class name and its rate tells that they are random in training mode (keras-hub 0.32).
_STOCHASTIC_DEPTH_NAMES = ("DropPath", "StochasticDepth")
_DEPTH_RATES = ("rate", "drop_path_rate", "drop_rate")


def stochastic_depth_rate(layer: Any) -> float | None:
    """The drop rate of a stochastic-depth layer (`DropPath`, `StochasticDepth` by class name),
    or None when `layer` is not one.

    Example:

    >>> stochastic_depth_rate(keras.layers.Dropout(0.5)) is None
    True
    """
    names = [cls.__name__ for cls in type(layer).__mro__]
    if not any(marker in name for name in names for marker in _STOCHASTIC_DEPTH_NAMES):
        return None
    for attribute in _DEPTH_RATES:
        value = getattr(layer, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 1.0  # a rate we cannot read: assume it draws


def is_dropout_like(layer: Any) -> bool:
    """Whether `layer` is random in training mode and the identity in inference: a Dropout-family
    or noise layer, or a stochastic-depth layer (`stochastic_depth_rate`)."""
    return isinstance(layer, DROPOUT_LAYER_TYPES) or stochastic_depth_rate(layer) is not None


def check_dropout_policy(policy: Any) -> DropoutPolicy:
    """Returns `policy` when it is "train" or "frozen".

    Raises:
        ConfigError: any other value.
    """
    if isinstance(policy, str) and policy in ("train", "frozen"):
        return policy  # type: ignore[return-value]
    raise ConfigError(
        f"dropout must be 'train' (Keras semantics: Dropout and noise layers are random during "
        f"fit even when frozen) or 'frozen' (those in frozen ranges run in inference mode), "
        f"got {policy!r}."
    )


def _inference_when_frozen(self: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
    if "training" in kwargs and not self.trainable:
        kwargs["training"] = False
    return type(self).call(self, *args, **kwargs)


def _dropout_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # Private API (checked on Keras 3.15.1), as in train.cache.layers: `_flatten_layers` also
    # reaches the dropout a layer owns without being a model (the one inside MultiHeadAttention).
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if is_dropout_like(layer)
    ]


def apply_dropout_policy(model: keras.Model, policy: DropoutPolicy) -> None:
    """Installs (policy "frozen") or removes (policy "train") the inference-mode override.

    Idempotent; call it again after layers were added (a new head), so that they follow it too.

    Args:
        model: the working model.
        policy: "train" or "frozen".
    """
    for layer in _dropout_layers(model):
        marked = bool(layer.__dict__.get(_MARK, False))
        if policy == "frozen" and not marked:
            # An instance attribute shadows the class's `call`: Keras' `Operation.__call__`
            # looks `self.call` up on every call, and the signature it inspected is unchanged.
            layer.call = types.MethodType(_inference_when_frozen, layer)
            layer.__dict__[_MARK] = True
        elif policy == "train" and marked:
            del layer.call
            del layer.__dict__[_MARK]


def runs_in_inference(layer: Any) -> bool:
    """Whether `layer` is a Dropout-family layer that the "frozen" policy keeps in inference.

    Example:

    >>> layer = keras.layers.Dropout(0.5, trainable=False)
    >>> runs_in_inference(layer)
    False
    """
    return bool(is_dropout_like(layer) and layer.__dict__.get(_MARK, False) and not layer.trainable)
