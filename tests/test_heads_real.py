"""The default cut on architectures people bring: keras.applications bases and classifiers,
keras-hub backbones (built from config, random weights), models with several outputs."""

from __future__ import annotations

import re
from typing import Any

import hub_models
import keras
import keras_hub
import numpy as np
import pytest

from transferkit import ConfigError, FineTuner, LayerNotFoundError
from transferkit.model.heads import build_head, classifier_layers, default_cut
from transferkit.train.cache.plan import plan_cache
from transferkit.train.phases import head_layers

IMAGE = (32, 32, 3)


def images(n: int = 8, shape: tuple[int, ...] = IMAGE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *shape)).astype("float32"), np.arange(n) % 3


def _bare(name: str) -> str:
    """`name` without the process-wide counter suffix Keras adds to auto-named layers."""
    return re.sub(r"_\d+$", "", name)


def layer_names(model: keras.Model) -> set[str]:
    return {layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}


def dropped(model: keras.Model, **head: Any) -> tuple[set[str], keras.Model]:
    """The names of the original layers a new head replaces, and the new model."""
    new, _spec = build_head(model, **{"num_classes": 3, "hidden": (), "pool": "avg", **head})
    assert new.output_shape == (None, 3)
    return layer_names(model) - layer_names(new), new


def fit_moves_the_head(tuner: FineTuner, x: Any, y: np.ndarray) -> None:
    """A short fit trains the new output layer (its kernel changes, the loss is finite).

    The base is frozen and deterministic, so the fit runs on cached features (`cache=True`
    raises otherwise): tracing only the small head keeps these tests fast.
    """
    head = tuner.model.get_layer("head_output")
    before = head.kernel.numpy().copy()
    tuner.compile(keras.optimizers.Adam(0.05), jit_compile=False)
    result = tuner.fit(x, y, epochs=1, batch_size=8, verbose=0, cache=True)
    assert result.cached
    assert np.isfinite(result.history["loss"][0])
    assert not np.allclose(head.kernel.numpy(), before)


# ------------------------------------------------------------ models without a classifier


@pytest.mark.parametrize(
    ("build", "last"),
    [
        (lambda: keras.applications.ResNet50(input_shape=IMAGE, weights=None, include_top=False),
         "conv5_block3_out"),
        (lambda: keras.applications.MobileNetV2(input_shape=IMAGE, weights=None, include_top=False),
         "out_relu"),
        # Pooled features (rank 2) are no class scores either: the walk stops at the pooling.
        (lambda: keras.applications.MobileNetV2(
            input_shape=IMAGE, weights=None, include_top=False, alpha=0.35, pooling="avg"),
         "global_average_pooling2d"),
    ],
    ids=["resnet50", "mobilenetv2", "mobilenetv2-pooled"],
)  # fmt: skip
def test_applications_bases_keep_every_layer(build: Any, last: str) -> None:
    base = build()
    cut = default_cut(base)
    # Auto-named layers take a process-wide counter suffix (`_1`) when tests ran before.
    assert _bare(cut.name) == last and cut.removed == ()
    lost, new = dropped(base)
    assert lost == set()
    # The head reads the base's own output: the residual sum and the last BN/ReLU stay.
    assert new.get_layer(cut.name).output.shape == base.output.shape
    assert classifier_layers(base) == []


def test_spatial_conv_and_sequence_dense_outputs_are_features() -> None:
    # A 1x1 convolution over a 4x4 map and a Dense over 5 time steps, each flattened, compute
    # features per position: not a classifier, nothing is cut.
    inp = keras.Input((4, 4, 8))
    x = keras.layers.Conv2D(6, 1, name="pointwise")(inp)
    out = keras.layers.Flatten(name="flat")(x)
    assert default_cut(keras.Model(inp, out)).removed == ()
    seq = keras.Input((5, 8))
    y = keras.layers.Dense(6, name="per_step")(seq)
    out = keras.layers.Flatten(name="flat")(y)
    cut = default_cut(keras.Model(seq, out))
    assert cut.removed == () and cut.name == "flat"


# ------------------------------------------------------------------ models with a classifier


def test_mobilenetv3_loses_exactly_its_conv_classifier() -> None:
    model = keras.applications.MobileNetV3Small(
        input_shape=IMAGE, weights=None, minimalistic=True, alpha=0.75
    )
    cut = default_cut(model)
    assert _bare(cut.name) == "dropout"
    assert [_bare(layer.name) for layer in cut.removed] == ["predictions", "flatten", "logits"]
    lost, new = dropped(model)
    assert {_bare(name) for name in lost} == {"logits", "flatten", "predictions"}
    assert new.get_layer(cut.name).output.shape == (None, 1, 1, 1024)
    assert [_bare(layer.name) for layer in head_layers(model, None)] == [
        "logits",
        "flatten",
        "predictions",
    ]
    x, y = images()
    tuner = FineTuner(model).replace_head(3, hidden=(), pool="flatten").freeze_until("head_flatten")
    assert tuner.model.get_layer("head_output").kernel.shape == (1024, 3)
    fit_moves_the_head(tuner, x, y)


def test_dense_classifiers_lose_their_dense_only() -> None:
    top = keras.applications.MobileNetV2(
        input_shape=IMAGE, weights=None, include_top=True, alpha=0.35
    )
    assert default_cut(top).name == top.layers[-2].name  # the global pooling
    assert dropped(top)[0] == {"predictions"}  # the softmax is the Dense's own activation
    seq = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(5, name="scores"),
            keras.layers.Dropout(0.2, name="late_drop"),
            keras.layers.Softmax(name="probs"),
        ]
    )
    assert dropped(seq)[0] == {"scores", "late_drop", "probs"}
    assert default_cut(seq).name == "gap"


def test_a_1d_conv_classifier_after_pooling_that_kept_its_axis() -> None:
    inp = keras.Input((10, 4))
    x = keras.layers.Conv1D(8, 3, name="feat")(inp)
    x = keras.layers.GlobalAveragePooling1D(keepdims=True, name="gap")(x)
    x = keras.layers.Conv1D(5, 1, name="logits")(x)
    x = keras.layers.Reshape((5,), name="reshape")(x)
    out = keras.layers.Activation("softmax", name="probs")(x)
    lost, new = dropped(keras.Model(inp, out))
    assert lost == {"logits", "reshape", "probs"}
    assert new.get_layer("gap").output.shape == (None, 1, 8)


def test_the_walk_enters_and_leaves_nested_models() -> None:
    # The classifier sits inside a nested model: the cut falls inside it.
    b_in = keras.Input((8, 8, 1))
    b = keras.layers.Conv2D(4, 3, name="b_conv")(b_in)
    b = keras.layers.GlobalAveragePooling2D(name="b_gap")(b)
    b = keras.layers.Dense(5, activation="softmax", name="b_scores")(b)
    inner = keras.Model(b_in, b, name="inner")
    inp = keras.Input((8, 8, 1))
    outer = keras.Model(inp, keras.layers.Activation("linear", name="ident")(inner(inp)))
    cut = default_cut(outer)
    assert cut.name == "b_gap" and cut.inline
    new, _ = build_head(outer, num_classes=3, hidden=())
    assert "b_conv" in layer_names(new) and "b_scores" not in layer_names(new)
    # The nested model holds only the softmax: the walk climbs back out to the Dense.
    s_in = keras.Input((5,))
    probs = keras.Model(s_in, keras.layers.Softmax(name="s_softmax")(s_in), name="probs")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, probs(keras.layers.Dense(5, name="scores")(x)))
    cut = default_cut(model)
    assert cut.name == "gap" and not cut.inline
    assert [layer.name for layer in cut.removed] == ["s_softmax", "scores"]
    assert dropped(model)[0] == {"scores", "probs"}


def test_a_classifier_on_the_input_leaves_nothing() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="only")])
    with pytest.raises(ConfigError, match="reads the model's input"):
        default_cut(model)


# ----------------------------------------------------------------------------- keras-hub


def test_hub_resnet_backbone_keeps_every_layer_and_trains_a_head() -> None:
    backbone = hub_models.resnet()
    assert default_cut(backbone).removed == ()
    lost, new = dropped(backbone)
    assert lost == set()
    # The last block's residual sum keeps both branches, the shortcut included.
    assert {"stack1_block0_0_conv", "stack1_block0_0_bn", "stack1_block0_add"} <= layer_names(new)
    x, y = images()
    tuner = FineTuner(backbone).replace_head(3, hidden=(), pool="avg").freeze_until("head_avg")
    assert tuner.head is not None and tuner.head.cut_layer == "stack1_block0_out"
    fit_moves_the_head(tuner, x, y)


def test_hub_tasks_lose_their_classifier_dense_only() -> None:
    image_task = keras_hub.models.ImageClassifier(backbone=hub_models.resnet(), num_classes=4)
    cut = default_cut(image_task)
    assert cut.name == "output_dropout" and [layer.name for layer in cut.removed] == ["predictions"]
    assert dropped(image_task)[0] == {"predictions"}
    text_task = keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(), num_classes=3, preprocessor=None
    )
    assert dropped(text_task)[0] == {"logits"}
    assert default_cut(text_task).name == "classifier_dropout"


def test_hub_dinov2_head_goes_on_the_final_norm() -> None:
    dino = hub_models.dinov2(
        patch_size=14,
        num_layers=1,
        image_shape=(28, 28, 3),
        position_embedding_shape=(518, 518, 3),  # keras-hub's default
    )
    model, spec = build_head(dino, num_classes=3, hidden=(), pool="avg")
    assert spec.cut_layer == "layernorm" and model.output_shape == (None, 3)
    assert layer_names(dino) <= layer_names(model)
    # Its encoder returns the sequence and a dict of per-layer outputs: the message says which
    # layer to cut at instead.
    with pytest.raises(ConfigError, match=r"'encoder' returns \d tensors .*'layernorm'"):
        build_head(dino, num_classes=3, at="encoder")
    # Its Dropout layers have rate 0: a frozen DINOv2 is cached through the encoder.
    tuner = FineTuner(dino).freeze_until("layernorm").replace_head(3, hidden=(), pool="avg")
    plan = plan_cache(tuner.model)
    assert plan.cut_layer == "encoder" and plan.prefix_layers == ["embeddings", "encoder"]


def tiny_bert() -> keras.Model:
    # dropout=0.0: its Dropout layers draw nothing, so the frozen encoder can be cached.
    return hub_models.bert(num_layers=1, max_sequence_length=16, dropout=0.0)


def test_bert_lists_its_outputs_and_takes_an_output_name() -> None:
    bert = tiny_bert()
    with pytest.raises(ConfigError) as info:
        FineTuner(bert).replace_head(3)
    message = str(info.value)
    assert "2 outputs" in message
    assert "'pooled_output' (None, 16)" in message
    assert "'sequence_output' (None, None, 16)" in message
    with pytest.raises(LayerNotFoundError, match="'pooled_output' \\(None, 16\\)"):
        FineTuner(bert).replace_head(3, at="pooled")
    tuner = FineTuner(bert).replace_head(3, at="pooled_output", hidden=())
    assert tuner.head is not None and tuner.head.cut_layer == "pooled_dense"
    tuner.freeze_until("head_output")
    assert tuner.model.output_shape == (None, 3)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 50, (8, 16)).astype("int32"),
        "segment_ids": np.zeros((8, 16), "int32"),
        "padding_mask": np.ones((8, 16), "int32"),
    }
    fit_moves_the_head(tuner, x, np.arange(8) % 3)


def test_several_outputs_are_listed_and_one_is_chosen_by_layer_name() -> None:
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, name="shared")(inp)
    a = keras.layers.Dense(2, name="a")(h)
    b = keras.layers.Dense(3, name="b")(h)
    model = keras.Model(inp, [a, b])
    with pytest.raises(ConfigError, match=r"2 outputs: 'a' \(None, 2\), 'b' \(None, 3\)"):
        default_cut(model)
    new, spec = build_head(model, num_classes=4, at="b", hidden=())
    assert spec.cut_layer == "b" and new.output_shape == (None, 4)
    with pytest.raises(ConfigError, match="'a' \\(None, 2\\)"):
        head_layers(model, None)


def test_fine_tune_without_a_head_on_a_backbone_asks_for_replace_head() -> None:
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    base = keras.Model(inp, keras.layers.ReLU(name="relu")(x), name="base")
    with pytest.raises(ConfigError, match=r"no classifier .*replace_head"):
        head_layers(base, None)
    tuner = FineTuner(base).compile("adam", loss="mse")
    weights = [w.numpy().copy() for w in tuner.model.weights]
    with pytest.raises(ConfigError, match=r"no classifier .*replace_head"):
        tuner.fine_tune(np.zeros((4, 8, 8, 1)), np.zeros((4, 6, 6, 4)), head_epochs=1, epochs=1)
    assert all(
        np.array_equal(w.numpy(), v) for w, v in zip(tuner.model.weights, weights, strict=True)
    )
