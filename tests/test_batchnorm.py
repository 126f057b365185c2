"""`FineTuner.adapt_batchnorm`: exact pooled statistics, layer after layer, nothing else moves."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Digits, Pretrained

from transferkit import ConfigError, DataError, FineTuner


def _two_bn_model() -> keras.Model:
    """conv -> BN -> relu -> flatten -> dense -> BN -> dense, with moved statistics."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(6, name="fc")(x)
    x = keras.layers.BatchNormalization(name="bn_fc")(x)
    out = keras.layers.Dense(3, name="out")(x)
    model = keras.Model(inp, out, name="two_bn")
    rng = np.random.default_rng(0)
    for layer in (model.get_layer("bn_conv"), model.get_layer("bn_fc")):
        n = layer.moving_mean.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        layer.beta.assign(rng.normal(size=n).astype("float32"))
        layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 3.0, n).astype("float32"))
    return model


def _numpy_reference(model: keras.Model, x: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """The statistics computed by hand: population moments in float64 over all of x."""
    conv = model.get_layer("conv")
    a = keras.ops.convert_to_numpy(conv(x)).astype(np.float64)
    m1, v1 = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))  # ddof=0
    bn1 = model.get_layer("bn_conv")
    g1, b1 = bn1.gamma.numpy().astype(np.float64), bn1.beta.numpy().astype(np.float64)
    h = np.maximum((a - m1) / np.sqrt(v1 + bn1.epsilon) * g1 + b1, 0.0).reshape(len(x), -1)
    fc = model.get_layer("fc")
    z = h @ fc.kernel.numpy().astype(np.float64) + fc.bias.numpy().astype(np.float64)
    return {"bn_conv": (m1, v1), "bn_fc": (z.mean(axis=0), z.var(axis=0))}


def test_exact_pooled_statistics_layer_after_layer(digits: Digits) -> None:
    model = _two_bn_model()
    x = digits.x_new[:101]  # batches of 16 leave a ragged last batch of 5
    tuner = FineTuner(model, copy=False)
    others = {
        v.path: v.numpy().copy()
        for v in model.weights
        if not v.path.endswith(("moving_mean", "moving_variance"))
    }
    assert tuner.adapt_batchnorm(x, batch_size=16) is tuner
    ref = _numpy_reference(model, x)
    for name, (mean, var) in ref.items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)
    for v in model.weights:
        if v.path in others:
            np.testing.assert_array_equal(v.numpy(), others[v.path], err_msg=v.path)


def test_steps_limits_the_batches_and_datasets_match_arrays(digits: Digits) -> None:
    x = digits.x_new[:90]
    a = _two_bn_model()
    FineTuner(a, copy=False).adapt_batchnorm(x, batch_size=20, steps=2)
    ref = _numpy_reference(a, x[:40])
    np.testing.assert_allclose(a.get_layer("bn_fc").moving_variance.numpy(), ref["bn_fc"][1], 1e-5)
    b = _two_bn_model()
    ds = tf.data.Dataset.from_tensor_slices((x[:40], np.zeros(40))).batch(20)
    FineTuner(b, copy=False).adapt_batchnorm(ds)
    for name in ("bn_conv", "bn_fc"):
        for attr in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                getattr(b.get_layer(name), attr).numpy(),
                getattr(a.get_layer(name), attr).numpy(),
                rtol=1e-5,
                atol=1e-6,
            )


def test_variance_convention_matches_keras_batchnormalization(digits: Digits) -> None:
    # A momentum-0 BN layer trained on one full batch stores that batch's moments: compare.
    x = digits.x_new[:64]
    keras_bn = keras.layers.BatchNormalization(momentum=0.0)
    keras_bn(x, training=True)
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.BatchNormalization(name="bn")(inp))
    FineTuner(model, copy=False).adapt_batchnorm(x, batch_size=10)
    ours = model.get_layer("bn")
    np.testing.assert_allclose(ours.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-5
    )


def test_pretrained_bn_model_through_the_tuner(bn_model: Pretrained, digits: Digits) -> None:
    tuner = FineTuner(bn_model.h5)
    before = tuner.model.predict(digits.x_new[:32], verbose=0)
    bn2 = tuner.model.get_layer("bn2")
    old_mean = bn2.moving_mean.numpy().copy()
    tuner.adapt_batchnorm(digits.x_new)
    assert not np.allclose(bn2.moving_mean.numpy(), old_mean)
    assert not np.allclose(tuner.model.predict(digits.x_new[:32], verbose=0), before)
    # bn2's statistics are those of its inputs on the new data, computed with bn1 already adapted.
    probe = keras.Model(tuner.model.inputs, tuner.model.get_layer("conv2").output)
    feats = probe.predict(digits.x_new, verbose=0).astype(np.float64)
    np.testing.assert_allclose(bn2.moving_mean.numpy(), feats.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), feats.var(axis=(0, 1, 2)), rtol=1e-4)


def test_nested_batchnorm_is_reached(digits: Digits) -> None:
    keras.utils.set_random_seed(3)
    b_in = keras.Input((8, 8, 1))
    b = keras.layers.Conv2D(4, 3, name="b_conv")(b_in)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    base = keras.Model(b_in, b, name="base")
    inp = keras.Input((8, 8, 1))
    out = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(base(inp)))
    model = keras.Model(inp, out)
    FineTuner(model, copy=False).adapt_batchnorm(digits.x_new[:50])
    feats = keras.ops.convert_to_numpy(base.get_layer("b_conv")(digits.x_new[:50])).astype(
        np.float64
    )
    np.testing.assert_allclose(
        base.get_layer("b_bn").moving_variance.numpy(), feats.var(axis=(0, 1, 2)), rtol=1e-5
    )


def test_errors_leave_the_model_unchanged(pretrained: Pretrained, digits: Digits) -> None:
    with pytest.raises(ConfigError, match="no BatchNormalization"):
        FineTuner(pretrained.keras_path).adapt_batchnorm(digits.x_new)
    model = _two_bn_model()
    before = [v.numpy().copy() for v in model.weights]
    tuner = FineTuner(model, copy=False)
    with pytest.raises(ConfigError, match="batch_size"):
        tuner.adapt_batchnorm(digits.x_new, batch_size=0)
    with pytest.raises(ConfigError, match="steps"):
        tuner.adapt_batchnorm(digits.x_new, steps=0)
    with pytest.raises(DataError, match="do not fit"):
        tuner.adapt_batchnorm(np.zeros((4, 8, 8), "float32"))
    with pytest.raises(DataError, match="empty"):
        tuner.adapt_batchnorm(np.zeros((0, 8, 8, 1), "float32"))
    for old, v in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, v.numpy())
