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
KERAS_FORMAT_TOO = (
    "seq_cnn",
    "nested_base",
    "tutorial_mobilenet",
    "slash_names",
    "seq2seq_lstm",
    "attention_block",
    "conv_zoo",
    "conv_lstm",
    "app_layers",
    "lambda_tf",
    "mixed_policy",
)


def _save(model, name, x_train, y_train, x_io):
    if model.optimizer is not None and y_train is not None:
        model.fit(x_train, y_train, batch_size=4, epochs=1, steps_per_epoch=3, verbose=0)
    path = os.path.join(OUT, name + ".h5")
    model.save(path)  # legacy HDF5 because of the .h5 suffix
    y = model.predict(x_io, verbose=0)
    # Several inputs are stored as x0, x1, ... in the model's input order.
    xs = {f"x{i}": a for i, a in enumerate(x_io)} if isinstance(x_io, list) else {"x": x_io}
    np.savez(os.path.join(OUT, name + "_io.npz"), y=y, **xs)
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


def slash_names():
    """Layer names with "/" (as in every Keras 2 DenseNet, MobileNetV3 and TF-Slim port), one of
    which clashes with another layer's name once "/" becomes "_", and a nested base with them."""
    base_in = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, name="stem/conv")(base_in)
    h = layers.BatchNormalization(name="stem/bn")(h)
    base = keras.Model(base_in, layers.ReLU(name="stem/relu")(h), name="stem/base")
    inp = keras.Input((8, 8, 1))
    h = base(inp)
    h = layers.Conv2D(4, 3, padding="same", name="block/conv")(h)
    h = layers.Conv2D(4, 1, name="block_conv")(h)
    h = layers.GlobalAveragePooling2D(name="head/pool")(h)
    m = keras.Model(inp, layers.Dense(3, activation="softmax", name="head/out")(h))
    m.compile("adam", "sparse_categorical_crossentropy")
    _save(m, "slash_names", _f32(12, 8, 8, 1), RNG.integers(0, 3, 12), _f32(4, 8, 8, 1))


def seq2seq_lstm():
    """An encoder-decoder: the decoder LSTM starts from the encoder's states
    (`initial_state=`, saved as tensors inside the node's kwargs), a Bidirectional GRU, a
    TimeDistributed head; every recurrent layer is saved with `time_major=False`."""
    enc_in = keras.Input((5, 3), name="encoder_in")
    dec_in = keras.Input((4, 2), name="decoder_in")
    _, state_h, state_c = layers.LSTM(6, return_state=True, name="encoder")(enc_in)
    h = layers.LSTM(6, return_sequences=True, name="decoder")(
        dec_in, initial_state=[state_h, state_c]
    )
    h = layers.Bidirectional(layers.GRU(3, return_sequences=True), name="bi_gru")(h)
    h = layers.TimeDistributed(layers.Dense(4), name="per_step")(h)
    h = layers.SimpleRNN(5, name="summary")(h)
    m = keras.Model([enc_in, dec_in], layers.Dense(1, name="out")(h))
    m.compile("adam", "mse")
    x = [_f32(12, 5, 3), _f32(12, 4, 2)]
    _save(m, "seq2seq_lstm", x, _f32(12, 1), [a[:4] for a in x])


def attention_block():
    """MultiHeadAttention called with `value=` (a tensor keyword argument, and saved with
    query/key/value shapes), a dot-product `Attention`, LayerNormalization, SeparableConv1D."""
    inp = keras.Input((6, 8))
    a = layers.MultiHeadAttention(2, 4, name="mha")(inp, value=inp)
    h = layers.LayerNormalization(name="norm")(layers.Add()([inp, a]))
    h = layers.Attention(name="dot_attention")([h, inp])
    h = layers.SeparableConv1D(4, 3, name="sep1d")(h)
    h = layers.GlobalAveragePooling1D()(h)
    m = keras.Model(inp, layers.Dense(3, activation="softmax", name="out")(h))
    m.compile("adam", "sparse_categorical_crossentropy")
    _save(m, "attention_block", _f32(12, 6, 8), RNG.integers(0, 3, 12), _f32(4, 6, 8))


def conv_zoo():
    """Keras 2 convolution-family layers whose configs Keras 3 refuses: SeparableConv2D
    (`groups`, unused `kernel_*`), Conv2DTranspose (`groups`), SpatialDropout2D
    (`noise_shape`, `trainable`), ThresholdedReLU (removed in Keras 3), LeakyReLU(alpha=)."""
    inp = keras.Input((8, 8, 3))
    h = layers.SeparableConv2D(6, 3, padding="same", name="sep")(inp)
    h = layers.LeakyReLU(alpha=0.2)(h)
    h = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(h)
    h = layers.ThresholdedReLU(theta=0.1, name="thresholded")(h)
    h = layers.SpatialDropout2D(0.1, name="spatial_dropout")(h)
    h = layers.GlobalAveragePooling2D()(h)
    m = keras.Model(inp, layers.Dense(3, activation="softmax", name="out")(h))
    m.compile("adam", "sparse_categorical_crossentropy")
    _save(m, "conv_zoo", _f32(12, 8, 8, 3), RNG.integers(0, 3, 12), _f32(4, 8, 8, 3))


def conv_lstm():
    """ConvLSTM2D with Keras 2's default `recurrent_activation="hard_sigmoid"`, whose formula
    differs in Keras 3 (slope 0.2 vs 1/6): predictions must still match."""
    inp = keras.Input((3, 6, 6, 1))
    h = layers.ConvLSTM2D(3, 3, padding="same", name="conv_lstm")(inp)
    h = layers.Activation("hard_sigmoid", name="gate")(h)
    h = layers.Flatten()(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h))
    m.compile("adam", "mse")
    _save(m, "conv_lstm", 3 * _f32(12, 3, 6, 6, 1), _f32(12, 1), 3 * _f32(4, 3, 6, 6, 1))


def app_layers():
    """The custom layers of `keras.applications` ConvNeXt (LayerScale) and InceptionResNetV2
    (CustomScaleLayer), which Keras 3 defines but does not register for loading."""
    from keras.src.applications.convnext import LayerScale
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    inp = keras.Input((6, 6, 4))
    h = layers.Conv2D(4, 1, name="proj")(inp)
    h = LayerScale(1e-1, 4, name="layer_scale")(h)
    h = CustomScaleLayer(0.17, name="residual_scale")([inp, h])
    h = layers.GlobalAveragePooling2D()(h)
    m = keras.Model(inp, layers.Dense(3, activation="softmax", name="out")(h))
    m.compile("adam", "sparse_categorical_crossentropy")
    _save(m, "app_layers", _f32(12, 6, 6, 4), RNG.integers(0, 3, 12), _f32(4, 6, 6, 4))


def lambda_tf():
    """A Lambda whose function uses `tf` as a global (face-embedding models normalise so): Keras
    3 runs deserialized lambdas without it. Marshalled Python 3.11 bytecode, like seq_lambda."""
    inp = keras.Input((5,))
    h = layers.Lambda(lambda t: tf.math.l2_normalize(t, axis=-1), name="l2_norm")(inp)
    h = layers.Dense(4, name="embed")(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h))
    m.compile("sgd", "mse")
    _save(m, "lambda_tf", _f32(12, 5), _f32(12, 1), _f32(4, 5))


def mixed_policy():
    """Saved under the `mixed_float16` policy: Keras 2 stores a `Policy` object per layer."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = keras.Sequential(
            [
                layers.InputLayer(input_shape=(6, 6, 2)),
                layers.Conv2D(4, 3, name="conv"),
                layers.Flatten(),
                layers.Dense(3, name="logits"),
                layers.Activation("softmax", dtype="float32", name="probs"),
            ]
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    m.compile("adam", "sparse_categorical_crossentropy")
    _save(m, "mixed_policy", _f32(12, 6, 6, 2), RNG.integers(0, 3, 12), _f32(4, 6, 6, 2))


MODELS = {
    f.__name__: f
    for f in (
        seq_cnn,
        seq_mlp_mse,
        func_resnet,
        nested_base,
        seq_lambda,
        seq_no_compile,
        tutorial_mobilenet,
        tf_ops,
        seq_depthwise,
        slash_names,
        seq2seq_lstm,
        attention_block,
        conv_zoo,
        conv_lstm,
        app_layers,
        lambda_tf,
        mixed_policy,
    )
}


if __name__ == "__main__":
    import sys

    # With names, only those are (re)written: regenerating `seq_lambda` rewrites its bytecode.
    print("tensorflow", tf.__version__, "keras", KERAS_VERSION)
    for name in sys.argv[1:] or MODELS:
        MODELS[name]()
