"""The three classic fine-tuning recipes, each through the `.h5` and the `.keras` file.

1. Fine-tune every layer with SGD at a small learning rate and momentum.
2. Freeze everything but the last five layers (`for l in model.layers[:-5]: l.trainable = False`).
3. Cut at `model.layers[-6]` and put a regression head on it (Dense(64, relu), Dense(1), MSE).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import Pretrained, weights_of

from transferkit import FineTuner

FORMATS = ["h5", "keras_path"]


def _path(pretrained: Pretrained, fmt: str) -> Path:
    path = getattr(pretrained, fmt)
    assert isinstance(path, Path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipe_fine_tune_all_with_sgd_momentum(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], fmt: str
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(_path(pretrained, fmt)).compile_sgd(lr=1e-3, momentum=0.9)
    before = {layer.name: weights_of(layer) for layer in tuner.model.layers}
    result = tuner.fit(x, y, epochs=2, batch_size=16, verbose=0)

    opt = tuner.model.optimizer
    assert isinstance(opt, keras.optimizers.SGD)
    assert float(opt.learning_rate.numpy()) == pytest.approx(1e-3)
    assert opt.momentum == pytest.approx(0.9)
    # The softmax output keeps its probabilities: the loss must not treat them as logits.
    assert tuner.model.loss.get_config()["from_logits"] is False
    assert result.non_trainable_params == 0
    for layer in tuner.model.layers:
        for old, new in zip(before[layer.name], weights_of(layer), strict=True):
            assert not np.array_equal(old, new), f"{layer.name} did not train"
    assert result.epochs == 2 and np.isfinite(result.history["loss"]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipe_freeze_all_but_last_five(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], fmt: str
) -> None:
    x, y, _, _ = few_shot
    path = _path(pretrained, fmt)
    classic = keras.models.load_model(path, compile=False)
    for layer in classic.layers[:-5]:
        layer.trainable = False
    expected = {layer.name: layer.trainable for layer in classic.layers}

    tuner = FineTuner(path).freeze_until(-5).compile_sgd(lr=1e-2)
    got = {
        layer.name: layer.trainable
        for layer in tuner.model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    }
    assert got == expected
    assert [n for n, t in got.items() if not t] == ["conv1", "conv2", "pool"]

    before = {layer.name: weights_of(layer) for layer in tuner.model.layers}
    tuner.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for name in ("conv1", "conv2"):
        for old, new in zip(before[name], weights_of(tuner.model.get_layer(name)), strict=True):
            np.testing.assert_array_equal(old, new)
    for name in ("fc1", "fc2", "out"):
        for old, new in zip(before[name], weights_of(tuner.model.get_layer(name)), strict=True):
            assert not np.array_equal(old, new), f"{name} did not train"


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipe_cut_at_minus_six_regression_head(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], fmt: str
) -> None:
    x, y, x_test, y_test = few_shot
    value = (y + 5).astype("float32")  # The digit itself, 5..9.
    path = _path(pretrained, fmt)
    classic = keras.models.load_model(path, compile=False)

    tuner = FineTuner(path).replace_head(regression=True, at=-6).compile_sgd(lr=1e-3)
    head = tuner.head
    assert head is not None and head.kind == "regression" and head.units == 1
    assert head.cut_layer == classic.layers[-6].name == "pool"
    assert head.hidden == (64,)
    assert tuner.model.output_shape == (None, 1)
    new = [tuner.model.get_layer(n) for n in head.layer_names]
    assert [type(layer).__name__ for layer in new] == ["Flatten", "Dense", "Dense"]
    assert new[1].units == 64 and new[1].activation.__name__ == "relu"
    assert new[2].activation.__name__ == "linear"
    # Kept layers carry the pre-trained weights.
    for name in ("conv1", "conv2"):
        for a, b in zip(
            weights_of(classic.get_layer(name)),
            weights_of(tuner.model.get_layer(name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    assert isinstance(tuner.model.loss, keras.losses.MeanSquaredError)

    result = tuner.fit(x, value, epochs=3, batch_size=16, verbose=0)
    assert set(result.history) == {"loss", "mae"}
    pred = result.predict(x_test)
    assert pred.shape == (len(x_test), 1)
    mse = float(np.mean((pred[:, 0] - (y_test + 5)) ** 2))
    evaluated = result.evaluate(x_test, (y_test + 5).astype("float32"), batch_size=len(x_test))
    assert evaluated["loss"] == pytest.approx(mse, rel=1e-4)
