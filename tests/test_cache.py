"""The frozen-prefix feature cache: where it cuts, that it trains exactly like plain fit, when it
steps aside, and that its temporary files never outlive a fit."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Digits, Pretrained

from transferkit import FineTuner
from transferkit.errors import ConfigError
from transferkit.train.cache.layers import layer_blocker
from transferkit.train.cache.pipeline import dataset_randomness
from transferkit.train.cache.plan import cut_frontier, plan_cache

FIT = {"epochs": 3, "batch_size": 16, "verbose": 0}


def close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True)
    )


def twin_fits(
    tuner: FineTuner, x: Any, y: Any = None, *, lr: float = 0.05, **kw: Any
) -> tuple[Any, Any, list[np.ndarray], list[np.ndarray]]:
    """Plain fit then cached fit from the same weights and a fresh optimizer each time."""
    start = [w.copy() for w in tuner.model.get_weights()]
    tuner.compile_sgd(lr=lr)
    plain = tuner.fit(x, y, cache=False, **kw)
    plain_w = [w.copy() for w in tuner.model.get_weights()]
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=lr)
    cached = tuner.fit(x, y, cache=True, **kw)
    return plain, cached, plain_w, tuner.model.get_weights()


@pytest.fixture
def small(digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    return digits.x_new[:96], digits.y_new[:96]


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of the cache land here (tempfile honours `tempfile.tempdir`)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def spilled_files(root: Path) -> list[str]:
    """Everything the cache left under `root` (TensorFlow puts autograph files there too)."""
    return [str(p) for p in root.glob("transferkit-cache-*")] + [
        str(p) for p in root.glob("transferkit-cache-*/**/*")
    ]


# ------------------------------------------------------------------------ pure decisions


def test_layer_blocker_rules() -> None:
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    assert layer_blocker(dense) == "is trainable"
    dense.trainable = False
    assert layer_blocker(dense) is None
    assert layer_blocker(keras.layers.Flatten()) is None  # no weights: frozen either way
    for random in (
        keras.layers.Dropout(0.5),
        keras.layers.SpatialDropout2D(0.5),
        keras.layers.GaussianNoise(0.1),
        keras.layers.GaussianDropout(0.1),
        keras.layers.AlphaDropout(0.1),
        keras.layers.RandomFlip(),
    ):
        assert "random" in str(layer_blocker(random)), random
    bn = keras.layers.BatchNormalization(center=False, scale=False)
    bn.build((None, 3))
    assert "BatchNormalization" in str(layer_blocker(bn))  # no trainable weights, still training
    bn.trainable = False
    assert layer_blocker(bn) is None
    reg = keras.layers.Dense(2, activity_regularizer="l2", trainable=False)
    reg.build((None, 3))
    assert "activity" in str(layer_blocker(reg))


def test_cut_frontier_chain_branch_and_two_cuts() -> None:
    # 0 -> a(1) -> b(2) -> c(3) -> out ; a, b cacheable
    nodes = [((0,), (1,), True), ((1,), (2,), True), ((2,), (3,), False)]
    assert cut_frontier(nodes, [0], [3]) == ([2], {0, 1, 2})
    # residual: 1 = stem(0); 2 = branch(1); 3 = add(1, 2); 4 = trainable(3)
    nodes = [((0,), (1,), True), ((1,), (2,), False), ((1, 2), (3,), True), ((3,), (4,), False)]
    frontier, cached = cut_frontier(nodes, [0], [4])
    assert frontier == [1] and 3 not in cached  # add waits for the trainable branch
    # two frozen branches feeding trainable layers: the cut is two tensors
    nodes = [((0,), (1,), True), ((0,), (2,), True), ((1,), (3,), False), ((2,), (4,), False)]
    assert cut_frontier(nodes, [0], [3, 4])[0] == [1, 2]
    # nothing cacheable: the cut is the input itself
    assert cut_frontier([((0,), (1,), False)], [0], [1])[0] == [0]


def test_dataset_randomness_reads_the_pipeline() -> None:
    x, y = np.zeros((8, 3), "float32"), np.zeros(8)
    base = tf.data.Dataset.from_tensor_slices((x, y))
    assert dataset_randomness(base.batch(4)) == (None, None)
    assert dataset_randomness(base.map(lambda a, b: (a * 2, b)).batch(4)) == (None, None)
    assert "shuffle" in str(dataset_randomness(base.shuffle(8).batch(4))[0])
    fixed = base.shuffle(8, seed=1, reshuffle_each_iteration=False).batch(4)
    assert dataset_randomness(fixed)[0] is None
    noisy = base.map(lambda a, b: (a + tf.random.uniform((3,)), b))
    assert "random" in str(dataset_randomness(noisy.batch(4))[0])
    assert dataset_randomness(noisy.cache().batch(4))[0] is None  # one draw, every epoch
    flip = keras.layers.RandomFlip()
    images = tf.data.Dataset.from_tensor_slices((np.zeros((8, 4, 4, 1), "float32"), y)).batch(4)
    assert dataset_randomness(images.map(lambda a, b: (flip(a), b)))[0] is not None
    gen = tf.data.Dataset.from_generator(
        lambda: iter([(x[:4], y[:4])]),
        output_signature=(tf.TensorSpec((None, 3)), tf.TensorSpec((None,), tf.float64)),
    )
    assert dataset_randomness(gen) == (None, dataset_randomness(gen)[1])
    assert dataset_randomness(gen)[1] is not None


# -------------------------------------------------------------------------- exactness


def test_exact_with_shuffle_false_and_validation(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray], digits: Digits
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2")
    tuner.freeze_until(-2)  # the two head Dense layers train
    val = (digits.x_new[100:140], digits.y_new[100:140])
    plain, cached, pw, cw = twin_fits(tuner, *small, shuffle=False, validation_data=val, **FIT)
    assert not plain.cached and cached.cached
    assert cached.cache_layer == tuner.model.layers[-3].name
    assert close(pw, cw)
    assert (
        set(plain.history)
        == set(cached.history)
        == {"loss", "accuracy", "val_loss", "val_accuracy"}
    )
    for key in plain.history:
        assert np.allclose(plain.history[key], cached.history[key], rtol=1e-4, atol=1e-5), key
    assert cached.epochs == 3 and cached.best_epoch == plain.best_epoch


def test_validation_split_sample_and_class_weights(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    sw = np.linspace(0.2, 2.0, len(small[1])).astype("float32")
    _, cached, pw, cw = twin_fits(
        tuner, *small, shuffle=False, validation_split=0.25, sample_weight=sw, **FIT
    )
    assert cached.cached and "val_loss" in cached.history and close(pw, cw)
    plain, cached, pw, cw = twin_fits(
        tuner, *small, shuffle=False, class_weight={0: 3.0, 1: 0.5}, **FIT
    )
    assert cached.cached and close(pw, cw)
    assert np.allclose(plain.history["loss"], cached.history["loss"], rtol=1e-4)


def test_shuffled_loss_curves_agree(pretrained: Pretrained, digits: Digits) -> None:
    x, y = digits.x_new[:400], digits.y_new[:400]
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(16,), at="fc2").freeze_until(-2)
    keras.utils.set_random_seed(7)
    plain, cached, _, _ = twin_fits(tuner, x, y, lr=0.02, epochs=6, batch_size=16, verbose=0)
    assert cached.cached
    p, c = np.array(plain.history["loss"]), np.array(cached.history["loss"])
    # Different batch orders, same optimisation: both fall, and epoch by epoch they stay close.
    assert p[-1] < 0.8 * p[0] and c[-1] < 0.8 * c[0]
    assert np.all(np.abs(p - c) <= 0.15 * p + 0.02), (p, c)


def test_dropout_in_the_prefix_moves_the_cut(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    # The pre-trained CNN ends fc1, fc2, drop(0.1), out: training only `out` would cache
    # through fc2, but the Dropout is random in training mode, so the cut falls before it.
    tuner = FineTuner(pretrained.model).freeze_until("out")
    plan = plan_cache(tuner.model)
    assert plan.cut_layer == "fc2" and "fc1" in plan.prefix_layers
    assert "drop" not in plan.prefix_layers  # it runs, random, in the trained part
    assert "drop" in [layer.name for layer in plan.suffix.layers]
    tuner.compile_sgd(lr=0.05)
    result = tuner.fit(*small, **FIT)
    assert result.cached and result.cache_layer == "fc2"


def test_dropout_family_at_rate_zero_is_deterministic() -> None:
    for inert in (
        keras.layers.Dropout(0.0),
        keras.layers.SpatialDropout1D(0.0),
        keras.layers.SpatialDropout2D(0.0),
        keras.layers.SpatialDropout3D(0.0),
        keras.layers.AlphaDropout(0.0),
        keras.layers.GaussianDropout(0.0),
        keras.layers.GaussianNoise(0.0),
    ):
        assert layer_blocker(inert) is None, inert
    assert "random" in str(layer_blocker(keras.layers.Dropout(1e-6)))

    class NoisyDropout(keras.layers.Dropout):
        """A subclass may draw at rate 0: only the built-in classes are trusted."""

    assert "random" in str(layer_blocker(NoisyDropout(0.0)))


def test_a_rate_zero_dropout_in_the_prefix_is_cached(
    small: tuple[np.ndarray, np.ndarray],
) -> None:
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="conv", trainable=False),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(8, name="fc", trainable=False),
            keras.layers.Dropout(0.0, name="drop0"),
            keras.layers.Dense(5, name="out"),
        ]
    )
    tuner = FineTuner(model)
    plan = plan_cache(tuner.model)
    assert plan.cut_layer == "drop0" and "fc" in plan.prefix_layers
    assert tuner.compile_sgd(lr=0.05).fit(*small, **FIT).cached


def test_batchnorm_in_training_mode_is_not_cached(
    bn_model: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    trained = FineTuner(bn_model.model, batchnorm="train").freeze_until("fc").unfreeze("bn2")
    trained.compile_sgd(lr=0.01)
    assert trained.fit(*small, **FIT).cache_layer == "conv2"
    frozen = FineTuner(bn_model.model).freeze_until("fc").unfreeze("bn2")  # BN stays frozen
    _, cached, pw, cw = twin_fits(frozen, *small, shuffle=False, **FIT)
    assert cached.cache_layer == "gap" and close(pw, cw)


def test_cut_inside_a_nested_base(
    nested_model: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(nested_model.model).freeze_until("base_fc")
    _, cached, pw, cw = twin_fits(tuner, *small, shuffle=False, **FIT)
    assert cached.cached and cached.cache_layer == "base_flatten"
    assert close(pw, cw)


def test_residual_graph_cut_after_add(
    residual_model: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(residual_model.model).freeze_until("side")
    _, cached, pw, cw = twin_fits(tuner, *small, shuffle=False, **FIT)
    assert cached.cache_layer == "add" and close(pw, cw)


def test_two_cut_tensors(small: tuple[np.ndarray, np.ndarray]) -> None:
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inp)
    b = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv_b")(inp)
    a = keras.layers.Dense(6, name="fc_a")(keras.layers.Flatten(name="flat_a")(a))
    b = keras.layers.Dense(6, name="fc_b")(keras.layers.GlobalMaxPooling2D(name="gmp_b")(b))
    out = keras.layers.Dense(5, name="out")(keras.layers.Concatenate(name="cat")([a, b]))
    tuner = FineTuner(keras.Model(inp, out)).freeze("conv_a", "conv_b")
    plan = plan_cache(tuner.model)
    assert len(plan.prefix.outputs) == 2
    _, cached, pw, cw = twin_fits(tuner, *small, shuffle=False, **FIT)
    assert cached.cached and close(pw, cw)


# --------------------------------------------------------------- memory and temp files


class _SeeFiles(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, root: Path, fail: type[BaseException] | None = None) -> None:
        super().__init__()
        self.root, self.fail = root, fail
        self.seen: list[list[str]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seen.append(spilled_files(self.root))
        if self.fail is not None:
            raise self.fail("stop")


def test_memmap_spill_is_exact_and_removed(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray], spill_root: Path
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    see = _SeeFiles(spill_root)
    val = (small[0][:32], small[1][:32])
    start = tuner.model.get_weights()
    tuner.compile_sgd(lr=0.05)
    plain = tuner.fit(*small, cache=False, shuffle=False, validation_data=val, **FIT)
    pw = tuner.model.get_weights()
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=0.05)
    cached = tuner.fit(
        *small,
        cache=True,
        cache_memory=1,
        shuffle=False,
        validation_data=val,
        callbacks=[see],
        **FIT,
    )
    assert cached.cached and close(pw, tuner.model.get_weights())
    assert np.allclose(plain.history["val_loss"], cached.history["val_loss"], rtol=1e-4)
    assert any(f.endswith(".npy") for f in see.seen[0])  # features were on disk during fit
    assert spilled_files(spill_root) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_temp_files_removed_after_an_exception(
    pretrained: Pretrained,
    small: tuple[np.ndarray, np.ndarray],
    spill_root: Path,
    error: type[BaseException],
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    tuner.compile_sgd(lr=0.05)
    see = _SeeFiles(spill_root, fail=error)
    # raise_on_interrupt: by default a KeyboardInterrupt returns an interrupted FitResult.
    with pytest.raises(error):
        tuner.fit(
            *small, cache="auto", cache_memory=1, callbacks=[see], raise_on_interrupt=True, **FIT
        )
    assert see.seen and any(f.endswith(".npy") for f in see.seen[0])
    assert spilled_files(spill_root) == []


# ------------------------------------------------------------------------ datasets


def test_deterministic_dataset_is_cached_exactly(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    ds = tf.data.Dataset.from_tensor_slices(small).map(lambda a, b: (a * 1.0, b)).batch(16)
    val = tf.data.Dataset.from_tensor_slices((small[0][:32], small[1][:32])).batch(8)
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    plain, cached, pw, cw = twin_fits(tuner, ds, epochs=3, verbose=0, validation_data=val)
    assert cached.cached and close(pw, cw)
    assert np.allclose(plain.history["val_loss"], cached.history["val_loss"], rtol=1e-4)


def test_random_datasets_are_not_cached(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    tuner.compile_sgd(lr=0.05)
    base = tf.data.Dataset.from_tensor_slices(small)
    # A reshuffle alone is replayed on the features (tests/test_cache_shuffle.py); one that
    # changes which samples an epoch holds is not.
    shuffled = base.shuffle(96).take(64).batch(16)
    assert not tuner.fit(shuffled, **{**FIT, "batch_size": None}).cached
    with pytest.raises(ConfigError, match="reshuffle_each_iteration=False"):
        tuner.fit(shuffled, cache=True, epochs=2, verbose=0)
    noisy = base.map(lambda a, b: (a + tf.random.uniform(tf.shape(a), 0, 0.01), b))
    assert not tuner.fit(noisy.batch(16), epochs=2, verbose=0).cached
    fixed = tuner.fit(noisy.cache().batch(16), epochs=2, verbose=0)  # the documented opt-in
    assert fixed.cached


def test_pydataset_falls_back(pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]) -> None:
    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            return small[0][i * 16 : (i + 1) * 16], small[1][i * 16 : (i + 1) * 16]

    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    tuner.compile_sgd(lr=0.05)
    assert not tuner.fit(Batches(), epochs=2, verbose=0).cached
    with pytest.raises(ConfigError, match="PyDataset"):
        tuner.fit(Batches(), epochs=2, verbose=0, cache=True)


# ------------------------------------------------------------------------ callbacks


def test_callbacks_see_the_full_model(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    tuner.compile_sgd(lr=0.5)
    ckpt = keras.callbacks.ModelCheckpoint(tmp_path / "m.keras")
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", patience=0, min_delta=10.0, restore_best_weights=True
    )
    result = tuner.fit(*small, epochs=6, batch_size=16, verbose=0, callbacks=[ckpt, stop])
    assert result.cached and result.epochs == 2  # stopped by EarlyStopping through the bridge
    assert stop.model is tuner.model and ckpt.model is tuner.model
    assert close(tuner.model.get_weights(), stop.best_weights)  # the full model's weights
    saved = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert saved.inputs[0].shape[1:] == (8, 8, 1)  # it takes raw images
    assert saved.predict(small[0][:4], verbose=0).shape == (4, 5)


class _Unfreezer(keras.callbacks.Callback):  # type: ignore[misc]
    changes_trainable = True


def test_trainable_changing_callbacks_disable_the_cache(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(pretrained.model).replace_head(5, hidden=(8,), at="fc2").freeze_until(-2)
    tuner.compile_sgd(lr=0.05)
    assert not tuner.fit(*small, callbacks=[_Unfreezer()], **FIT).cached
    with pytest.raises(ConfigError, match="changes_trainable"):
        tuner.fit(*small, callbacks=[_Unfreezer()], cache=True, **FIT)


def test_auto_falls_back_and_true_explains(
    pretrained: Pretrained, small: tuple[np.ndarray, np.ndarray]
) -> None:
    tuner = FineTuner(pretrained.model).unfreeze()  # nothing frozen
    tuner.compile_sgd(lr=0.01)
    result = tuner.fit(*small, **FIT)
    assert not result.cached and result.cache_layer is None
    with pytest.raises(ConfigError, match="no frozen layer"):
        tuner.fit(*small, cache=True, **FIT)
    tuner.freeze_until(-2)
    assert not tuner.fit(*small, epochs=1, verbose=0).cached  # one epoch gains nothing
    with pytest.raises(ConfigError, match="cache must be"):
        tuner.fit(*small, cache="yes", **FIT)
    with pytest.raises(ConfigError, match="cache_memory"):
        tuner.fit(*small, cache_memory=-1, **FIT)
