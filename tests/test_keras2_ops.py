"""Keras 2 op layers on every backend: the `keras.ops` equivalents of the TensorFlow functions.

On TensorFlow a `TFOpLambda` calls the TensorFlow function; on JAX (and PyTorch) it calls the
equivalent in `transferkit.model.keras2.ops`. Each equivalent is checked here against the
function it replaces (same parameter names, same values), and a Keras 2 file full of op layers
loads, predicts as Keras 2 did and fine-tunes on the backend this suite runs on. This file runs
in both passes of `make test`.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from transferkit import FineTuner, ModelLoadError
from transferkit.model.keras2.layers import TFOpLambda
from transferkit.model.keras2.ops import EQUIVALENTS, needs_tensorflow

KERAS2 = Path(__file__).parent / "data" / "keras2"
RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 3, 4)).astype("float32")
Y = RNG.normal(size=(2, 3, 4)).astype("float32")
POS = (np.abs(X) + 0.5).astype("float32")
IMAGES = RNG.random((2, 4, 6, 3)).astype("float32")

# One call per equivalent, by TensorFlow's parameter names, with inputs inside its domain.
CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "__operators__.add": ((X,), {"y": Y}),
    "math.add": ((X,), {"y": Y}),
    "math.subtract": ((X,), {"y": 2.0}),
    "math.multiply": ((X,), {"y": Y}),
    "math.truediv": ((X,), {"y": 127.5}),
    "math.divide": ((X,), {"y": POS}),
    "math.floordiv": ((X * 4,), {"y": POS}),
    "math.pow": ((POS,), {"y": 1.5}),
    "math.maximum": ((X,), {"y": Y}),
    "math.minimum": ((X,), {"y": 0.0}),
    "math.squared_difference": ((X,), {"y": Y}),
    "math.negative": ((X,), {}),
    "math.abs": ((X,), {}),
    "math.exp": ((X,), {}),
    "math.log": ((POS,), {}),
    "math.sqrt": ((POS,), {}),
    "math.rsqrt": ((POS,), {}),
    "math.square": ((X,), {}),
    "math.reciprocal": ((POS,), {}),
    "math.sign": ((X,), {}),
    "math.sin": ((X,), {}),
    "math.cos": ((X,), {}),
    "math.tanh": ((X,), {}),
    "math.sigmoid": ((X,), {}),
    "math.reduce_mean": ((X,), {"axis": [1, 2], "keepdims": True}),
    "math.reduce_sum": ((X,), {"axis": -1}),
    "math.reduce_max": ((X,), {"axis": 1, "keepdims": False}),
    "math.reduce_min": ((X,), {}),
    "math.reduce_prod": ((POS,), {"axis": 0}),
    "math.l2_normalize": ((X,), {"axis": -1}),
    "nn.l2_normalize": ((X,), {"axis": [1, 2], "epsilon": 1e-6}),
    "nn.relu": ((X,), {}),
    "nn.relu6": ((X * 5,), {}),
    "nn.elu": ((X,), {}),
    "nn.selu": ((X,), {}),
    "nn.softplus": ((X,), {}),
    "nn.softsign": ((X,), {}),
    "nn.gelu": ((X,), {"approximate": True}),
    "nn.silu": ((X,), {"beta": 1.5}),
    "nn.swish": ((X,), {}),
    "nn.leaky_relu": ((X,), {"alpha": 0.1}),
    "nn.softmax": ((X,), {"axis": 1}),
    "nn.log_softmax": ((X,), {}),
    "reshape": ((X,), {"shape": [-1, 12]}),
    "concat": (([X, Y],), {"axis": -1}),
    "stack": (([X, Y],), {"axis": 1}),
    "expand_dims": ((X,), {"axis": -1}),
    "squeeze": ((X[:, :1],), {"axis": 1}),
    "transpose": ((X,), {"perm": [0, 2, 1]}),
    "cast": ((X,), {"dtype": "int32"}),
    "identity": ((X,), {}),
    "clip_by_value": ((X,), {"clip_value_min": -0.5, "clip_value_max": 0.5}),
    "linalg.matmul": ((X,), {"b": Y, "transpose_b": True}),
    "image.resize": ((IMAGES,), {"size": [8, 3], "method": "bilinear"}),
}


def _tf_function(name: str) -> Any:
    target: Any = tf
    for part in name.split("."):
        target = getattr(target, part)
    return target


def test_every_equivalent_has_a_call_here() -> None:
    assert sorted(CALLS) == sorted(EQUIVALENTS)


@pytest.mark.parametrize("name", sorted(EQUIVALENTS))
def test_equivalent_takes_tensorflow_parameter_names_and_computes_the_same(name: str) -> None:
    args, kwargs = CALLS[name]
    function = _tf_function(name)
    ours = set(inspect.signature(EQUIVALENTS[name]).parameters)
    theirs = set(inspect.signature(function).parameters)
    assert ours <= theirs, f"tf.{name} has no parameter {sorted(ours - theirs)}"
    # TensorFlow's operators expect tensors (`x.dtype.base_dtype`), as Keras 2 passed them.
    tensors = tf.nest.map_structure(
        lambda v: tf.constant(v) if isinstance(v, np.ndarray) else v, (args, kwargs)
    )
    want = np.asarray(function(*tensors[0], **tensors[1]))
    got = keras.ops.convert_to_numpy(EQUIVALENTS[name](*args, **kwargs))
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_keras3_model_of_op_layers_runs_and_reloads(tmp_path: Path) -> None:
    # Built directly (as a saved transferkit result holds them), on the backend in use.
    inp = keras.Input((3, 4))
    a = TFOpLambda("math.reduce_mean", name="mean")(inp, axis=1, keepdims=True)
    b = TFOpLambda("nn.softmax", name="softmax")(a, axis=-1)
    c = TFOpLambda("transpose", name="swap")(inp, perm=[0, 2, 1])
    d = TFOpLambda("reshape", name="flat")(c, shape=[-1, 12])
    out = keras.layers.Concatenate()([keras.layers.Flatten()(b), d])
    model = keras.Model(inp, out)
    x = X
    mean = X.mean(axis=1, keepdims=True)
    soft = np.exp(mean) / np.exp(mean).sum(-1, keepdims=True)
    want = np.concatenate([soft.reshape(2, -1), X.transpose(0, 2, 1).reshape(2, 12)], axis=1)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "ops.keras")
    again = keras.models.load_model(tmp_path / "ops.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


def test_keras2_op_layer_file_predicts_as_keras2_and_fine_tunes() -> None:
    io = np.load(KERAS2 / "tf_ops_io.npz")
    tuner = FineTuner(KERAS2 / "tf_ops.h5")
    classes = {type(layer).__name__ for layer in tuner.model.layers}
    assert {"TFOpLambda", "SlicingOpLambda"} <= classes
    np.testing.assert_allclose(tuner.model.predict(io["x"], verbose=0), io["y"], atol=1e-5)
    result = tuner.replace_head(num_classes=2, hidden=()).compile_sgd(lr=0.05)
    head = result.model.get_layer("head_output")
    before = head.kernel.numpy().copy()
    fitted = result.fit(io["x"], np.array([0, 1, 0, 1]), epochs=2, verbose=0)
    assert np.isfinite(fitted.history["loss"]).all()
    assert not np.allclose(head.kernel.numpy(), before)


def _with_function(src: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        raw = f.attrs["model_config"]
        text = raw.decode() if hasattr(raw, "decode") else str(raw)
        assert f'"function": "{old}"' in text
        f.attrs["model_config"] = text.replace(f'"function": "{old}"', f'"function": "{new}"')
    return dst


def test_an_op_without_an_equivalent_needs_tensorflow(tmp_path: Path) -> None:
    # tf.math.bessel_i0e is a pure tensor op (allowed in safe mode) with no keras.ops twin.
    assert needs_tensorflow("math.bessel_i0e") and not needs_tensorflow("__operators__.getitem")
    path = _with_function(
        KERAS2 / "tf_ops.h5", tmp_path / "bessel.h5", "nn.relu", "math.bessel_i0e"
    )
    if keras.backend.backend() == "tensorflow":
        tuner = FineTuner(path)
        assert any(
            getattr(layer, "function", None) == "math.bessel_i0e" for layer in tuner.model.layers
        )
    else:
        with pytest.raises(ModelLoadError, match=r"tf\.math\.bessel_i0e.*KERAS_BACKEND=tensorflow"):
            FineTuner(path)
        with pytest.raises(ModelLoadError, match=r"no keras\.ops equivalent"):
            TFOpLambda("math.bessel_i0e")


def _keras2_lambda_function(source: str) -> Any:
    # As a deserialized Keras 2 lambda: code whose globals do not hold `tf`.
    namespace: dict[str, Any] = {}
    exec(f"function = lambda t: {source}", namespace)
    return namespace["function"]


def test_a_keras2_lambda_calling_tf_runs_its_portable_calls_compiled() -> None:
    from transferkit.model.keras2.layers import Keras2Lambda

    function = _keras2_lambda_function(
        "tf.reduce_mean(tf.square(t), axis=-1, keepdims=True)"
        " + tf.cast(tf.math.l2_normalize(t, axis=-1)[:, :1], tf.float32)"
    )
    inputs = keras.Input((5,))
    hidden = Keras2Lambda(function, name="mixed")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden))
    x = RNG.normal(size=(8, 5)).astype("float32")
    mixed = keras.Model(inputs, hidden).predict(x, verbose=0)
    expected = (x**2).mean(-1, keepdims=True) + x[:, :1] / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6)
    model.compile(keras.optimizers.SGD(0.1), "mse")  # a compiled train step through the lambda
    before = model.get_layer("out").kernel.numpy().copy()
    history = model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(model.get_layer("out").kernel.numpy(), before)


def test_a_keras2_lambda_calling_a_tf_only_function_needs_tensorflow() -> None:
    from transferkit.model.keras2.layers import Keras2Lambda

    layer = Keras2Lambda(_keras2_lambda_function("tf.math.cumsum(t, axis=-1)"), name="cum")
    x = np.arange(6, dtype="float32").reshape(2, 3)
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_array_equal(layer(keras.Input((3,))).shape, (None, 3))
        np.testing.assert_array_equal(layer(x), np.cumsum(x, axis=-1))
    else:
        with pytest.raises(ModelLoadError, match=r"Lambda layer 'cum' calls tf\.math\.cumsum"):
            layer(keras.Input((3,)))
