"""Every error a user can cause: its class, its message, and an unchanged model afterwards."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Pretrained

from transferkit import (
    ConfigError,
    DataError,
    FineTuner,
    LayerNotFoundError,
    ModelLoadError,
    NotCompiledError,
    TransferkitError,
)


def _state(model: keras.Model) -> tuple[list[np.ndarray], list[bool]]:
    return [w.copy() for w in model.get_weights()], [bool(v.trainable) for v in model.weights]


def _assert_same(model: keras.Model, state: tuple[list[np.ndarray], list[bool]]) -> None:
    weights, flags = _state(model)
    assert flags == state[1]
    for a, b in zip(state[0], weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_error_classes_derive_from_the_builtins_users_catch() -> None:
    assert issubclass(LayerNotFoundError, KeyError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    for cls in (LayerNotFoundError, ModelLoadError, NotCompiledError, ConfigError, DataError):
        assert issubclass(cls, TransferkitError)


def test_layer_not_found_by_name_lists_closest_names_and_count(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    with pytest.raises(LayerNotFoundError) as info:
        tuner.freeze_until("fc3")
    msg = str(info.value)
    assert "'fc3'" in msg and "'fc1'" in msg and "'fc2'" in msg
    assert "8 top-level layers" in msg
    assert not msg.startswith('"')  # not KeyError's quoted repr


def test_layer_not_found_by_index_and_selector(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    with pytest.raises(LayerNotFoundError, match=r"index 8 is out of range.*-8\.\.7"):
        tuner.freeze_until(8)
    with pytest.raises(LayerNotFoundError, match=r"index -9"):
        tuner.freeze_until(-9)
    with pytest.raises(LayerNotFoundError, match=r"closest names: 'conv"):
        tuner.unfreeze("conv_*")
    other = keras.layers.Dense(3, name="stranger")
    with pytest.raises(LayerNotFoundError, match=r"'stranger'.*not part of model"):
        tuner.freeze(other)


def test_failed_selector_changes_no_flag(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    with pytest.raises(LayerNotFoundError):
        tuner.freeze("fc1", "nope")
    assert all(layer.trainable for layer in tuner.model.layers)


def test_model_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    with pytest.raises(ModelLoadError, match=r"not found.*missing.h5"):
        FineTuner(missing)
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"unsupported model file.*model\.txt.*'\.txt'"):
        FineTuner(txt)
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ModelLoadError, match=r"bad\.h5.*not an HDF5 file"):
        FineTuner(bad_h5)
    bad_keras = tmp_path / "bad.keras"
    bad_keras.write_bytes(b"PK?? broken")
    with pytest.raises(ModelLoadError, match=r"bad\.keras.*not a valid `\.keras` archive"):
        FineTuner.load(bad_keras)
    saved_model = tmp_path / "saved_model_dir"
    saved_model.mkdir()
    with pytest.raises(ModelLoadError, match=r"saved_model_dir.*TFSMLayer"):
        FineTuner(saved_model)


def test_truncated_h5_is_a_model_load_error(pretrained: Pretrained, tmp_path: Path) -> None:
    cut = tmp_path / "truncated.h5"
    cut.write_bytes(pretrained.h5.read_bytes()[:2000])
    with pytest.raises(ModelLoadError, match=r"truncated.h5"):
        FineTuner(cut)


def test_not_compiled(pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.model)
    state = _state(tuner.model)
    with pytest.raises(NotCompiledError, match=r"compile_sgd\(.*\.compile\("):
        tuner.fit(x, y, epochs=1, verbose=0)
    _assert_same(tuner.model, state)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.compile_sgd(lr=-1e-3), "lr must be a finite number > 0"),
        (lambda t: t.compile_sgd(lr=0), "lr must be a finite number > 0"),
        (lambda t: t.compile_sgd(lr=float("nan")), "lr must be"),
        (lambda t: t.compile_sgd(momentum=1.5), "momentum must be"),
        (lambda t: t.replace_head(3, regression=True), "exactly one"),
        (lambda t: t.freeze_until(1.5), "must be a name, an int index or a layer"),
    ],
)
def test_config_errors(pretrained: Pretrained, call, match: str) -> None:  # type: ignore[no-untyped-def]
    tuner = FineTuner(pretrained.model)
    state = _state(tuner.model)
    with pytest.raises(ConfigError, match=match):
        call(tuner)
    _assert_same(tuner.model, state)
    assert tuner.compile_spec is None and tuner.head is None


def test_unknown_batchnorm_policy_and_bad_model_argument(pretrained: Pretrained) -> None:
    with pytest.raises(ConfigError, match=r"unknown batchnorm policy 'trainable'.*'frozen'"):
        FineTuner(pretrained.model, batchnorm="trainable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"needs a keras.Model or the path"):
        FineTuner(42)  # type: ignore[arg-type]


@pytest.fixture
def compiled(pretrained: Pretrained) -> FineTuner:
    return FineTuner(pretrained.model).freeze_until(-3).replace_head(5).compile_sgd(lr=0.1)


def _raises_and_unchanged(tuner: FineTuner, match: str, *args: object, **kwargs: object) -> str:
    state = _state(tuner.model)
    with pytest.raises(DataError, match=match) as info:
        tuner.fit(*args, epochs=1, verbose=0, **kwargs)
    _assert_same(tuner.model, state)
    return str(info.value)


def test_data_error_shape_mismatch_shows_expected_and_got(
    compiled: FineTuner, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    msg = _raises_and_unchanged(compiled, "input shape does not match", x[..., 0], y)
    assert "expected (None, 8, 8, 1), got (None, 8, 8)" in msg
    assert "x[..., None]" in msg
    msg = _raises_and_unchanged(compiled, "expected", np.zeros((4, 9, 9, 1), "float32"), y[:4])
    assert "got (None, 9, 9, 1)" in msg


def test_data_error_labels_out_of_range(
    compiled: FineTuner, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    msg = _raises_and_unchanged(compiled, "class labels must lie in 0..4", x, y + 5)
    assert "from 5 to 9" in msg
    _raises_and_unchanged(compiled, "0..4", x, y - 1)
    _raises_and_unchanged(compiled, "whole numbers", x, y + 0.5)
    # Validation data is checked as well.
    _raises_and_unchanged(compiled, "validation data.*0..4", x, y, validation_data=(x, y + 5))


def test_data_error_length_mismatch_and_empty_data(
    compiled: FineTuner, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    _raises_and_unchanged(compiled, r"x has 50 samples but y has 49", x, y[:-1])
    _raises_and_unchanged(compiled, "empty", x[:0], y[:0])
    _raises_and_unchanged(compiled, "no data given", None)
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(4)
    _raises_and_unchanged(compiled, "dataset is empty", empty)
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    _raises_and_unchanged(compiled, r"Batch the dataset", unbatched)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    _raises_and_unchanged(compiled, "1 NaN or infinite", nan, y)


def test_data_error_one_hot_width(compiled: FineTuner, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, _, _ = few_shot
    _raises_and_unchanged(compiled, "sparse class labels must be a 1-D", x, np.eye(6)[y])
