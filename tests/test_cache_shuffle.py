"""The feature cache on datasets that reshuffle every epoch: one pass through the frozen prefix,
then the cached features reshuffled the way the dataset would reshuffle itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Digits, Pretrained

from transferkit import FineTuner
from transferkit.train.cache.pipeline import dataset_shuffle
from transferkit.train.cache.store import Features
from transferkit.train.cache.suffix import _batch_shuffled


def test_dataset_shuffle_kinds_and_problems() -> None:
    data = (np.zeros((10, 3), "float32"), np.zeros(10))
    ds = tf.data.Dataset.from_tensor_slices(data)
    assert dataset_shuffle(ds.shuffle(10).map(lambda a, b: (a * 2, b)).batch(4).prefetch(2)) == (
        "elements",
        None,
    )
    assert dataset_shuffle(ds.batch(4).shuffle(3)) == ("batch", None)
    assert dataset_shuffle(ds.shuffle(10).batch(2).shuffle(3)) == ("elements", None)
    assert dataset_shuffle(ds.batch(4)) == (False, None)
    assert dataset_shuffle(ds.shuffle(10, reshuffle_each_iteration=False).batch(3)) == (False, None)
    for changes_the_epoch, step in (
        (ds.shuffle(10).take(5).batch(2), "TakeDataset"),
        (ds.shuffle(10).padded_batch(2), "PaddedBatchDataset"),
        (ds.shuffle(10).batch(4, drop_remainder=True), "drop_remainder"),
        (ds.shuffle(10).batch(2).batch(2), "batches more than once"),
    ):
        kind, problem = dataset_shuffle(changes_the_epoch)
        assert kind is False and problem is not None and step in problem


def test_batch_shuffle_keeps_the_batches() -> None:
    x = np.arange(10, dtype="float32")[:, None]
    feats = Features([x], np.arange(10), None)
    ds = _batch_shuffled(feats, 4)
    epochs = [[tuple(b[1].numpy()) for b in ds] for _ in range(6)]
    assert all(sorted(e) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # a new order in some epoch


def curves_agree(plain: Any, cached: Any) -> None:
    p, c = np.array(plain.history["loss"]), np.array(cached.history["loss"])
    # Different batch orders, same optimisation (as in test_cache's shuffled arrays): both fall,
    # and epoch by epoch they stay within 15% + 0.02, about four times the spread of the loss
    # between two plain fits with different shuffles on these tasks.
    assert p[-1] < 0.8 * p[0] and c[-1] < 0.8 * c[0], (p, c)
    assert np.all(np.abs(p - c) <= 0.15 * p + 0.02), (p, c)


def twin(tuner: FineTuner, ds: Any, lr: float = 0.02, **kw: Any) -> tuple[Any, Any]:
    start = [w.copy() for w in tuner.model.get_weights()]
    tuner.compile_sgd(lr=lr)
    plain = tuner.fit(ds, cache=False, verbose=0, **kw)
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=lr)
    cached = tuner.fit(ds, cache="auto", verbose=0, **kw)
    return plain, cached


@pytest.mark.parametrize("where", ["elements", "batch"])
def test_reshuffled_dataset_is_cached(where: str, pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:400], digits.y_new[:400]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    # Explicit shuffle seeds: an unseeded tf.data shuffle takes its seed from TensorFlow's op
    # counter, so the plain fit's batch order (and its noisy curve) would depend on which tests
    # ran before in the same process.
    if where == "elements":
        ds = ds.shuffle(400, seed=11).batch(16)
    else:
        ds = ds.batch(16).shuffle(25, seed=11)
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(16,), at="fc2").freeze_until(-2)
    keras.utils.set_random_seed(7)
    plain, cached = twin(tuner, ds, epochs=6)
    assert cached.cached and cached.cache_layer == "fc2" and not plain.cached
    curves_agree(plain, cached)
    tuner.compile_sgd(lr=0.02)
    assert tuner.fit(ds, cache=True, epochs=2, verbose=0).cached  # no longer refused


def test_image_dataset_from_directory(tmp_path: Path, digits: Digits) -> None:
    # The keras.io flow: a folder of images per class, reshuffled every epoch by default.
    for label in range(2):
        folder = tmp_path / f"class_{label}"
        folder.mkdir()
        for i, image in enumerate(digits.x_new[digits.y_new == label][:40]):
            rgb = np.repeat(np.kron(image, np.ones((2, 2, 1))), 3, axis=-1) * 255
            keras.utils.save_img(folder / f"{i}.png", rgb.astype("uint8"))
    ds = keras.utils.image_dataset_from_directory(
        tmp_path, image_size=(16, 16), batch_size=16, seed=1
    )
    assert dataset_shuffle(ds)[0] == "elements"
    keras.utils.set_random_seed(4)
    base = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Rescaling(1 / 255.0, name="rescale"),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv_b"),
        ],
        name="base",
    )
    base.trainable = False
    inp = keras.Input((16, 16, 3))
    flat = keras.layers.Flatten(name="flat")(base(inp))
    model = keras.Model(inp, keras.layers.Dense(2, name="new_head")(flat))
    tuner = FineTuner(model)
    plain, cached = twin(tuner, ds, lr=0.03, epochs=8)
    assert cached.cached and cached.cache_layer == "flat"
    curves_agree(plain, cached)
