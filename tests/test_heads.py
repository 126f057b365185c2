"""Cutting a network and building a new head."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import Pretrained, weights_of

from transferkit import ConfigError, FineTuner, LayerNotFoundError
from transferkit.model.heads import build_head, default_cut


def test_default_cut_drops_the_output_layer_and_a_trailing_softmax() -> None:
    inp = keras.Input((4,))
    x = keras.layers.Dense(8, name="a")(inp)
    x = keras.layers.Dense(3, name="logits")(x)
    out = keras.layers.Softmax(name="probs")(x)
    assert default_cut(keras.Model(inp, out)).name == "a"
    assert default_cut(keras.Model(inp, x)).name == "a"


def test_classification_head_shapes_and_fresh_trainable_layers(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.h5).freeze_until("fc2")
    tuner.replace_head(7, hidden=(12,), dropout=0.25)
    model = tuner.model
    assert model.output_shape == (None, 7)
    spec = tuner.head
    assert spec is not None
    assert spec.kind == "classification" and spec.units == 7 and spec.cut_layer == "drop"
    assert spec.layer_names == ("head_dense_1", "head_dropout_1", "head_output")
    assert model.get_layer("head_dropout_1").rate == 0.25
    assert model.get_layer("head_output").activation.__name__ == "linear"  # logits
    assert model.get_layer("fc2").output.shape == (None, 16)
    for name in spec.layer_names:
        assert model.get_layer(name).trainable
    # Kept layers keep pre-trained weights and frozen state.
    assert model.get_layer("conv1").trainable is False
    assert model.get_layer("fc2").trainable is True
    np.testing.assert_array_equal(
        weights_of(model.get_layer("fc1"))[0], weights_of(pretrained.model.get_layer("fc1"))[0]
    )
    x = np.zeros((3, 8, 8, 1), "float32")
    assert tuner.model.predict(x, verbose=0).shape == (3, 7)


@pytest.mark.parametrize(
    ("pool", "cls", "kernel_rows"),
    [
        ("flatten", keras.layers.Flatten, 4 * 4 * 16),
        ("avg", keras.layers.GlobalAveragePooling2D, 16),
        ("max", keras.layers.GlobalMaxPooling2D, 16),
    ],
)
def test_spatial_cut_is_pooled_to_one_vector(
    pretrained: Pretrained, pool: str, cls: type, kernel_rows: int
) -> None:
    tuner = FineTuner(pretrained.keras_path).replace_head(
        regression=True,
        outputs=2,
        at="pool",
        pool=pool,  # type: ignore[arg-type]
    )
    first = tuner.model.get_layer(f"head_{pool}")
    assert isinstance(first, cls)
    assert tuner.model.get_layer("head_dense_1").kernel.shape == (kernel_rows, 64)
    assert tuner.model.output_shape == (None, 2)


def test_head_without_hidden_layers_and_new_names_avoid_clashes(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model).replace_head(3, hidden=())
    assert tuner.head is not None and tuner.head.layer_names == ("head_output",)
    tuner.replace_head(regression=True, at="head_output", hidden=(4,))
    assert tuner.head is not None
    assert tuner.head.layer_names == ("head_dense_1", "head_output_2")
    assert tuner.model.output_shape == (None, 1)


def test_cut_inside_a_nested_base(nested_model: Pretrained) -> None:
    tuner = FineTuner(nested_model.model).replace_head(4, at="base_flatten", hidden=(8,))
    names = [layer.name for layer in tuner.model.layers]
    assert "base_fc" not in names and "top_fc" not in names
    assert tuner.model.output_shape == (None, 4)
    kept = tuner.model.get_layer("base_conv2")
    orig = nested_model.model.get_layer("base").get_layer("base_conv2")
    np.testing.assert_array_equal(kept.kernel.numpy(), orig.kernel.numpy())


def test_residual_model_head(residual_model: Pretrained) -> None:
    tuner = FineTuner(residual_model.h5).replace_head(regression=True, at="concat", pool="avg")
    assert tuner.model.output_shape == (None, 1)
    assert isinstance(tuner.model.get_layer("head_avg"), keras.layers.GlobalAveragePooling2D)
    names = {layer.name for layer in tuner.model.layers}
    assert {"stem", "branch", "add", "side", "concat"} <= names


def test_head_spec_to_dict(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model).replace_head(regression=True, at=-6)
    assert tuner.head is not None
    assert tuner.head.to_dict() == {
        "kind": "regression",
        "units": 1,
        "cut_layer": "pool",
        "hidden": (64,),
        "activation": "relu",
        "dropout": 0.0,
        "pool": "flatten",
        "layer_names": ("head_flatten", "head_dense_1", "head_output"),
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 3, "regression": True}, "exactly one"),
        ({}, "num_classes=N"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"regression": True, "outputs": 0}, "outputs must be"),
        ({"num_classes": 3, "hidden": 64}, "hidden must be a sequence"),
        ({"num_classes": 3, "hidden": (0,)}, "hidden layer sizes"),
        ({"num_classes": 3, "dropout": 1.0}, "dropout must be"),
        ({"num_classes": 3, "pool": "mean"}, "pool must be one of"),
        ({"num_classes": 3, "activation": "nope"}, "unknown activation"),
    ],
)
def test_invalid_head_arguments_leave_the_model_as_it_was(
    pretrained: Pretrained, kwargs: dict[str, object], match: str
) -> None:
    tuner = FineTuner(pretrained.model)
    model = tuner.model
    with pytest.raises(ConfigError, match=match):
        tuner.replace_head(**kwargs)  # type: ignore[arg-type]
    assert tuner.model is model and tuner.head is None


def test_a_vector_cut_needs_no_pooling(pretrained: Pretrained) -> None:
    model, spec = build_head(FineTuner(pretrained.model).model, num_classes=3, at="fc2", pool="avg")
    assert spec.layer_names == ("head_dense_1", "head_output")
    assert model.output_shape == (None, 3)


def test_unknown_cut_layer(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    with pytest.raises(LayerNotFoundError, match="'fc1'"):
        tuner.replace_head(3, at="fc_1")
    assert tuner.head is None
