"""`FineTuner.fit` end to end: data sources, residual models, `FitResult`, saving."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Pretrained, weights_of

from transferkit import FineTuner, FitResult


class _Batches(keras.utils.PyDataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int) -> None:
        super().__init__()
        self.x, self.y, self.batch = x, y, batch

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch))

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(i * self.batch, (i + 1) * self.batch)
        return self.x[s], self.y[s]


def test_fit_result_fields(pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, x_test, y_test = few_shot
    tuner = FineTuner(pretrained.h5).freeze_until(-3).compile_sgd(lr=1e-2)
    result = tuner.fit(x, y, epochs=3, batch_size=16, validation_data=(x_test, y_test), verbose=0)
    assert isinstance(result, FitResult)
    assert result.model is tuner.model
    assert result.epochs == 3 and result.phases == [("fit", 3)]
    assert set(result.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in result.history.values())
    assert result.monitor == "val_loss"
    vals = result.history["val_loss"]
    assert result.best == min(vals) and result.best_epoch == vals.index(min(vals)) + 1
    assert result.metrics == {k: v[-1] for k, v in result.history.items()}
    assert result.seconds > 0
    fc2, out = tuner.model.get_layer("fc2"), tuner.model.get_layer("out")
    assert result.trainable_params == fc2.count_params() + out.count_params()
    assert result.trainable_params + result.non_trainable_params == tuner.model.count_params()
    ev = result.evaluate(x_test, y_test)
    assert set(ev) == {"loss", "accuracy"} and ev["loss"] == pytest.approx(vals[-1], rel=1e-4)

    plain = tuner.fit(x, y, epochs=1, verbose=0)
    assert plain.monitor == "loss" and plain.best_epoch == 1


def test_fit_passes_keras_keywords_through(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    seen: list[int] = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    tuner = FineTuner(pretrained.model).compile_sgd(lr=1e-2)
    result = tuner.fit(
        x,
        y,
        epochs=2,
        batch_size=8,
        validation_split=0.2,
        callbacks=[cb],
        class_weight={c: 1.0 for c in range(5)},
        shuffle=False,
        verbose=0,
    )
    assert seen == [0, 1]
    assert "val_loss" in result.history and result.monitor == "val_loss"


def test_fit_on_tf_data_dataset(pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, _, _ = few_shot
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    tuner = FineTuner(pretrained.keras_path).replace_head(5).compile_sgd(lr=1e-2)
    before = weights_of(tuner.model.get_layer("head_output"))
    result = tuner.fit(ds, epochs=2, verbose=0)
    assert result.epochs == 2
    assert not np.array_equal(before[0], weights_of(tuner.model.get_layer("head_output"))[0])


def test_fit_on_pydataset(pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.h5).freeze_until("fc1").compile_sgd(lr=1e-2)
    conv = weights_of(tuner.model.get_layer("conv1"))
    fc1 = weights_of(tuner.model.get_layer("fc1"))
    result = tuner.fit(_Batches(x, y, 16), epochs=2, verbose=0)
    assert result.epochs == 2 and np.isfinite(result.history["loss"]).all()
    np.testing.assert_array_equal(conv[0], weights_of(tuner.model.get_layer("conv1"))[0])
    assert not np.array_equal(fc1[0], weights_of(tuner.model.get_layer("fc1"))[0])


def test_residual_model_fine_tunes(
    residual_model: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(residual_model.h5).freeze_until("side").compile_sgd(lr=1e-2)
    flags = {layer.name: layer.trainable for layer in tuner.model.layers[1:]}
    assert flags == {
        "stem": False,
        "branch": False,
        "add": False,
        "side": True,
        "concat": True,
        "gap": True,
        "fc": True,
        "out": True,
    }
    stem = weights_of(tuner.model.get_layer("stem"))
    side = weights_of(tuner.model.get_layer("side"))
    tuner.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(stem[0], weights_of(tuner.model.get_layer("stem"))[0])
    assert not np.array_equal(side[0], weights_of(tuner.model.get_layer("side"))[0])


@pytest.mark.parametrize("loss", [None, "mse", "mean_squared_error"])
def test_saved_regressor_reloads_with_plain_load_model(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], tmp_path: Path, loss: str | None
) -> None:
    x, y, x_test, _ = few_shot
    tuner = FineTuner(pretrained.h5).replace_head(regression=True, at=-6)
    tuner.compile_sgd(lr=1e-3, loss=loss, metrics=None if loss is None else ["mae"])
    result = tuner.fit(x, (y + 5).astype("float32"), epochs=1, verbose=0)
    want = result.predict(x_test)
    for suffix in (".keras", ".h5"):
        path = result.save(tmp_path / f"model{suffix}")
        assert path == tmp_path / f"model{suffix}" and path.is_file()
        reloaded = keras.models.load_model(path)
        np.testing.assert_allclose(reloaded.predict(x_test, verbose=0), want, rtol=1e-6, atol=1e-6)


def test_saved_classifier_reloads_and_fine_tunes_again(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    x, y, x_test, _ = few_shot
    result = FineTuner(pretrained.model).replace_head(5).compile_sgd(lr=1e-2).fit(x, y, verbose=0)
    want = result.predict(x_test)
    for suffix in (".keras", ".h5"):
        path = result.save(tmp_path / f"clf{suffix}")
        reloaded = keras.models.load_model(path)
        np.testing.assert_allclose(reloaded.predict(x_test, verbose=0), want, atol=1e-6)
    again = FineTuner(path).freeze_until(-1).compile_sgd(lr=1e-2).fit(x, y, verbose=0)
    assert again.trainable_params == 64 * 5 + 5


def test_summary_and_repr(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model).freeze_until("fc2").replace_head(3, hidden=(8,))
    text = tuner.summary()
    for name in ("conv1", "fc2", "head_dense_1", "head_output"):
        assert name in text
    trainable = sum(
        tuner.model.get_layer(n).count_params() for n in ("fc2", "head_dense_1", "head_output")
    )
    assert f"{trainable:,}" in text
    assert "classification(3)" in repr(tuner) and "compiled=no" in repr(tuner)
