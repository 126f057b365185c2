"""Checkpoints, interrupts, divergence, restore_best and provenance, in process.

The kill-based tests (SIGKILL mid-epoch, the fault loop, the oneDNN crash) are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from conftest import Pretrained, few_shot_split

import transferkit
from transferkit import CheckpointError, FineTuner
from transferkit.results.provenance import file_sha256
from transferkit.train.fit import FitOptions, run_fit

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def make_tuner(pretrained: Pretrained, lr: float = 0.05, seed: int = 7) -> FineTuner:
    keras.utils.set_random_seed(seed)
    return (
        FineTuner(pretrained.h5)
        .freeze_until("fc1")
        .replace_head(num_classes=5, hidden=(8,))
        .compile_sgd(lr=lr)
    )


def values(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.variables]


def assert_same(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


def assert_history(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


class Recorder(keras.callbacks.Callback):
    """Counts batches and keeps the full model's variables at the end of every epoch."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.watched = model
        self.batches = 0
        self.epochs: dict[int, list[np.ndarray]] = {}

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.batches += 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs[epoch] = values(self.watched)


class InterruptAt(keras.callbacks.Callback):
    """Sends SIGINT to this process at (epoch, batch), as Ctrl-C in a notebook would."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


FIT = {"epochs": 4, "batch_size": 10, "shuffle": False, "verbose": 0}


@pytest.fixture(scope="module")
def reference(pretrained: Pretrained, few_shot: Data) -> tuple[list[np.ndarray], Any]:
    """An uninterrupted 4-epoch run without checkpoints."""
    x, y, _, _ = few_shot
    result = make_tuner(pretrained).fit(x, y, **FIT)
    return values(result.model), result.history


@pytest.fixture(scope="module")
def few_shot(digits: Any) -> Data:  # module-scoped twin of the conftest fixture
    return few_shot_split(digits)


def test_interrupt_then_resume_matches_uninterrupted(
    pretrained: Pretrained, few_shot: Data, reference: Any, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ref_values, ref_history = reference
    ckpt = tmp_path / "ckpt"
    tuner = make_tuner(pretrained)
    rec = Recorder(tuner.model)
    first = tuner.fit(x, y, checkpoint_dir=ckpt, callbacks=[rec, InterruptAt(2, 3)], **FIT)
    assert first.interrupted and first.epochs == 2
    assert_same(values(first.model), rec.epochs[1], rtol=0)  # end of the last finished epoch
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "fit", "manifest.json"]

    # A rebuilt model (new auto-generated names) resumes at epoch 3 and joins the history.
    tuner2 = make_tuner(pretrained)
    rec2 = Recorder(tuner2.model)
    second = tuner2.fit(x, y, checkpoint_dir=ckpt, callbacks=[rec2], **FIT)
    assert not second.interrupted
    assert rec2.batches == 2 * 5 and sorted(rec2.epochs) == [2, 3]
    assert second.epochs == 4
    assert_history(second.history, ref_history)
    assert_same(values(second.model), ref_values)

    # A finished run returns the stored result at once, with the final weights loaded.
    tuner3 = make_tuner(pretrained)
    rec3 = Recorder(tuner3.model)
    third = tuner3.fit(x, y, checkpoint_dir=ckpt, callbacks=[rec3], **FIT)
    assert rec3.batches == 0
    assert third.epochs == 4 and not third.interrupted
    assert second.cached and (third.cached, third.cache_layer) == (True, second.cache_layer)
    assert_history(third.history, ref_history)
    assert_same(values(third.model), ref_values)


def test_interrupt_cleans_up_and_can_reraise(pretrained: Pretrained, few_shot: Data) -> None:
    x, y, _, _ = few_shot
    pools_before = {t for t in threading.enumerate() if "ThreadPoolExecutor" in t.name}
    tuner = make_tuner(pretrained)
    rec = Recorder(tuner.model)
    start = values(tuner.model)
    result = tuner.fit(x, y, callbacks=[rec, InterruptAt(0, 2)], **FIT)
    assert result.interrupted and result.epochs == 0 and result.history == {}
    assert_same(values(tuner.model), start, rtol=0)
    pools_after = {t for t in threading.enumerate() if "ThreadPoolExecutor" in t.name}
    assert pools_after <= pools_before  # Keras' async callback pool was shut down

    with pytest.raises(KeyboardInterrupt):
        tuner.fit(x, y, raise_on_interrupt=True, callbacks=[rec, InterruptAt(1, 1)], **FIT)
    assert_same(values(tuner.model), rec.epochs[0], rtol=0)


def test_checkpoint_of_another_model_or_plan_is_refused(
    pretrained: Pretrained, bn_model: Pretrained, few_shot: Data, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ckpt = tmp_path / "ckpt"
    make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, epochs=1, batch_size=25, verbose=0)
    listing = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))

    other = FineTuner(bn_model.h5).replace_head(num_classes=5).compile_sgd(lr=0.05)
    before = values(other.model)
    with pytest.raises(CheckpointError, match="different model or plan: the architecture"):
        other.fit(x, y, checkpoint_dir=ckpt, epochs=1, batch_size=25, verbose=0)
    assert_same(values(other.model), before, rtol=0)

    with pytest.raises(CheckpointError, match=r"the plan .* differ.*optimizer"):
        make_tuner(pretrained, lr=0.01).fit(
            x, y, checkpoint_dir=ckpt, epochs=1, batch_size=25, verbose=0
        )
    with pytest.raises(CheckpointError, match=r"the frozen weights.*Plan entries that differ: x"):
        tuner = make_tuner(pretrained)
        tuner.model.get_layer("conv1").kernel.assign(tuner.model.get_layer("conv1").kernel * 2)
        tuner.fit(x * 0.5, y, checkpoint_dir=ckpt, epochs=1, batch_size=25, verbose=0)
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == listing

    stranger = tmp_path / "not_a_checkpoint"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a transferkit checkpoint"):
        make_tuner(pretrained).fit(x, y, checkpoint_dir=stranger, epochs=1, verbose=0)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


def _two_phases(
    pretrained: Pretrained, x: np.ndarray, y: np.ndarray, ckpt: Path | None, stop: Any = None
) -> tuple[FineTuner, list[Any]]:
    """A head phase then a full phase through run_fit, as FineTuner.fine_tune runs them."""
    tuner = make_tuner(pretrained)
    results = []
    for phase, extra in (("head", []), ("full", [stop] if stop else [])):
        if phase == "full":
            tuner.unfreeze().compile_sgd(lr=0.01)
        model = tuner.ensure_compiled(y)
        options = FitOptions(checkpoint_dir=ckpt, phase=phase)
        kwargs = {**FIT, "epochs": 3, "callbacks": extra}
        compiled = tuner._compile.compiled
        assert compiled is not None
        results.append(run_fit(model, x, y, kwargs, options, compile_args=compiled.args))
    return tuner, results


def test_multi_phase_resumes_in_the_right_phase(
    pretrained: Pretrained, few_shot: Data, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ref_tuner, ref = _two_phases(pretrained, x, y, None)
    ckpt = tmp_path / "ckpt"
    _, partial = _two_phases(pretrained, x, y, ckpt, stop=InterruptAt(1, 2))
    assert partial[1].interrupted and partial[1].epochs == 1
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert [p["name"] for p in manifest["phases"]] == ["head", "full"]

    tuner, resumed = _two_phases(pretrained, x, y, ckpt)
    assert resumed[0].epochs == 3 and resumed[0].phases == [("head", 3)]
    assert resumed[1].epochs == 3 and resumed[1].phases == [("full", 3)]
    assert_history(resumed[1].history, ref[1].history)
    assert_same(values(tuner.model), values(ref_tuner.model))


class Shake(keras.callbacks.Callback):
    """Adds large noise to the trainable weights when `epoch` begins: later epochs get worse."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            rng = np.random.default_rng(0)
            for v in self.model.trainable_variables:
                v.assign(v.numpy() + rng.normal(0, 2.0, v.shape).astype(v.dtype))


def test_restore_best_ends_with_best_epoch(
    pretrained: Pretrained, few_shot: Data, tmp_path: Path
) -> None:
    x, y, xv, yv = few_shot
    kwargs: dict[str, Any] = {**FIT, "epochs": 5, "validation_data": (xv[:100], yv[:100])}
    tuner = make_tuner(pretrained)
    rec = Recorder(tuner.model)
    result = tuner.fit(x, y, restore_best=True, callbacks=[rec, Shake(3)], **kwargs)
    assert result.monitor == "val_loss"
    assert 1 <= result.best_epoch <= 3 and result.epochs == 5
    assert_same(values(result.model), rec.epochs[result.best_epoch - 1], rtol=0)

    # With a checkpoint the best weights survive an interruption.
    ckpt = tmp_path / "best"
    make_tuner(pretrained).fit(
        x,
        y,
        checkpoint_dir=ckpt,
        restore_best=True,
        callbacks=[Shake(3), InterruptAt(4, 1)],
        **kwargs,
    )
    resumed = make_tuner(pretrained).fit(
        x, y, checkpoint_dir=ckpt, restore_best=True, callbacks=[Shake(3)], **kwargs
    )
    assert resumed.best_epoch == result.best_epoch
    assert_same(values(resumed.model), values(result.model))


class SetLearningRate(keras.callbacks.Callback):
    """Sets the learning rate to `lr` before (epoch, batch)."""

    def __init__(self, epoch: int, batch: int, lr: float) -> None:
        super().__init__()
        self.at, self.lr, self.epoch = (epoch, batch), lr, 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if (self.epoch, batch) == self.at:
            self.model.optimizer.learning_rate.assign(self.lr)


@pytest.mark.parametrize(
    ("lr", "epoch", "batch", "finished"),
    [
        (1e30, 2, 0, 2),  # the loss itself turns NaN/inf during epoch 3
        (
            float("inf"),
            1,
            4,
            1,
        ),  # epoch 2's last update leaves inf weights; its mean loss is finite
    ],
)
def test_divergence_rolls_back(
    pretrained: Pretrained, few_shot: Data, lr: float, epoch: int, batch: int, finished: int
) -> None:
    x, y, _, _ = few_shot
    tuner = make_tuner(pretrained)
    rec = Recorder(tuner.model)
    match = f"loss diverged .* in epoch {epoch + 1}.* rolled back to the end of epoch {finished},"
    with pytest.warns(RuntimeWarning, match=match):
        result = tuner.fit(x, y, callbacks=[rec, SetLearningRate(epoch, batch, lr)], **FIT)
    assert result.diverged and not result.interrupted
    assert result.epochs == finished
    assert all(np.isfinite(v).all() for v in result.history.values())
    assert_same(values(result.model), rec.epochs[finished - 1], rtol=0)
    assert all(np.isfinite(w).all() for w in result.model.get_weights())


def test_save_writes_provenance_and_load_reads_it(
    pretrained: Pretrained, few_shot: Data, tmp_path: Path
) -> None:
    x, y, xv, _ = few_shot
    result = make_tuner(pretrained).fit(x, y, epochs=2, batch_size=10, verbose=0)
    path = tmp_path / "tuned.keras"
    result.save(path)
    model, info = transferkit.load(path)
    np.testing.assert_allclose(model.predict(xv[:8], verbose=0), result.predict(xv[:8]))
    assert info["base_model"] == {
        "path": str(pretrained.h5.resolve()),
        "sha256": file_sha256(pretrained.h5),
    }
    assert info["frozen_layers"] == ["conv1", "conv2"]
    assert info["head"]["kind"] == "classification" and info["head"]["units"] == 5
    assert info["optimizer"]["momentum"] == pytest.approx(0.9)
    assert info["fit_arguments"]["epochs"] == 2
    assert info["fit_arguments"]["restore_best"] is False
    assert info["history"]["loss"] == pytest.approx(result.history["loss"])
    backend = keras.backend.backend()
    extra = set() if backend == "tensorflow" else {backend}
    assert set(info["versions"]) == {
        "transferkit", "keras", "tensorflow", "numpy", "keras_backend", *extra
    }  # fmt: skip
    assert info["versions"]["keras_backend"] == backend
    assert info["model_file"]["sha256"] == file_sha256(path)
    # A replaced model file no longer matches its record. (Different weights: two saves of the
    # same model within one second can be byte-identical archives.)
    result.model.layers[-1].kernel.assign(result.model.layers[-1].kernel.numpy() + 1.0)
    result.save(tmp_path / "other.keras")
    os.replace(tmp_path / "other.keras", path)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        transferkit.load(path)


def test_failed_save_keeps_existing_files(
    pretrained: Pretrained, few_shot: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y, _, _ = few_shot
    result = make_tuner(pretrained).fit(x, y, epochs=1, batch_size=25, verbose=0)
    path = tmp_path / "tuned.h5"
    result.save(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(self: keras.Model, filepath: Any, *args: Any, **kwargs: Any) -> None:
        Path(filepath).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    with pytest.raises(transferkit.SaveError, match="disk full"):
        result.save(path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
