"""Augmentation views: `fit(augment_views=K)` caches a frozen base behind random augmentation,
computing K augmented passes, and refuses when nothing augments."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Digits, Pretrained

from transferkit import FineTuner
from transferkit.errors import ConfigError
from transferkit.train.cache.errors import CannotCache
from transferkit.train.cache.extract import compute_features
from transferkit.train.cache.layers import is_augmentation
from transferkit.train.cache.plan import plan_cache
from transferkit.train.cache.store import Budget, SpillDir


def augmented(pretrained: Pretrained) -> keras.Model:
    """RandomFlip -> the pre-trained conv base (nested, up to flatten) -> a new head."""
    keras.utils.set_random_seed(3)
    clone = keras.models.clone_model(pretrained.model)
    clone.set_weights(pretrained.model.get_weights())
    base = keras.Sequential([keras.Input((8, 8, 1)), *clone.layers[:4]], name="base")
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.RandomFlip("horizontal", name="flip")(inp)
    x = base(x)
    x = keras.layers.Dense(24, activation="relu", name="fc")(x)
    x = keras.layers.Dropout(0.2, name="head_drop")(x)
    out = keras.layers.Dense(5, activation="softmax", name="out")(x)
    return keras.Model(inp, out, name="augmented")


def _tuner(pretrained: Pretrained) -> FineTuner:
    tuner = FineTuner(augmented(pretrained)).freeze_until("fc")
    tuner.compile_sgd(lr=0.05)
    return tuner


def test_is_augmentation() -> None:
    assert is_augmentation(keras.layers.RandomFlip())
    assert is_augmentation(keras.layers.RandomRotation(0.1))
    assert not is_augmentation(keras.layers.Dropout(0.5))
    assert not is_augmentation(keras.layers.Resizing(4, 4))  # deterministic
    assert not is_augmentation(keras.layers.Dense(2))


def test_views_are_independent_flips(pretrained: Pretrained, digits: Digits) -> None:
    tuner = _tuner(pretrained)
    with pytest.raises(CannotCache, match=r"^no frozen layer"):
        plan_cache(tuner.model)
    plan = plan_cache(tuner.model, augment=True)
    assert plan.cut_layer == "flatten" and plan.augmentation == ["flip"]
    assert "head_drop" in [layer.name for layer in plan.suffix.layers]  # stays random
    x, y = digits.x_new[:64], digits.y_new[:64]
    kw: dict[str, Any] = {"batch_size": 16, "verbose": 0, "validation_data": (x, y)}
    views, val = compute_features(plan, x, y, kw, Budget(1 << 30), SpillDir(), passes=2)
    assert len(views) == 2 and val is not None
    features = keras.ops.convert_to_numpy(plan.prefix(x, training=False))
    flipped = keras.ops.convert_to_numpy(plan.prefix(x[:, :, ::-1], training=False))
    np.testing.assert_allclose(val.x[0], features, rtol=1e-5, atol=1e-6)  # no augmentation
    picks = []
    for view in views:
        rows = view.x[0]
        same = np.isclose(rows, features, rtol=1e-5, atol=1e-6).all(axis=1)
        flip = np.isclose(rows, flipped, rtol=1e-5, atol=1e-6).all(axis=1)
        assert np.all(same | flip)  # every row is the image or its mirror image
        picks.append(flip & ~same)
        assert 10 < picks[-1].sum() < 54  # about half flipped
    assert (picks[0] != picks[1]).sum() > 10  # independent draws


def test_views_train_like_plain_augmented_fit(pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:320], digits.y_new[:320]
    fit: dict[str, Any] = {"epochs": 6, "batch_size": 32, "verbose": 0}
    keras.utils.set_random_seed(5)
    plain_tuner = _tuner(pretrained)
    plain = plain_tuner.fit(x, y, cache=False, **fit)
    assert not plain.cached and plain.augment_views is None
    keras.utils.set_random_seed(5)
    tuner = _tuner(pretrained)
    views = tuner.fit(x, y, cache=True, augment_views=2, **fit)
    assert views.cached and views.cache_layer == "flatten" and views.augment_views == 2
    p, v = np.array(plain.history["loss"]), np.array(views.history["loss"])
    assert p[-1] < 0.7 * p[0] and v[-1] < 0.7 * v[0]
    assert np.all(np.abs(p - v) <= 0.2 * p + 0.05), (p, v)
    args = views.provenance["fit_arguments"]
    assert args["augment_views"] == 2


def test_random_dataset_maps_are_views(pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:96], digits.y_new[:96]
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .map(lambda a, b: (tf.image.random_flip_left_right(a), b))
        .batch(16)
    )
    tuner = FineTuner(pretrained.model).freeze_until("out")  # cut before the Dropout
    tuner.compile_sgd(lr=0.05)
    assert not tuner.fit(ds, epochs=2, verbose=0).cached  # random map: falls back
    result = tuner.fit(ds, epochs=3, augment_views=3, verbose=0)
    assert result.cached and result.augment_views == 3 and result.cache_layer == "fc2"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_views_raise(pretrained: Pretrained, digits: Digits, bad: Any) -> None:
    tuner = _tuner(pretrained)
    before = [w.copy() for w in tuner.model.get_weights()]
    with pytest.raises(ConfigError, match="augment_views must be"):
        tuner.fit(digits.x_new[:32], digits.y_new[:32], epochs=2, augment_views=bad, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, tuner.model.get_weights(), strict=True))


def test_views_without_augmentation_raise(pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:32], digits.y_new[:32]
    plain = FineTuner(pretrained.model).freeze_until("out")
    plain.compile_sgd(lr=0.05)
    with pytest.raises(ConfigError, match="nothing augments"):
        plain.fit(x, y, epochs=2, augment_views=2, verbose=0)
    # A second member: the augmentation comes after a trainable layer, outside the prefix.
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    h = keras.layers.Conv2D(4, 3, padding="same", name="first")(h)
    h = keras.layers.RandomFlip(name="flip")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="frozen")(h)
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.Flatten()(h))
    late = FineTuner(keras.Model(inp, out))
    late.model.get_layer("stem").trainable = False
    late.model.get_layer("frozen").trainable = False
    late.compile_sgd(lr=0.05)
    with pytest.raises(ConfigError, match="augment_views=2"):
        late.fit(x, y, epochs=2, augment_views=2, cache=True, verbose=0)
    with pytest.raises(ConfigError, match="cache=False"):
        _tuner(pretrained).fit(x, y, epochs=2, augment_views=2, cache=False, verbose=0)
