"""Shared fixtures: small pre-trained models, built once per test session (per xdist worker).

The models are trained for real on scikit-learn's bundled digits (8x8 grayscale images), so the
tests fine-tune genuinely pre-trained weights without downloading anything.
"""

from __future__ import annotations

import os

# Must happen before TensorFlow is imported anywhere: oneDNN crashes on some 1x1 stride-2
# convolutions on AVX-512 CPUs (see the README's troubleshooting section).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

# Files whose tests take the longest (subprocesses, notebooks, keras-hub models), slowest first:
# `pytest -n 2` starts them first so that the two workers finish together instead of one idling
# while the other runs a two-minute notebook at the end. `make test` prints the slowest tests.
SLOW_FIRST = (
    "tests/test_notebooks.py",
    "tests/test_faults.py",
    "tests/test_docs_examples.py",
    "tests/test_distribute.py",
    "tests/test_keras2_tfk221.py",
    "tests/test_hub.py",
    "tests/test_cli.py",
    "tests/test_security.py",
    "tests/test_loading.py",
)


def _slow_rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_slow_rank)  # stable: the order inside a file is kept
    # KERAS_BACKEND is read by Keras at import: `KERAS_BACKEND=jax pytest` runs the suite on JAX.
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is not None:
            why = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(
                pytest.mark.skip(reason=f"TensorFlow backend only ({why}); running on {backend}")
            )


@dataclass(frozen=True)
class Digits:
    """Digits split into the pre-training task (0-4) and the new task (5-9, relabelled 0-4)."""

    x_old: np.ndarray
    y_old: np.ndarray
    x_new: np.ndarray
    y_new: np.ndarray


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int64")
    old = y < 5
    return Digits(x[old], y[old], x[~old], y[~old] - 5)


def build_cnn(name: str = "pretrained_cnn") -> keras.Model:
    """The small CNN the tests use as a pre-trained model (8 top-level layers)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(16, activation="relu", name="fc2"),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(5, activation="softmax", name="out"),
        ],
        name=name,
    )


@dataclass(frozen=True)
class Pretrained:
    """A pre-trained model and its files."""

    model: keras.Model
    h5: Path
    keras_path: Path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Pretrained:
    """The CNN trained on digits 0-4, saved as `.h5` (compiled with a string loss) and `.keras`."""
    keras.utils.set_random_seed(1)
    model = build_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits.x_old, digits.y_old, epochs=4, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("pretrained")
    h5 = root / "cnn.h5"
    model.save(h5)
    kp = root / "cnn.keras"
    model.save(kp)
    return Pretrained(model, h5, kp)


@pytest.fixture(scope="session")
def bn_model(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Pretrained:
    """A Functional CNN with BatchNormalization, pre-trained (moving statistics moved)."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Activation("relu", name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    out = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inp, out, name="bn_cnn")
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(digits.x_old, digits.y_old, epochs=3, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("bn")
    h5 = root / "bn.h5"
    model.save(h5)
    kp = root / "bn.keras"
    model.save(kp)
    return Pretrained(model, h5, kp)


@pytest.fixture(scope="session")
def nested_model(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Pretrained:
    """An outer Functional model whose second layer is a nested Functional base model."""
    keras.utils.set_random_seed(3)
    b_in = keras.Input((8, 8, 1))
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="base_conv1")(b_in)
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="base_conv2")(b)
    b = keras.layers.Flatten(name="base_flatten")(b)
    b = keras.layers.Dense(16, activation="relu", name="base_fc")(b)
    base = keras.Model(b_in, b, name="base")
    inp = keras.Input((8, 8, 1), name="image")
    x = base(inp)
    x = keras.layers.Dense(16, activation="relu", name="top_fc")(x)
    out = keras.layers.Dense(5, activation="softmax", name="top_out")(x)
    model = keras.Model(inp, out, name="nested")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits.x_old, digits.y_old, epochs=2, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("nested")
    h5 = root / "nested.h5"
    model.save(h5)
    kp = root / "nested.keras"
    model.save(kp)
    return Pretrained(model, h5, kp)


@pytest.fixture(scope="session")
def residual_model(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Pretrained:
    """A Functional model with `Add` and `Concatenate` branches."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 1), name="image")
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="branch")(a)
    s = keras.layers.Add(name="add")([a, b])
    c = keras.layers.Conv2D(4, 1, activation="relu", name="side")(s)
    m = keras.layers.Concatenate(name="concat")([s, c])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(m)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    out = keras.layers.Dense(5, activation="softmax", name="out")(x)
    model = keras.Model(inp, out, name="residual")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits.x_old, digits.y_old, epochs=2, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("residual")
    h5 = root / "residual.h5"
    model.save(h5)
    kp = root / "residual.keras"
    model.save(kp)
    return Pretrained(model, h5, kp)


def few_shot_split(digits: Digits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """10 labelled images per new class for training, the rest of the new task for testing."""
    rng = np.random.default_rng(0)
    train_idx = np.concatenate(
        [rng.choice(np.flatnonzero(digits.y_new == c), 10, replace=False) for c in range(5)]
    )
    mask = np.zeros(len(digits.y_new), bool)
    mask[train_idx] = True
    return digits.x_new[mask], digits.y_new[mask], digits.x_new[~mask], digits.y_new[~mask]


@pytest.fixture
def few_shot(digits: Digits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`few_shot_split` of the session's digits."""
    return few_shot_split(digits)


def weights_of(layer: keras.layers.Layer) -> list[np.ndarray]:
    """Copies of a layer's weight values (`variable.numpy()`, not `np.array(variable)`)."""
    return [v.numpy().copy() for v in layer.weights]


def loss_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The gradient of the compiled loss (mean over the batch), per trainable variable, on the
    Keras backend in use."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        frozen = [v.value for v in model.non_trainable_variables]
        metrics = [v.value for v in model.metrics_variables]
        optimizer = [v.value for v in model.optimizer.variables]

        def loss(trainable: list[Any]) -> Any:
            value, _ = model.compute_loss_and_updates(
                trainable, frozen, metrics, x, y, None, True, optimizer
            )
            return value

        grads = jax.grad(loss)([v.value for v in model.trainable_variables])
        return [np.asarray(g) for g in grads]
    if backend == "torch":
        model.zero_grad()
        model.compute_loss(x=x, y=y, y_pred=model(x, training=True)).backward()
        return [v.value.grad.cpu().numpy() for v in model.trainable_variables]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    return [g.numpy() for g in tape.gradient(value, model.trainable_variables)]
