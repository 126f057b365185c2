"""Generate genuine Keras 2 HDF5 (``.h5``) full-model fixtures.

NOT run by CI and NOT imported by the test suite.  Run it by hand, ONLY with
a Keras 2 environment (TensorFlow 2.15.x, which bundles keras 2.15), e.g.::

    python3 -m venv /tmp/k2venv
    /tmp/k2venv/bin/pip install tensorflow==2.15.1
    TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=3 \
        /tmp/k2venv/bin/python tests/data/keras2/make_keras2_models.py

It writes, next to this script, tiny models saved with ``model.save(path)``
(legacy HDF5 format) written in Keras-2 idioms, plus ``<name>_io.npz`` files
holding a fixed input batch ``x`` (4 samples) and the Keras 2
``model.predict(x)`` output ``y``, so a loader can check it reproduces the
predictions exactly.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras as _keras_pkg
import numpy as np
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers

KERAS_VERSION = _keras_pkg.__version__
assert KERAS_VERSION.startswith("2."), (
    f"This script must run under Keras 2 (got keras {KERAS_VERSION})"
)

OUT = os.path.dirname(os.path.abspath(__file__))
keras.utils.set_random_seed(0)
RNG = np.random.default_rng(0)
KERAS_FORMAT_TOO = ("seq_cnn", "nested_base", "tutorial_mobilenet")


def _save(model, name, x_train, y_train, x_io):
    if model.optimizer is not None and y_train is not None:
        model.fit(x_train, y_train, batch_size=4, epochs=1, steps_per_epoch=3, verbose=0)
    path = os.path.join(OUT, name + ".h5")
    model.save(path)  # legacy HDF5 because of the .h5 suffix
    y = model.predict(x_io, verbose=0)
    np.savez(os.path.join(OUT, name + "_io.npz"), x=x_io, y=y)
    print(f"{name}.h5: {os.path.getsize(path)} bytes")
    if name in KERAS_FORMAT_TOO:
        # Keras 2.13+ also wrote the `.keras` archive format, which Keras 3 cannot read as is.
        keras_path = os.path.join(OUT, name + ".keras")
        model.save(keras_path)
        print(f"{name}.keras: {os.path.getsize(keras_path)} bytes")


def _f32(*shape):
    return RNG.standard_normal(shape).astype("float32")


def seq_cnn():
    m = keras.Sequential(
        [
            layers.Conv2D(8, 3, activation="relu", input_shape=(8, 8, 1)),
            layers.MaxPooling2D(),
            layers.Conv2D(16, 3, padding="same"),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.25),
            layers.Dense(5, activation="softmax"),
        ]
    )
    # Keras-2 legacy optimizer with `lr` / `decay` arguments.
    opt = keras.optimizers.legacy.SGD(lr=0.01, momentum=0.9, decay=1e-6)
    m.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = _f32(12, 8, 8, 1)
    y = RNG.integers(0, 5, size=(12,))
    _save(m, "seq_cnn", x, y, _f32(4, 8, 8, 1))


def seq_mlp_mse():
    m = keras.Sequential(
        [
            layers.Dense(16, input_dim=10),
            layers.Dense(1),
        ]
    )
    m.compile("sgd", "mse", metrics=["mae"])
    _save(m, "seq_mlp_mse", _f32(12, 10), _f32(12, 1), _f32(4, 10))


def func_resnet():
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same")(inp)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    # identity residual block
    r = layers.Conv2D(8, 3, padding="same")(x)
    r = layers.BatchNormalization()(r)
    x = layers.Add()([x, r])
    x = layers.Activation("relu")(x)
    # projection-shortcut block (strided), merged with Concatenate
    s = layers.Conv2D(16, 1, strides=2, padding="same")(x)
    r = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    r = layers.BatchNormalization()(r)
    r = layers.Activation("relu")(r)
    r2 = layers.Conv2D(8, 3, padding="same")(r)
    r = layers.Concatenate()([r, r2])  # 16 channels
    x = layers.Add()([s, r])
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(3, activation="softmax")(x)
    m = keras.Model(inp, out)
    m.compile(
        keras.optimizers.legacy.Adam(lr=1e-3), "categorical_crossentropy", metrics=["accuracy"]
    )
    y = np.eye(3, dtype="float32")[RNG.integers(0, 3, size=(12,))]
    _save(m, "func_resnet", _f32(12, 16, 16, 3), y, _f32(4, 16, 16, 3))


def nested_base():
    binp = keras.Input((8, 8, 1))
    b = layers.Conv2D(4, 3, activation="relu")(binp)
    b = layers.BatchNormalization()(b)
    b = layers.Flatten()(b)
    b = layers.Dense(16, activation="relu")(b)
    base = keras.Model(binp, b, name="base")
    inp = keras.Input((8, 8, 1))
    out = layers.Dense(4, activation="softmax")(base(inp))
    m = keras.Model(inp, out, name="outer")
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    y = RNG.integers(0, 4, size=(12,))
    _save(m, "nested_base", _f32(12, 8, 8, 1), y, _f32(4, 8, 8, 1))


def seq_lambda():
    m = keras.Sequential(
        [
            layers.Lambda(lambda x: x * 2.0, input_shape=(6,)),
            layers.Dense(3),
        ]
    )
    m.compile("rmsprop", "mse")
    _save(m, "seq_lambda", _f32(12, 6), _f32(12, 3), _f32(4, 6))


def seq_no_compile():
    m = keras.Sequential(
        [
            layers.Dense(8, activation="tanh", input_shape=(5,)),
            layers.Dense(2),
        ]
    )
    _save(m, "seq_no_compile", None, None, _f32(4, 5))


def tutorial_mobilenet():
    """The tensorflow.org transfer-learning tutorial's shape, tiny: augmentation layers,
    `preprocess_input` (saved as TFOpLambda truediv/subtract), a MobileNet-style nested base
    (DepthwiseConv2D saved with groups=1, ReLU(6.)), GAP, Dropout, a TFOpLambda `x * 2 + 1`."""
    base = keras.Sequential(
        [
            layers.Conv2D(8, 3, input_shape=(16, 16, 3)),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
            layers.DepthwiseConv2D(3, padding="same"),
            layers.ZeroPadding2D(1),
            layers.Conv2D(8, 1),
        ],
        name="base",
    )
    inputs = keras.Input((16, 16, 3))
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.RandomRotation(0.2)(x)
    x = tf.keras.applications.mobilenet_v2.preprocess_input(x)
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = x * 2.0 + 1.0
    outputs = layers.Dense(3, activation="softmax")(x)
    m = keras.Model(inputs, outputs)
    m.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    x_train = (RNG.random((12, 16, 16, 3)) * 255).astype("float32")
    _save(m, "tutorial_mobilenet", x_train, RNG.integers(0, 3, 12), x_train[:4])


def tf_ops():
    """TensorFlow ops on Keras tensors: a + b (a tensor keyword argument), tf.concat, slicing
    with steps and `...`, tf.nn.relu, tf.reshape, tf.expand_dims."""
    inp = keras.Input((6, 4))
    a = layers.Dense(4)(inp)
    b = a + inp
    c = tf.concat([a, b], axis=-1)
    d = c[:, 1:, ::2]
    e = tf.nn.relu(d)
    f = tf.reshape(e, (-1, 5 * 4))
    g = tf.expand_dims(f, -1)[..., 0]
    out = layers.Dense(3, activation="softmax")(g)
    m = keras.Model(inp, out)
    m.compile("sgd", "sparse_categorical_crossentropy")
    _save(m, "tf_ops", _f32(12, 6, 4), RNG.integers(0, 3, 12), _f32(4, 6, 4))


def seq_depthwise():
    """A top-level DepthwiseConv2D (saved with groups=1): Keras 3 raises TypeError on it."""
    m = keras.Sequential(
        [
            layers.Conv2D(4, 3, input_shape=(8, 8, 3)),
            layers.DepthwiseConv2D(3, depth_multiplier=2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3, activation="softmax"),
        ]
    )
    m.compile("sgd", "sparse_categorical_crossentropy")
    _save(m, "seq_depthwise", _f32(12, 8, 8, 3), RNG.integers(0, 3, 12), _f32(4, 8, 8, 3))


if __name__ == "__main__":
    print("tensorflow", tf.__version__, "keras", KERAS_VERSION)
    seq_cnn()
    seq_mlp_mse()
    func_resnet()
    nested_base()
    seq_lambda()
    seq_no_compile()
    tutorial_mobilenet()
    tf_ops()
    seq_depthwise()
