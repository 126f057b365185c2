"""Keras 2 files written by tf-keras 2.21 (TensorFlow 2.16+'s Keras 2) load like 2.15 ones.

The fixtures (`tests/data/keras2/tfk221_*`, from `make_tfk221_models.py`) hold the arguments
tf-keras 2.16+ writes and Keras 3 refuses: `rng_type` on every random layer,
`softmax_robust_masking` on MultiHeadAttention, and the Keras 2 layers Keras 3 lacks
(`RandomHeight`, `RandomWidth`).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from transferkit import FineTuner, ModelLoadError
from transferkit.model.keras2.config import keras2_config
from transferkit.model.keras2.layers import Keras2RandomCrop, RandomHeight, RandomWidth

KERAS2 = Path(__file__).parent / "data" / "keras2"
STEMS = ("tutorial", "app_base", "augment", "rng_layers")
# MobileNets sum many products: float32 reordering between Keras 2 and 3 moves ~4e-5 on outputs
# of magnitude 1-5 (the other fixtures match exactly).
TOLERANCE = {"tutorial": 2e-4, "app_base": 2e-4}
RANDOM_IMAGE_LAYERS = (
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "RandomHeight",
    "RandomWidth",
    "Keras2RandomCrop",
)


ON_TENSORFLOW = keras.backend.backend() == "tensorflow"


def _strip_random_sizes(config: dict[str, Any]) -> dict[str, Any]:
    layers = config["config"]["layers"]
    config["config"]["layers"] = [
        layer for layer in layers if layer["class_name"] not in ("RandomHeight", "RandomWidth")
    ]
    assert len(config["config"]["layers"]) == len(layers) - 2
    return config


def _portable(file: Path, tmp_path: Path) -> Path:
    """The file itself on TensorFlow; elsewhere the augmentation fixture without its
    `RandomHeight` and `RandomWidth` (random output sizes: TensorFlow only, and identities in
    inference, so Keras 2's predictions stay the model's)."""
    if ON_TENSORFLOW or "augment" not in file.name:
        return file
    with pytest.raises(ModelLoadError, match=r"RandomHeight.*KERAS_BACKEND=tensorflow"):
        FineTuner(file)
    out = tmp_path / file.name
    if file.suffix == ".h5":
        import h5py  # type: ignore[import-untyped]

        shutil.copy(file, out)
        with h5py.File(out, "r+") as f:
            raw = f.attrs["model_config"]
            config = json.loads(raw.decode() if hasattr(raw, "decode") else str(raw))
            f.attrs["model_config"] = json.dumps(_strip_random_sizes(config))
        return out
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                data = json.dumps(_strip_random_sizes(json.loads(data))).encode()
            dst.writestr(item, data)
    return out


def _io(stem: str) -> tuple[np.ndarray, np.ndarray]:
    io = np.load(KERAS2 / f"tfk221_{stem}_io.npz")
    return io["x"], io["y"]


def _targets(model: keras.Model, n: int) -> np.ndarray:
    units = int(model.output_shape[-1])
    return (np.arange(n) % max(units, 2)).astype("int64")


def test_the_fixtures_are_what_tf_keras_2_21_writes() -> None:
    import h5py  # type: ignore[import-untyped]

    assert sorted(p.name for p in KERAS2.glob("tfk221_*")) == sorted(
        f"tfk221_{stem}{suffix}" for stem in STEMS for suffix in (".h5", ".keras", "_io.npz")
    )
    for stem in STEMS:
        for suffix in (".h5", ".keras"):
            assert (KERAS2 / f"tfk221_{stem}{suffix}").stat().st_size < 2_000_000
        with h5py.File(KERAS2 / f"tfk221_{stem}.h5", "r") as f:
            assert f.attrs["keras_version"] == "2.21.0"
            config = f.attrs["model_config"]
        text = config.decode() if hasattr(config, "decode") else str(config)
        assert '"rng_type": "stateful"' in text or stem == "app_base"
    assert '"softmax_robust_masking": false' in (
        (KERAS2 / "tfk221_rng_layers.h5").read_bytes().decode("latin-1")
    )


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("stem", STEMS)
def test_plain_keras3_fails_on_them(stem: str, suffix: str) -> None:
    with pytest.raises((TypeError, ValueError)):
        keras.models.load_model(KERAS2 / f"tfk221_{stem}{suffix}", compile=False)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("stem", STEMS)
def test_tf_keras_2_21_file_loads_with_keras2_predictions(
    stem: str, suffix: str, tmp_path: Path
) -> None:
    x, y = _io(stem)
    tol = TOLERANCE.get(stem, 1e-5)
    model = FineTuner(_portable(KERAS2 / f"tfk221_{stem}{suffix}", tmp_path)).model
    np.testing.assert_allclose(model.predict(x, verbose=0), y, rtol=tol, atol=tol)


# Fine-tuning is format-independent once loaded: each model once, in one format or the other.
@pytest.mark.parametrize(
    "file",
    [
        "tfk221_tutorial.h5",
        "tfk221_app_base.keras",
        "tfk221_augment.h5",
        "tfk221_rng_layers.keras",
    ],
)
def test_tf_keras_2_21_file_fine_tunes_and_reloads_in_plain_keras(
    file: str, tmp_path: Path
) -> None:
    x, _ = _io(file.split(".")[0].removeprefix("tfk221_"))
    x = np.concatenate([x, x[::-1]])  # two steps of 4
    tuner = FineTuner(_portable(KERAS2 / file, tmp_path))
    # A new head on the last layer before the old output (on the whole base for the backbone).
    backbone = tuner.model.name == "MobilenetV3small"
    at = tuner.model.layers[-1 if backbone else -2].name
    tuned = tuner.replace_head(num_classes=2, at=at, hidden=(), pool="avg").compile_sgd(lr=0.1)
    assert tuned.model.output_shape == (None, 2)
    before = [w.numpy().copy() for w in tuned.model.trainable_weights]
    result = tuned.fit(x, np.arange(8) % 2, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(result.history["loss"]).all()
    after = [w.numpy() for w in result.model.trainable_weights]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    path = result.save(tmp_path / "tuned.keras")
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        reloaded(x, training=False), result.model(x, training=False), rtol=1e-5, atol=1e-5
    )


def _differs(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape != b.shape or not np.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_augmentation_is_random_in_training_and_identity_in_inference(
    suffix: str, tmp_path: Path
) -> None:
    x, y = _io("augment")
    x = np.concatenate([x, x[::-1]])  # 8 images: every random layer changes at least one
    model = FineTuner(_portable(KERAS2 / f"tfk221_augment{suffix}", tmp_path)).model
    layers = {type(layer).__name__: layer for layer in model.layers}
    names = [
        n for n in RANDOM_IMAGE_LAYERS if ON_TENSORFLOW or n not in ("RandomHeight", "RandomWidth")
    ]
    assert set(names) <= set(layers)
    for name in names:
        layer = layers[name]
        inferred = np.asarray(layer(x, training=False))
        if name == "Keras2RandomCrop":
            # Keras 2's inference crop: the central window resized (Keras 3.15.1 returns the
            # images unchanged, bigger than its own output shape says).
            assert inferred.shape == (8, 12, 12, 3)
            assert _differs(np.asarray(layer(x, training=True)), inferred)
            continue
        np.testing.assert_array_equal(inferred, x, err_msg=name)
        # Random in training: some call changes the images, and two calls differ.
        outs = [np.asarray(layer(x, training=True)) for _ in range(4)]
        assert any(_differs(o, x) for o in outs), name
        assert any(_differs(o, outs[0]) for o in outs[1:]), name
    # The whole model: deterministic in inference (Keras 2's predictions), random in training.
    np.testing.assert_allclose(model.predict(x[:4], verbose=0), y, atol=1e-5)
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert _differs(model(x, training=True), model(x, training=True))
    # Compiled (a jitted step on JAX): still random in training. With a zero learning rate the
    # weights stay put, so two losses differ only through the random layers.
    train = keras.Model(model.inputs, model.outputs)
    train.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    # (Compared exactly: a brightness change may move the mean loss by less than 1e-4.)
    first, second = (float(train.train_on_batch(x, np.zeros(8))) for _ in range(2))
    assert first != second


def test_other_random_layers_are_random_in_training_only() -> None:
    x, y = _io("rng_layers")
    model = FineTuner(KERAS2 / "tfk221_rng_layers.h5").model
    classes = {type(layer).__name__ for layer in model.layers}
    assert {"Dropout", "GaussianNoise", "AlphaDropout", "MultiHeadAttention", "LSTM"} <= classes
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    np.testing.assert_allclose(model(x, training=False), y, atol=1e-5)
    assert _differs(model(x, training=True), model(x, training=True))


def test_random_height_width_and_crop_stand_ins() -> None:
    from keras.preprocessing.image import smart_resize

    x = np.random.default_rng(0).random((2, 10, 12, 3)).astype("float32")
    height, width = RandomHeight(0.5, seed=1), RandomWidth((0.2, 0.4), interpolation="nearest")
    np.testing.assert_array_equal(height(x, training=False), x)
    np.testing.assert_array_equal(width(x, training=False), x)
    if ON_TENSORFLOW:
        heights = {np.asarray(height(x, training=True)).shape[1] for _ in range(8)}
        assert heights <= set(range(5, 16)) and len(heights) > 1
        widths = {np.asarray(width(x, training=True)).shape for _ in range(8)}
        assert all(s[:2] == (2, 10) and 14 <= s[2] <= 16 for s in widths)
    else:
        with pytest.raises(ModelLoadError, match=r"RandomWidth.*KERAS_BACKEND=tensorflow"):
            width(x, training=True)
    assert height.compute_output_shape((None, 10, 12, 3)) == (None, None, 12, 3)
    again = RandomWidth.from_config(width.get_config())
    assert (again.factor, again.interpolation) == ((0.2, 0.4), "nearest")
    with pytest.raises(ValueError, match="factor"):
        RandomHeight((0.3, 0.1))
    # Keras 2's RandomCrop: the central window resized in inference (and in training for
    # images smaller than the crop), a random window in training, on every backend.
    crop = Keras2RandomCrop(6, 6, seed=0)
    np.testing.assert_allclose(crop(x, training=False), smart_resize(x, (6, 6)), atol=1e-5)
    windows = [np.asarray(crop(x, training=True)) for _ in range(4)]
    assert all(w.shape == (2, 6, 6, 3) for w in windows)
    assert any(_differs(w, windows[0]) for w in windows[1:])
    # Each window is a 6x6 block of the input.
    assert all(
        any(np.array_equal(w, x[:, i : i + 6, j : j + 6]) for i in range(5) for j in range(7))
        for w in windows
    )
    assert np.asarray(Keras2RandomCrop(12, 14)(x, training=True)).shape == (2, 12, 14, 3)
    assert np.asarray(crop(x[0], training=False)).shape == (6, 6, 3)
    # Compiled, in a model: the same inference crop, and training steps through random windows.
    model = keras.Sequential(
        [keras.Input((10, 12, 3)), crop, keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    cropped = keras.Model(model.inputs, model.layers[0].output)
    np.testing.assert_allclose(cropped.predict(x, verbose=0), smart_resize(x, (6, 6)), atol=1e-5)
    model.compile(keras.optimizers.SGD(0.0), "mse")  # weights fixed: losses vary by the crops
    losses = [model.train_on_batch(x, np.ones(2)) for _ in range(3)]
    assert np.isfinite(losses).all() and len(set(np.round(losses, 6).tolist())) > 1


def _layer(class_name: str, **config: Any) -> dict[str, Any]:
    return {"class_name": class_name, "config": {"name": class_name.lower(), **config}}


def test_keras2_config_drops_only_the_known_tf_keras_2_16_arguments() -> None:
    lstm_cell = _layer("LSTMCell", units=3, rng_type="stateful")
    config = {
        "class_name": "Sequential",
        "config": {
            "name": "m",
            "layers": [
                _layer("RandomZoom", height_factor=0.1, rng_type="stateful"),
                _layer("Dropout", rate=0.1, rng_type="stateless"),
                _layer("RandomWidth", factor=0.1, rng_type="stateful"),
                _layer("MultiHeadAttention", num_heads=2, key_dim=2, softmax_robust_masking=True),
                _layer("Softmax", axis=-1, robust_masking=True),
                _layer("DepthwiseConv1D", kernel_size=3, groups=1),
                _layer("RNN", cell=_layer("StackedRNNCells", cells=[lstm_cell])),
                # A custom class (not a Keras 3 built-in) keeps its own arguments, as does a
                # value Keras 2 never wrote.
                _layer("MyNoise", rng_type="stateful"),
                _layer("GaussianNoise", stddev=0.1, rng_type="other"),
            ],
        },
    }
    fixed = [layer["config"] for layer in keras2_config(config)["config"]["layers"]]
    assert [sorted(c) for c in fixed[:6]] == [
        ["height_factor", "name"],
        ["name", "rate"],
        ["factor", "name"],
        ["key_dim", "name", "num_heads"],
        ["axis", "name"],
        ["kernel_size", "name"],
    ]
    assert "rng_type" not in fixed[6]["cell"]["config"]["cells"][0]["config"]
    assert fixed[7]["rng_type"] == "stateful" and fixed[8]["rng_type"] == "other"
    assert config["config"]["layers"][0]["config"]["rng_type"] == "stateful"  # input unchanged
