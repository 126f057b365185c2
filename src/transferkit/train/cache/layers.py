"""Which layers the cached prefix may hold: frozen, deterministic, adding no loss of their own.

`layer_blocker` is the one decision (why a layer cannot be computed once, or None);
`is_inert` and `is_augmentation` are the random layers it lets through: a Dropout of rate 0,
and, for augmentation views, random augmentation layers. Pure functions of a layer.
"""

from __future__ import annotations

from typing import Any

import keras

from transferkit.model.dropout import runs_in_inference, stochastic_depth_rate

__all__ = [
    "RANDOM_LAYER_TYPES",
    "is_augmentation",
    "is_inert",
    "layer_blocker",
    "sublayers",
]

RANDOM_LAYER_TYPES: tuple[type[Any], ...] = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D derive from it
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
"""Layer classes that are random in training mode. Any layer owning a Keras `SeedGenerator`
(every `Random*` preprocessing layer does) counts as random too, unless `is_inert` says it
draws nothing."""

# Built-in layers that skip their random draw when this attribute is 0 (checked in their `call`
# on Keras 3.15.1: `if training and self.rate > 0`). Exact types: a subclass may draw anyway.
_INERT_WHEN_ZERO: dict[type[Any], str] = {
    keras.layers.Dropout: "rate",
    keras.layers.SpatialDropout1D: "rate",
    keras.layers.SpatialDropout2D: "rate",
    keras.layers.SpatialDropout3D: "rate",
    keras.layers.AlphaDropout: "rate",
    keras.layers.GaussianDropout: "rate",
    keras.layers.GaussianNoise: "stddev",
}


def sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`layer` and every layer it owns, nested models and their layers included.

    Args:
        layer: any Keras layer or model.

    Returns:
        The layers, in no particular order.
    """
    # Private API (checked on Keras 3.15.1): `_flatten_layers` reaches sublayers a layer owns
    # without being a model (the dropout of a MultiHeadAttention); order does not matter here.
    return list(layer._flatten_layers(include_self=True, recursive=True))


def _seed_generators(layer: keras.layers.Layer) -> list[Any]:
    # Private API (checked on Keras 3.15.1): Layer tracks its SeedGenerators here; every random
    # built-in layer (Dropout, GaussianNoise, RandomFlip, ...) owns one.
    return list(getattr(layer, "_seed_generators", []) or [])


def is_inert(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a built-in Dropout or noise layer that draws nothing: rate (or
    GaussianNoise's stddev) 0, so it is the identity in training mode too.

    Example:

    >>> is_inert(keras.layers.Dropout(0.0)), is_inert(keras.layers.Dropout(0.1))
    (True, False)
    """
    attribute = _INERT_WHEN_ZERO.get(type(layer))
    if attribute is None:
        return False
    try:
        return float(getattr(layer, attribute)) == 0.0
    except (TypeError, ValueError):
        return False


def is_augmentation(layer: Any) -> bool:
    """Whether `layer` is a random data-augmentation layer: a Keras image preprocessing layer or
    a `Random*` layer that owns a `SeedGenerator` (not a Dropout or noise layer).

    Example:

    >>> is_augmentation(keras.layers.RandomFlip()), is_augmentation(keras.layers.Dropout(0.5))
    (True, False)
    """
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, RANDOM_LAYER_TYPES):
        return False
    if not _seed_generators(layer):
        return False  # Resizing, CenterCrop: deterministic, cached like any layer
    names = {cls.__name__ for cls in type(layer).__mro__}
    return "BaseImagePreprocessingLayer" in names or type(layer).__name__.startswith("Random")


def layer_blocker(layer: Any, augment: bool = False) -> str | None:
    """Why `layer` cannot be part of the cached prefix, or None when it can.

    A cacheable layer is frozen (not trainable, or without any weights), deterministic in
    training mode and adds no loss of its own. Graph operations that are not layers (a `+`
    between Keras tensors) are deterministic and cacheable.

    Args:
        layer: a leaf layer or a Keras operation from a functional graph.
        augment: augmentation layers (`is_augmentation`) are cacheable too, as augmentation
            views computed once per pass.

    Returns:
        None, or a short reason such as "is trainable".

    Example:

    >>> layer_blocker(keras.layers.Dropout(0.5))
    'is random in training mode (Dropout)'
    """
    if not isinstance(layer, keras.layers.Layer):
        return None
    subs = sublayers(layer)
    for sub in subs:
        if is_inert(sub) or runs_in_inference(sub):  # rate 0, or dropout="frozen"
            continue
        if augment and is_augmentation(sub):
            continue
        if isinstance(sub, RANDOM_LAYER_TYPES) or _seed_generators(sub):
            return f"is random in training mode ({type(sub).__name__})"
        rate = stochastic_depth_rate(sub)
        if rate is not None and rate != 0.0:
            # Stochastic depth without a SeedGenerator (keras-hub's DINOV2DropPath).
            return f"is random in training mode ({type(sub).__name__}, rate {rate:g})"
        if isinstance(sub, keras.layers.BatchNormalization) and sub.trainable:
            return "is a BatchNormalization layer in training mode"
    if layer.trainable and layer.weights:
        return "is trainable"
    if any(getattr(sub, "activity_regularizer", None) is not None for sub in subs):
        return "adds an activity-regularization loss"
    return None
