"""`FineTuner.find_lr` / `LRFinder`: the sweep, its suggestions, and leaving no trace."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Digits, Pretrained

from transferkit import (
    ConfigError,
    FineTuner,
    LRFinder,
    MissingExtraError,
    NotCompiledError,
)
from transferkit.recipes.lr_finder import suggest


def _snapshot(variables: list[keras.Variable]) -> list[np.ndarray]:
    return [v.numpy().copy() for v in variables]


def _assert_same(before: list[np.ndarray], variables: list[keras.Variable]) -> None:
    assert len(before) == len(variables)
    for old, var in zip(before, variables, strict=True):
        np.testing.assert_array_equal(old, var.numpy(), err_msg=var.path)


def test_sweep_leaves_weights_and_compiled_state_bit_identical(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.h5).freeze_until("fc1").replace_head(5).compile_sgd(lr=0.01)
    tuner.fit(x, y, epochs=1, batch_size=16, verbose=0)  # Builds the optimizer: momentum slots.
    model = tuner.model
    optimizer, loss, train_fn = model.optimizer, model.loss, model.train_function
    weights, slots = _snapshot(model.variables), _snapshot(optimizer.variables)
    iterations = int(optimizer.iterations.numpy())

    finder = tuner.find_lr(x, y, start_lr=1e-5, end_lr=1.0, steps=20, batch_size=16)

    assert isinstance(finder, LRFinder)
    assert model.optimizer is optimizer and model.loss is loss
    assert model.train_function is train_fn
    assert int(optimizer.iterations.numpy()) == iterations
    _assert_same(slots, optimizer.variables)
    _assert_same(weights, model.variables)
    # 50 samples in batches of 16 is 4 batches: the data was cycled to run 20 steps.
    assert len(finder.lrs) == len(finder.losses) == len(finder.raw_losses) == 20
    np.testing.assert_allclose(finder.lrs, np.geomspace(1e-5, 1.0, 20), rtol=1e-9)
    assert set(finder.suggestions) == {"steep", "valley", "minimum"}
    assert finder.suggestion == finder.suggestions["steep"]
    for lr in finder.suggestions.values():
        assert 1e-6 <= lr <= 1.0
    # The compiled optimizer carries on where it stopped.
    tuner.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert int(optimizer.iterations.numpy()) == iterations + 4


def test_the_sweep_really_trains_at_the_scheduled_rates(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(5).compile("adam")
    finder = tuner.find_lr(x, y, start_lr=1e-4, end_lr=1e-1, steps=30, batch_size=10)
    # Adam at 1e-4..1e-1 on a fresh head lowers the loss from its start.
    assert finder.losses.min() < finder.raw_losses[0]
    assert not finder.diverged


def test_divergence_stops_early_and_restores_batchnorm_statistics(
    bn_model: Pretrained, digits: Digits
) -> None:
    tuner = FineTuner(bn_model.keras_path, batchnorm="train").unfreeze().compile_sgd(lr=0.01)
    model = tuner.model
    before = _snapshot(model.variables)
    bn = model.get_layer("bn1")
    finder = tuner.find_lr(
        digits.x_new[:64], digits.y_new[:64], start_lr=1e-3, end_lr=1e6, steps=60, batch_size=16
    )
    assert finder.diverged
    assert len(finder.lrs) < 60
    last = finder.losses[-1]
    assert not np.isfinite(last) or last > 4 * np.nanmin(finder.losses[:-1])
    assert np.isfinite(finder.suggestion)
    _assert_same(before, model.variables)  # moving_mean/moving_variance included
    assert bn.trainable


def test_tf_data_dataset(pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, _, _ = few_shot
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    tuner = FineTuner(pretrained.keras_path).replace_head(5).compile("adam")
    finder = tuner.find_lr(ds, steps=12)
    assert len(finder.lrs) == 12
    assert np.all(np.isfinite(finder.raw_losses))


def test_needs_compile_and_validates_arguments(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(5)
    with pytest.raises(NotCompiledError, match="compile"):
        tuner.find_lr(x, y)
    tuner.compile("adam")
    bad = [
        {"start_lr": 1.0, "end_lr": 0.1},
        {"start_lr": -1.0},
        {"steps": 1},
        {"steps": 2.5},
        {"batch_size": 0},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            tuner.find_lr(x, y, **kwargs)


def test_suggestions_follow_their_definitions() -> None:
    lrs = np.geomspace(1e-6, 1.0, 31)
    # Flat, then falling with the steepest drop between points 15 and 16, minimum at 20, rising.
    losses = np.array(
        [2.0] * 10
        + [1.95, 1.9, 1.85, 1.8, 1.7, 1.5, 1.2, 1.1, 1.05, 1.02, 1.0]
        + [1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    )
    got = suggest(lrs, losses)
    assert got["steep"] == pytest.approx(lrs[15])
    assert got["minimum"] == pytest.approx(lrs[20] / 10)
    # Longest decreasing run: indices 9..20 (start = end - length = 20 - 12 = 8 in fastai's
    # convention); sections = 4, index = 8 + 4 + 2 = 14.
    assert got["valley"] == pytest.approx(lrs[14])
    assert all(np.isnan(v) for v in suggest(lrs[:1], losses[:1]).values())


def test_plot_saves_a_png_and_names_the_extra_when_matplotlib_is_missing(
    pretrained: Pretrained,
    few_shot: tuple[np.ndarray, ...],
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pathlib import Path

    from matplotlib.figure import Figure

    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(5).compile("adam")
    finder = tuner.find_lr(x, y, steps=10)
    target = Path(str(tmp_path)) / "lr.png"
    fig = finder.plot(target)
    assert isinstance(fig, Figure)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match=r"pip install \"transferkit\[plot\]\""):
        finder.plot()
