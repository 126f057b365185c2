"""Models with several inputs, given as lists or as dicts, through fit, the cache and find_lr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import transferkit.train.cache.extract as extract_module
from transferkit import ConfigError, DataError, FineTuner

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def two_input_model(dict_inputs: bool, meta_dense: bool = False) -> keras.Model:
    """An image branch (conv, frozen later) and a vector branch, joined before a small head.

    The dict is keyed "image"/"meta" while the tensors are named "img_t"/"meta_t": Keras
    matches such a model's dict inputs by key, a list-built model's by tensor name.
    """
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="img_t")
    meta = keras.Input((4,), name="meta_t")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    x = keras.layers.Flatten(name="flat")(x)
    m = keras.layers.Dense(3, name="meta_dense")(meta) if meta_dense else meta
    h = keras.layers.Concatenate(name="cat")([x, m])
    h = keras.layers.Dense(8, activation="relu", name="fc")(h)
    out = keras.layers.Dense(3, name="out")(h)
    if dict_inputs:
        with pytest.warns(UserWarning, match="keys in the dict must match"):
            return keras.Model({"image": image, "meta": meta}, out, name="two_inputs")
    return keras.Model([image, meta], out, name="two_inputs")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.random((64, 8, 8, 1), dtype="float32"),
        rng.random((64, 4), dtype="float32"),
        rng.integers(0, 3, 64),
    )


def _tuner(dict_inputs: bool, meta_dense: bool = False) -> FineTuner:
    tuner = FineTuner(two_input_model(dict_inputs, meta_dense)).freeze_until("cat")
    if meta_dense:
        tuner.unfreeze("meta_dense")
    return tuner.compile_sgd(lr=0.05, loss=LOSS)


def _fit(tuner: FineTuner, x: Any, y: np.ndarray, cache: bool | str) -> Any:
    return tuner.fit(
        x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, cache=cache, validation_data=(x, y)
    )


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [w.numpy() for w in model.weights]


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("meta_dense", [False, True], ids=["raw-input-cut", "trainable-branch"])
def test_list_inputs_are_cached_exactly(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], meta_dense: bool
) -> None:
    xi, xm, y = data
    plain = _fit(_tuner(False, meta_dense), [xi, xm], y, False)
    cached = _fit(_tuner(False, meta_dense), [xi, xm], y, "auto")
    assert cached.cached and not plain.cached
    # A raw input feeding the head is part of the cut; a trainable branch on it starts there.
    assert cached.cache_layer == ("flat" if meta_dense else "cat")
    _assert_same(_weights(plain.model), _weights(cached.model))
    np.testing.assert_allclose(plain.history["val_loss"], cached.history["val_loss"], rtol=1e-5)


@pytest.mark.parametrize("cache", [False, "auto"])
def test_dict_inputs_keyed_unlike_their_tensors(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], cache: bool | str, tmp_path: Path
) -> None:
    xi, xm, y = data
    # Insertion order opposite to the model's: matched by key, not by position.
    x = {"meta": xm, "image": xi}
    reference = _fit(_tuner(False), [xi, xm], y, False)
    tuner = _tuner(True)
    result = _fit(tuner, x, y, cache)
    assert result.cached is (cache == "auto")
    _assert_same(_weights(reference.model), _weights(result.model))
    np.testing.assert_allclose(result.predict(x), reference.predict([xi, xm]), atol=1e-6)


def test_new_head_keeps_the_dict_inputs_and_saves(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    xi, xm, y = data
    x = {"image": xi, "meta": xm}
    tuner = FineTuner(two_input_model(True)).freeze_until("cat")
    tuner.replace_head(regression=True, at="cat", hidden=(4,)).compile_sgd(lr=0.01)
    assert set(tuner.model.input) == {"image", "meta"}
    result = tuner.fit(x, y.astype("float32"), epochs=2, batch_size=16, verbose=0)
    assert result.cached and result.predict(x).shape == (64, 1)
    path = tmp_path / "two_inputs.keras"
    result.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.predict(x), atol=1e-6)


def test_missing_dict_key_raises_and_changes_nothing(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    xi, _, y = data
    tuner = _tuner(True)
    before = _weights(tuner.model)
    with pytest.raises(DataError, match="'meta' is missing"):
        tuner.fit({"image": xi}, y, epochs=2, verbose=0)
    _assert_same(before, _weights(tuner.model))
    list_tuner = _tuner(False)
    with pytest.raises(DataError, match=r"input names \['img_t', 'meta_t'\]"):
        list_tuner.fit({"image": xi, "meta_t": xi}, y, epochs=2, verbose=0)


def test_dict_dataset_is_cached_exactly(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    xi, xm, y = data
    ds = tf.data.Dataset.from_tensor_slices(({"image": xi, "meta": xm}, y)).batch(16)
    plain = _tuner(True).fit(ds, epochs=3, verbose=0, cache=False)
    cached = _tuner(True).fit(ds, epochs=3, verbose=0, cache=True)
    assert cached.cached
    _assert_same(_weights(plain.model), _weights(cached.model))


def test_find_lr_with_two_inputs(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    xi, xm, y = data
    tuner = _tuner(True)
    before = _weights(tuner.model)
    finder = tuner.find_lr({"image": xi, "meta": xm}, y, steps=20, batch_size=16)
    assert len(finder.lrs) >= 2 and np.isfinite(finder.losses).all()
    _assert_same(before, _weights(tuner.model))


def test_auto_steps_aside_when_computing_features_fails(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    xi, xm, y = data
    reference = _fit(_tuner(False), [xi, xm], y, False)

    def broken(prefix: keras.Model) -> Any:
        def run(batch: Any) -> Any:
            raise RuntimeError("prefix exploded")

        return run

    monkeypatch.setattr(extract_module, "_prefix_function", broken)
    with pytest.warns(RuntimeWarning, match="prefix exploded"):
        result = _fit(_tuner(False), [xi, xm], y, "auto")
    assert not result.cached
    _assert_same(_weights(reference.model), _weights(result.model))
    with pytest.raises(ConfigError, match="prefix exploded"):
        _fit(_tuner(False), [xi, xm], y, True)
