"""Generate Keras 2 fixtures written by tf-keras 2.21 (the Keras 2 of TensorFlow 2.16+).

NOT run by CI and NOT imported by the test suite.  Run it by hand, ONLY in a tf-keras venv
(outside the repository), e.g.::

    python3 -m venv /tmp/tfk221 && /tmp/tfk221/bin/pip install tensorflow==2.21.0 tf-keras==2.21.0
    TF_USE_LEGACY_KERAS=1 TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=3 \
        /tmp/tfk221/bin/python tests/data/keras2/make_tfk221_models.py

Like `make_keras2_models.py` (Keras 2.15), it writes next to this script `tfk221_<name>.h5` and
`tfk221_<name>.keras` (`model.save(path)`, both formats) and `tfk221_<name>_io.npz` with a fixed
input batch `x` (4 samples) and `model.predict(x)` (inference mode) as `y`. tf-keras 2.16+ writes
arguments 2.15 never did (`rng_type` on every random layer, `softmax_robust_masking` on
MultiHeadAttention), which Keras 3 refuses.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

assert keras.__version__.startswith("2."), f"needs tf-keras 2.x (got {keras.__version__})"

OUT = os.path.dirname(os.path.abspath(__file__))
keras.utils.set_random_seed(0)
RNG = np.random.default_rng(0)


def _save(model, name, x_train, y_train, x_io):
    name = "tfk221_" + name
    if model.optimizer is not None and y_train is not None:
        model.fit(x_train, y_train, batch_size=4, epochs=1, steps_per_epoch=3, verbose=0)
    y = model.predict(x_io, verbose=0)
    np.savez(os.path.join(OUT, name + "_io.npz"), x=x_io, y=y)
    for suffix in (".h5", ".keras"):
        path = os.path.join(OUT, name + suffix)
        model.save(path)  # legacy HDF5 for .h5, the Keras 2 archive format for .keras
        print(f"{name}{suffix}: {os.path.getsize(path)} bytes")


def _images(n, size, scale=255.0):
    return (RNG.random((n, size, size, 3)) * scale).astype("float32")


def _calibrate_batchnorm(model, x):
    """Sets each BatchNormalization's moving statistics to those of its inputs on `x`, in
    order: with random weights and the initial statistics (mean 0, variance 1) activations blow
    up through a deep base and saturate the ReLU6s, so every image would predict the same."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            probe = keras.Model(model.inputs, layer.input)
            h = probe.predict(x, verbose=0)
            axes = tuple(range(h.ndim - 1))
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, h.mean(axes), h.var(axes)])


def tutorial():
    """The tensorflow.org transfer-learning tutorial model, as written there, at 32x32: a
    `data_augmentation` Sequential (RandomFlip, RandomRotation), `preprocess_input` (TFOpLambda),
    a frozen MobileNetV2 base (alpha 0.25, to keep the files small) called with training=False, GAP, Dropout, Dense(1) logits."""
    data_augmentation = keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.2)], name="data_augmentation"
    )
    base_model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.25, include_top=False, weights=None
    )
    x_train = _images(12, 32)
    _calibrate_batchnorm(base_model, keras.applications.mobilenet_v2.preprocess_input(x_train))
    base_model.trainable = False
    inputs = keras.Input(shape=(32, 32, 3))
    x = data_augmentation(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base_model(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
    )
    _save(model, "tutorial", x_train, RNG.integers(0, 2, (12, 1)).astype("float32"), x_train[:4])


def app_base():
    """A `keras.applications` base without its top (MobileNetV3Small: `/` in layer names, its
    own Rescaling, hard-swish as Multiply/ReLU), saved uncompiled as people save backbones."""
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, minimalistic=True, include_top=False, weights=None
    )
    _calibrate_batchnorm(base, _images(12, 32))
    _save(base, "app_base", None, None, _images(4, 32))


def augment():
    """A Sequential with every random image layer tf-keras has (on 0-255 images), then a small
    CNN."""
    m = keras.Sequential(
        [
            layers.InputLayer(input_shape=(16, 16, 3)),
            layers.RandomFlip("horizontal_and_vertical"),
            layers.RandomRotation(0.1, fill_mode="nearest"),
            layers.RandomZoom(0.2, 0.1),
            layers.RandomTranslation(0.1, 0.1),
            layers.RandomContrast(0.2),
            layers.RandomBrightness(0.2),
            layers.RandomHeight(0.2),
            layers.RandomWidth(0.2),
            layers.RandomCrop(12, 12),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3, activation="softmax"),
        ]
    )
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x_train = _images(12, 16)
    _save(m, "augment", x_train, RNG.integers(0, 3, 12), x_train[:4])


def rng_layers():
    """The other random layers, saved with `rng_type` when the TF random generator is on (as
    `keras.backend.experimental.enable_tf_random_generator()` does for reproducible runs):
    Dropout, GaussianNoise, GaussianDropout, AlphaDropout, SpatialDropout1D, LSTM with dropout,
    Bidirectional GRU, Attention, MultiHeadAttention (`softmax_robust_masking` always)."""
    keras.backend.experimental.enable_tf_random_generator()
    try:
        inp = keras.Input((6, 4))
        h = layers.Dense(8)(inp)
        h = layers.Dropout(0.1)(h)
        h = layers.GaussianNoise(0.1)(h)
        h = layers.GaussianDropout(0.1)(h)
        h = layers.AlphaDropout(0.1)(h)
        h = layers.SpatialDropout1D(0.1)(h)
        a = layers.MultiHeadAttention(2, 4, dropout=0.1, name="mha")(h, h)
        h = layers.Attention(dropout=0.1)([h, a])
        h = layers.LSTM(6, dropout=0.1, recurrent_dropout=0.1, return_sequences=True)(h)
        h = layers.Bidirectional(layers.GRU(3, dropout=0.1))(h)
        m = keras.Model(inp, layers.Dense(2, activation="softmax")(h))
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    m.compile("adam", "sparse_categorical_crossentropy")
    x = RNG.standard_normal((12, 6, 4)).astype("float32")
    _save(m, "rng_layers", x, RNG.integers(0, 2, 12), x[:4])


MODELS = {f.__name__: f for f in (tutorial, app_base, augment, rng_layers)}


if __name__ == "__main__":
    import sys

    print("tensorflow", tf.__version__, "tf_keras", keras.__version__)
    for name in sys.argv[1:] or MODELS:
        MODELS[name]()
