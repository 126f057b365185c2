"""Walking layers, resolving references and selectors, trainable flags and the BatchNorm policy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import Pretrained, build_cnn, weights_of

from transferkit import FineTuner, LayerNotFoundError
from transferkit.model.layers import all_layers, leaf_layers, resolve, select, top_layers


def _flags(model: keras.Model) -> dict[str, bool]:
    return {layer.name: bool(layer.trainable) for layer in all_layers(model)}


def _functional_twin() -> keras.Model:
    inp = keras.Input((8, 8, 1))
    x = inp
    for layer in build_cnn("twin").layers:
        x = layer(x)
    return keras.Model(inp, x, name="twin_functional")


@pytest.mark.parametrize("ref", [0, 2, 5, -1, -3, -5, -8])
def test_sequential_and_functional_twin_count_alike(ref: int) -> None:
    seq = FineTuner(build_cnn("seq")).freeze_until(ref)
    func = FineTuner(_functional_twin()).freeze_until(ref)
    assert _flags(seq.model) == _flags(func.model)
    assert next(n for n, t in _flags(seq.model).items() if t) == build_cnn().layers[ref].name


@pytest.mark.parametrize("ref", [0, 3, -1, -2, -4])
def test_twins_count_alike_after_a_head_change(ref: int) -> None:
    seq = FineTuner(build_cnn("seq")).replace_head(3, hidden=(8, 4))
    func = FineTuner(_functional_twin()).replace_head(3, hidden=(8, 4))
    assert [layer.name for layer in top_layers(seq.model)] == [
        layer.name for layer in top_layers(func.model)
    ]
    seq.freeze_until(ref)
    func.freeze_until(ref)
    assert _flags(seq.model) == _flags(func.model)
    # Indices count the new model's layers: -1 is the new output layer.
    assert seq.model.layers[-1].name == "head_output"
    trainable = [n for n, t in _flags(seq.model).items() if t]
    assert trainable[0] == top_layers(seq.model)[ref].name


def test_freeze_until_minus_five_equals_the_classic_loop_on_a_functional_model(
    residual_model: Pretrained,
) -> None:
    classic = keras.models.load_model(residual_model.keras_path, compile=False)
    assert isinstance(classic.layers[0], keras.layers.InputLayer)
    for layer in classic.layers[:-5]:
        layer.trainable = False
    tuner = FineTuner(residual_model.keras_path).freeze_until(-5)
    assert _flags(tuner.model) == {layer.name: layer.trainable for layer in classic.layers[1:]}


def test_freeze_until_by_name_object_and_positive_index(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    by_name = _flags(tuner.freeze_until("fc1").model)
    by_obj = _flags(tuner.unfreeze().freeze_until(tuner.model.get_layer("fc1")).model)
    by_index = _flags(tuner.unfreeze().freeze_until(4).model)
    assert by_name == by_obj == by_index
    assert [n for n, t in by_name.items() if not t] == ["conv1", "conv2", "pool", "flatten"]


def test_nested_base_names_use_depth_first_leaf_order(nested_model: Pretrained) -> None:
    tuner = FineTuner(nested_model.model)
    order = [layer.name for layer in leaf_layers(tuner.model)]
    assert order == ["base_conv1", "base_conv2", "base_flatten", "base_fc", "top_fc", "top_out"]
    tuner.freeze_until("base_conv2")
    flags = _flags(tuner.model)
    assert flags["base_conv1"] is False
    assert all(flags[n] for n in order[1:])
    assert flags["base"] is True

    tuner.freeze_until("top_fc")
    flags = _flags(tuner.model)
    assert [n for n in order if not flags[n]] == order[:4]
    assert flags["base"] is False
    # The top-level index counts the nested base as one layer.
    tuner.unfreeze().freeze_until(1)
    assert _flags(tuner.model) == flags


def test_nested_freeze_until_trains_only_the_right_weights(
    nested_model: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(nested_model.keras_path).freeze_until("base_fc").compile_sgd(lr=1e-2)
    base = tuner.model.get_layer("base")
    before = {layer.name: weights_of(layer) for layer in leaf_layers(tuner.model)}
    tuner.fit(x, y, epochs=1, verbose=0)
    for name in ("base_conv1", "base_conv2"):
        for a, b in zip(before[name], weights_of(base.get_layer(name)), strict=True):
            np.testing.assert_array_equal(a, b)
    for name in ("base_fc",):
        assert not np.array_equal(before[name][0], weights_of(base.get_layer(name))[0])
    assert not np.array_equal(before["top_out"][0], weights_of(tuner.model.get_layer("top_out"))[0])


def test_freeze_and_unfreeze_with_names_globs_and_classes(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    tuner.freeze()
    assert not any(_flags(tuner.model).values())
    tuner.unfreeze("fc*")
    assert [n for n, t in _flags(tuner.model).items() if t] == ["fc1", "fc2"]
    tuner.unfreeze(keras.layers.Conv2D, "out")
    assert [n for n, t in _flags(tuner.model).items() if t] == [
        "conv1",
        "conv2",
        "fc1",
        "fc2",
        "out",
    ]
    tuner.freeze("conv?", keras.layers.Dense)
    assert [n for n, t in _flags(tuner.model).items() if t] == []
    tuner.unfreeze()
    tuner.freeze("fc2", -1)
    assert [n for n, t in _flags(tuner.model).items() if not t] == ["fc2", "out"]


def test_a_frozen_nested_base_can_be_unfrozen_leaf_by_leaf(nested_model: Pretrained) -> None:
    tuner = FineTuner(nested_model.model).freeze("base")
    assert tuner.model.get_layer("base").trainable is False
    tuner.unfreeze("base_fc")
    flags = _flags(tuner.model)
    # The container must be trainable again, or Keras would hide base_fc's weights.
    assert flags["base"] is True and flags["base_fc"] is True
    assert flags["base_conv1"] is False and flags["base_conv2"] is False
    names = [v.path.split("/")[-2] for v in tuner.model.trainable_weights]
    assert "base_fc" in names and "base_conv1" not in names


def test_select_and_resolve_report_unknown_layers(pretrained: Pretrained) -> None:
    model = FineTuner(pretrained.model).model
    assert [layer.name for layer in select(model, ["conv*"])] == ["conv1", "conv2"]
    assert resolve(model, -1).name == "out"
    with pytest.raises(LayerNotFoundError, match="matches no layer"):
        select(model, ["block9_*"])
    with pytest.raises(LayerNotFoundError, match="no BatchNormalization layer"):
        select(model, [keras.layers.BatchNormalization])


def _bn_stats(model: keras.Model) -> list[np.ndarray]:
    return [
        w.numpy().copy()
        for layer in all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in layer.weights
    ]


def test_batchnorm_frozen_by_default_even_when_unfrozen(
    bn_model: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(bn_model.h5).unfreeze().compile_sgd(lr=1e-2)
    assert tuner.batchnorm == "frozen"
    assert not tuner.model.get_layer("bn1").trainable
    stats = _bn_stats(tuner.model)
    conv = weights_of(tuner.model.get_layer("conv1"))
    tuner.fit(x, y, epochs=2, batch_size=10, verbose=0)
    for a, b in zip(stats, _bn_stats(tuner.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(conv[0], weights_of(tuner.model.get_layer("conv1"))[0])


def test_batchnorm_train_updates_moving_statistics(
    bn_model: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(bn_model.h5, batchnorm="train").compile_sgd(lr=1e-2)
    bn = tuner.model.get_layer("bn1")
    assert bn.trainable
    mean_before = bn.moving_mean.numpy().copy()
    gamma_before = bn.gamma.numpy().copy()
    tuner.fit(x, y, epochs=2, batch_size=10, verbose=0)
    assert not np.array_equal(mean_before, bn.moving_mean.numpy())
    assert not np.array_equal(gamma_before, bn.gamma.numpy())


def test_batchnorm_frozen_policy_also_on_in_place_models(bn_model: Pretrained) -> None:
    model = keras.models.load_model(bn_model.keras_path, compile=False)
    FineTuner(model, copy=False)
    assert model.get_layer("bn1").trainable is False
    assert model.get_layer("conv1").trainable is True
