"""`FineTuner(dropout=...)`: Dropout-family layers inside frozen ranges in inference mode, in plain
fit and in the feature cache, while the new head keeps its Dropout."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import Pretrained

from transferkit import FineTuner
from transferkit.errors import ConfigError
from transferkit.model.dropout import apply_dropout_policy, runs_in_inference
from transferkit.train.cache.layers import layer_blocker
from transferkit.train.cache.plan import plan_cache

FIT = {"epochs": 3, "batch_size": 16, "verbose": 0, "shuffle": False}


def close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True)
    )


def mlp(*, base_drop: float | None, head_drop: float | None) -> keras.Model:
    """base (frozen) -> [Dropout] -> hidden (trained) -> [Dropout] -> out, fixed initial weights."""
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(12, activation="relu", name="base", trainable=False)(inp)
    if base_drop is not None:
        h = keras.layers.Dropout(base_drop, name="base_drop", trainable=False)(h)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    if head_drop is not None:
        h = keras.layers.Dropout(head_drop, name="head_drop")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="out")(h))
    rng = np.random.default_rng(3)  # the same weights whichever Dropout layers there are
    model.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") for w in model.get_weights()])
    return model


def trained(model: keras.Model, x: np.ndarray, y: np.ndarray, **kw: object) -> list[np.ndarray]:
    tuner = FineTuner(model, **kw)  # type: ignore[arg-type]
    tuner.compile_sgd(lr=0.05, loss="mse")
    tuner.fit(x, y, cache=False, **FIT)
    return [tuner.model.get_layer(n).get_weights()[0] for n in ("hidden", "out")]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def test_frozen_dropout_is_identity_in_plain_fit(data: tuple[np.ndarray, np.ndarray]) -> None:
    without = trained(mlp(base_drop=None, head_drop=None), *data)
    frozen = trained(mlp(base_drop=0.9, head_drop=None), *data, dropout="frozen")
    live = trained(mlp(base_drop=0.9, head_drop=None), *data, dropout="train")
    assert close(frozen, without)  # the frozen Dropout(0.9) never dropped anything
    assert not close(live, without)  # Keras semantics: it did


def test_the_heads_dropout_stays_live(data: tuple[np.ndarray, np.ndarray]) -> None:
    without = trained(mlp(base_drop=None, head_drop=None), *data, dropout="frozen")
    with_head = trained(mlp(base_drop=None, head_drop=0.5), *data, dropout="frozen")
    assert not close(with_head, without)
    tuner = FineTuner(mlp(base_drop=0.9, head_drop=0.5), dropout="frozen")
    model = tuner.model
    assert runs_in_inference(model.get_layer("base_drop"))
    assert not runs_in_inference(model.get_layer("head_drop"))
    probe = keras.Model(model.input, [model.get_layer(n).output for n in ("base", "base_drop")])
    base, dropped = probe(data[0], training=True)
    assert np.array_equal(np.asarray(base), np.asarray(dropped))
    # An unfrozen range gets Keras semantics back at once: the flag is read at call time.
    model.get_layer("base_drop").trainable = True
    base, dropped = probe(data[0], training=True)
    assert not np.array_equal(np.asarray(base), np.asarray(dropped))


def test_policy_is_checked_reversible_and_recorded(data: tuple[np.ndarray, np.ndarray]) -> None:
    for bad in ("inference", True, None):
        with pytest.raises(ConfigError, match="dropout must be 'train'"):
            FineTuner(mlp(base_drop=0.5, head_drop=None), dropout=bad)  # type: ignore[arg-type]
    tuner = FineTuner(mlp(base_drop=0.5, head_drop=None), dropout="frozen")
    layer = tuner.model.get_layer("base_drop")
    assert layer_blocker(layer) is None  # the identity while frozen: cacheable
    tuner.compile_sgd(lr=0.01, loss="mse")
    result = tuner.fit(*data, epochs=1, verbose=0)
    assert result.provenance["fit_arguments"]["dropout"] == "frozen"
    assert tuner.dropout == "frozen"
    apply_dropout_policy(tuner.model, "train")
    assert not runs_in_inference(layer) and "call" not in vars(layer)
    assert layer_blocker(layer) == "is random in training mode (Dropout)"


def test_cut_moves_past_frozen_dropout_and_stays_exact(
    pretrained: Pretrained, data: tuple[np.ndarray, np.ndarray]
) -> None:
    del data
    # The pre-trained CNN ends fc1, fc2, drop(0.1), out; with `out` alone trained, the
    # cut falls before `drop` under Keras semantics and after it under dropout="frozen".
    train = FineTuner(pretrained.model).freeze_until("out")
    assert plan_cache(train.model).cut_layer == "fc2"
    tuner = FineTuner(pretrained.model, dropout="frozen").freeze_until("out")
    assert plan_cache(tuner.model).cut_layer == "drop"
    rng = np.random.default_rng(1)
    x = rng.random((48, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, 48)
    start = tuner.model.get_weights()
    tuner.compile_sgd(lr=0.05)
    plain = tuner.fit(x, y, cache=False, **FIT)
    plain_w = tuner.model.get_weights()
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=0.05)
    cached = tuner.fit(x, y, cache=True, **FIT)
    assert cached.cached and cached.cache_layer == "drop" and not plain.cached
    assert close(plain_w, tuner.model.get_weights())


def test_frozen_efficientnet_is_cached_to_its_end() -> None:
    # Stochastic depth: every EfficientNet block from block2a on ends in a Dropout.
    base = keras.applications.EfficientNetB0(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    base.trainable = False
    inp = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(base(inp))
    model = keras.Model(inp, keras.layers.Dense(3, name="new_head")(pooled))
    # copy=False: copying EfficientNet twice would dominate the test's time.
    keras_semantics = plan_cache(FineTuner(model, copy=False).model)
    assert keras_semantics.cut_layer == "block2a_project_bn"
    tuner = FineTuner(model, copy=False, dropout="frozen")
    plan = plan_cache(tuner.model)
    assert plan.cut_layer == "gap" and "top_activation" in plan.prefix_layers
    assert "block6d_drop" in plan.prefix_layers
    rng = np.random.default_rng(2)
    x = rng.random((16, 32, 32, 3)).astype("float32") * 255
    tuner.compile("adam")
    result = tuner.fit(x, rng.integers(0, 3, 16), epochs=2, batch_size=8, verbose=0, cache=True)
    assert result.cached and result.cache_layer == "gap"


# ------------------------------------------------------------------- stochastic depth


def drop_path_model(layer: keras.layers.Layer) -> keras.Model:
    """base (frozen) -> a stochastic-depth layer (frozen) -> hidden -> out, fixed weights."""
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(12, activation="relu", name="base", trainable=False)(inp)
    layer.trainable = False
    h = layer(h)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="out")(h))
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") for w in model.get_weights()])
    return model


class StochasticDepth(keras.layers.Layer):  # type: ignore[misc]
    """A user's stochastic depth: unseeded `keras.random`, no SeedGenerator, no Keras base."""

    def __init__(self, drop_rate: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.drop_rate = drop_rate

    def call(self, inputs: object, training: bool | None = None) -> object:
        if not training or self.drop_rate == 0.0:
            return inputs
        keep = keras.random.uniform(keras.ops.shape(inputs)) > self.drop_rate
        return keras.ops.where(keep, inputs / (1.0 - self.drop_rate), 0.0)


def _dino_drop_path(rate: float) -> keras.layers.Layer:
    from keras_hub.src.models.dinov2.dinov2_layers import (  # type: ignore[import-untyped]
        DINOV2DropPath,
    )

    return DINOV2DropPath(rate, name="drop_path")


@pytest.mark.parametrize(
    "make",
    [_dino_drop_path, lambda rate: StochasticDepth(rate, name="drop_path")],
    ids=["keras-hub DINOV2DropPath", "custom StochasticDepth"],
)
def test_stochastic_depth_without_a_seed_generator_is_random_unless_frozen(
    make: object, data: tuple[np.ndarray, np.ndarray]
) -> None:
    # Neither layer owns a SeedGenerator: only its class name and rate say it draws.
    assert layer_blocker(make(0.5)) == (  # type: ignore[operator]
        f"is random in training mode ({type(make(0.5)).__name__}, rate 0.5)"  # type: ignore[operator]
    )
    assert layer_blocker(make(0.0)) is None  # type: ignore[operator]
    live = FineTuner(drop_path_model(make(0.5)))  # type: ignore[operator]
    assert plan_cache(live.model).cut_layer == "base"  # the cut stops before it
    x, y = data
    without = trained(drop_path_model(make(0.0)), x, y)  # type: ignore[operator]
    frozen = trained(drop_path_model(make(0.5)), x, y, dropout="frozen")  # type: ignore[operator]
    assert close(frozen, without)  # in inference mode it is the identity
    # Under "frozen" the cache reaches past it and equals plain fit.
    tuner = FineTuner(drop_path_model(make(0.5)), dropout="frozen")  # type: ignore[operator]
    assert plan_cache(tuner.model).cut_layer == "drop_path"
    tuner.compile_sgd(lr=0.05, loss="mse")
    result = tuner.fit(x, y, cache=True, **FIT)
    assert result.cached
    cached = [tuner.model.get_layer(n).get_weights()[0] for n in ("hidden", "out")]
    assert close(cached, without)
