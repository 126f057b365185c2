"""Whether a fit can be cached: the callbacks, the model, the data, augmentation views.

Each check names the first thing that keeps the cache from reproducing plain `fit` (or from
being worth it under `cache="auto"`) and raises `CannotCache` with it; `executor` decides what
that means for the user. `check_augment_views` and `check_views` are argument errors instead
(`ConfigError` whatever the mode): `augment_views` asks for something that cannot happen.

Callbacks see the full model. A callback that changes trainable flags during fit (a gradual
unfreezing schedule) must declare it with a class or instance attribute
`changes_trainable = True`; the cache then steps aside, because the cut would move mid-fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from transferkit.compile.state import CompileArgs
from transferkit.errors import ConfigError
from transferkit.train.cache.errors import CannotCache
from transferkit.train.cache.layers import is_augmentation, sublayers
from transferkit.train.cache.pipeline import is_dataset, walk_pipeline

__all__ = [
    "Mode",
    "augmenting_data",
    "check_augment_views",
    "check_fit",
    "check_views",
    "fit_callbacks",
    "is_arrays",
]

Mode = Literal["auto"] | bool

_ARRAY_ONLY = ("steps_per_epoch",)


def is_arrays(x: Any) -> bool:
    """Whether `x` is a NumPy array or a (nested) list, tuple or dict of them."""
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    return bool(leaves) and all(isinstance(a, np.ndarray) for a in leaves)


def fit_callbacks(kw: dict[str, Any]) -> list[Any]:
    """The callbacks of a fit (`kw["callbacks"]`) as one flat list.

    Raises:
        CannotCache: they came as a `keras.callbacks.CallbackList`, which the cache cannot
            rebuild around the suffix.
    """
    callbacks = kw.get("callbacks") or []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        raise CannotCache("callbacks were passed as a CallbackList")
    return list(keras.tree.flatten(callbacks))


def check_fit(
    model: keras.Model,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    callbacks: Sequence[Any],
    *,
    mode: Mode,
    views: bool,
    compile_args: CompileArgs,
) -> None:
    """Checks that a fit of `model` can be cached, before any planning.

    Args:
        model: the compiled model.
        x, y, kw: what `model.fit` would get (`kw` without `x` and `y`).
        callbacks: the fit's callbacks, from `fit_callbacks`.
        mode: "auto" also refuses what is exact but not worthwhile (a single epoch) or cannot be
            told (Python code in a dataset); True only refuses what is not exact.
        views: augmentation views were asked for: random steps in a dataset are the point.
        compile_args: what the model was compiled with.

    Raises:
        CannotCache: the first reason found, in the order callbacks, model, data.
    """
    reason = (
        _callback_reason(callbacks)
        or _model_reason(model, kw, mode, compile_args)
        or _data_reason(x, y, kw, mode, views)
    )
    if reason is not None:
        raise CannotCache(reason)


def _callback_reason(callbacks: Sequence[Any]) -> str | None:
    for cb in callbacks:
        if getattr(cb, "changes_trainable", False) is True:
            return (
                f"callback {type(cb).__name__} changes trainable flags during fit "
                "(changes_trainable = True), which would move the cut"
            )
    return None


def _model_reason(
    model: keras.Model, kw: dict[str, Any], mode: Mode, compile_args: CompileArgs
) -> str | None:
    if not getattr(model, "compiled", False) or model.optimizer is None:
        return "the model is not compiled"
    if not _compiled_with(model, compile_args):
        return (
            "the model was compiled outside FineTuner since its last compile there (the cache "
            "compiles its head like that compile); compile through FineTuner.compile instead"
        )
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None and not tf.distribute.has_strategy():
        return "the model was compiled under a tf.distribute strategy whose scope is not entered"
    if not model.trainable_variables:
        return "the model has no trainable weights"
    epochs = int(kw.get("epochs", 1)) - int(kw.get("initial_epoch", 0))
    if mode == "auto" and epochs < 2:
        return "a single epoch computes the frozen layers once anyway"
    return None


def _compiled_with(model: keras.Model, args: CompileArgs) -> bool:
    # The suffix is compiled from `args`: a compile that did not produce them
    # (`tuner.model.compile(...)` by hand) would train it otherwise. Keras keeps these
    # arguments as public attributes (the loss as passed, checked on Keras 3.15.1).
    return bool(
        getattr(model, "loss", None) is args.loss
        and model.steps_per_execution == args.steps_per_execution
        and model.run_eagerly == args.run_eagerly
        and model.jit_compile == args.jit_compile
    )


def _data_reason(x: Any, y: Any, kw: dict[str, Any], mode: Mode, views: bool) -> str | None:
    if isinstance(x, keras.utils.PyDataset):
        return "a keras.utils.PyDataset is read batch by batch by Keras; only arrays and tf.data"
    if is_dataset(x):
        if y is not None or kw.get("sample_weight") is not None or kw.get("validation_split"):
            # Keras refuses these with a dataset; plain fit raises its own error.
            return "y, sample_weight or validation_split were given with a dataset"
        if kw.get("steps_per_epoch") is not None:
            return "steps_per_epoch with a dataset is not supported by the cache"
        training = _dataset_reason(x, mode, "the training dataset", views)
        return training or _val_reason(kw, mode)
    if not is_arrays(x) or (y is not None and not is_arrays(y)):
        return f"the data is neither NumPy arrays nor a tf.data.Dataset ({type(x).__name__})"
    if y is None:
        return "no targets (y) were given"
    if any(kw.get(k) is not None for k in _ARRAY_ONLY):
        return "steps_per_epoch is not supported by the cache"
    return _val_reason(kw, mode)


def _val_reason(kw: dict[str, Any], mode: Mode) -> str | None:
    val = kw.get("validation_data")
    if val is not None:
        if is_dataset(val):
            return _dataset_reason(val, mode, "the validation dataset")
        if not (isinstance(val, (tuple, list)) and 2 <= len(val) <= 3 and is_arrays(val[0])):
            return "validation_data is neither arrays nor a tf.data.Dataset"
    return None


def _dataset_reason(ds: Any, mode: Mode, what: str, views: bool = False) -> str | None:
    card = int(ds.cardinality())
    if card < 0 and card != -2:  # INFINITE; UNKNOWN (-2) is finite in practice for fit
        return f"{what} is infinite (`repeat()`)"
    # A reshuffle alone is replayed on the cached features (suffix.train_suffix); validation
    # metrics do not depend on the order at all.
    walk = walk_pipeline(ds)
    if views:
        # Each augmentation view is a fresh pass over the dataset: its random (or opaque)
        # steps run again, which is the point.
        return (
            f"{what} changes between epochs: {walk.shuffle_problem}"
            if walk.shuffle_problem
            else None
        )
    random = walk.random or walk.shuffle_problem
    if random:
        return (
            f"{what} changes between epochs: {random}. To cache it, fix the data: call "
            "`.cache()` after the random steps (one draw for every epoch, which plain fit then "
            "sees too) or shuffle with `reshuffle_each_iteration=False`"
        )
    opaque = walk.opaque
    if opaque and mode == "auto":
        return (
            f"{what} may change between epochs: {opaque}. Pass cache=True if it yields the same "
            "elements in every epoch"
        )
    return None


def check_augment_views(views: Any) -> int | None:
    """`views` as an int >= 1, or None.

    Raises:
        ConfigError: anything else.
    """
    if views is None:
        return None
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ConfigError(
            f"augment_views must be a number of augmented passes >= 1 (or None), got {views!r}."
        )
    return int(views)


def augmenting_data(x: Any) -> bool:
    """Whether `x` is a `tf.data.Dataset` with random steps (augmentation in the pipeline)."""
    return is_dataset(x) and walk_pipeline(x).random is not None


def check_views(model: keras.Model, x: Any, views: int) -> None:
    """Checks that something augments when `augment_views` is given.

    Raises:
        ConfigError: neither the model nor the data has random augmentation.
    """
    if not any(is_augmentation(layer) for layer in sublayers(model)) and not augmenting_data(x):
        raise ConfigError(
            f"augment_views={views}, but nothing augments: the model has no random "
            "augmentation layer (RandomFlip, RandomRotation, ...) and the data is not a "
            "tf.data.Dataset with random maps. Drop augment_views; the cache is exact without it."
        )
