"""Training recipes: two-phase `fine_tune`, discriminative learning rates, gradual unfreezing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from conftest import Pretrained, loss_gradients, weights_of

import transferkit
from transferkit import (
    ConfigError,
    DataError,
    FineTuner,
    GradualUnfreezing,
    LayerNotFoundError,
    NotCompiledError,
    TransferkitError,
    UnfreezeAt,
)

FewShot = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------ helpers


def mlp(name: str = "mlp") -> keras.Model:
    """A small Functional MLP: d1 -> d2 -> out (3 classes, logits)."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="d1")(inp)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inp, out, name=name)


@pytest.fixture
def blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return x, y


def gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[int, np.ndarray]:
    """The gradient of the compiled loss (mean over the batch) for every trainable variable."""
    grads = loss_gradients(model, x, y)
    return {id(v): g for v, g in zip(model.trainable_variables, grads, strict=True)}


def applied_lr(before: np.ndarray, after: np.ndarray, grad: np.ndarray) -> float:
    """The learning rate a plain SGD step applied: -(weight delta) / gradient."""
    mask = np.abs(grad) > 1e-4
    assert mask.sum() > 0
    return float(np.median(-(after[mask] - before[mask]) / grad[mask]))


def one_step_lrs(tuner: FineTuner, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Trains one full-batch step and returns the applied learning rate per kernel."""
    model = tuner.ensure_compiled(y)
    kernels = {
        layer.name: layer.kernel
        for layer in model.layers
        if getattr(layer, "trainable", False)
        if hasattr(layer, "kernel")
    }
    grads = gradients(model, x, y)
    before = {name: k.numpy().copy() for name, k in kernels.items()}
    tuner.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    return {name: applied_lr(before[name], k.numpy(), grads[id(k)]) for name, k in kernels.items()}


class EpochWeights(keras.callbacks.Callback):  # type: ignore[misc]
    """Records the weights of some layers at the end of every epoch (and the epoch numbers)."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names
        self.start: dict[str, list[np.ndarray]] = {}
        self.ends: list[dict[str, list[np.ndarray]]] = []
        self.epochs: list[int] = []

    def on_train_begin(self, logs: Any = None) -> None:
        if not self.start:
            self.start = {n: weights_of(self.model.get_layer(n)) for n in self.names}

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)
        self.ends.append({n: weights_of(self.model.get_layer(n)) for n in self.names})

    def changed_in(self, name: str) -> list[bool]:
        """For every epoch: did `name`'s weights change during it?"""
        prev = self.start[name]
        out = []
        for end in self.ends:
            out.append(any(not np.array_equal(a, b) for a, b in zip(prev, end[name], strict=True)))
            prev = end[name]
        return out


def momentum_of(opt: keras.optimizers.Optimizer, var: keras.Variable) -> np.ndarray:
    if isinstance(opt, keras.optimizers.MultiOptimizer):
        opt = opt.optimizers[opt._var_to_optimizer_idx[opt._var_key(var)]]
    return np.asarray(opt.momentums[opt._get_variable_index(var)].numpy())


class OptimizerProbe(keras.callbacks.Callback):  # type: ignore[misc]
    """At the start of `epoch`, records the optimizer, its step count and one momentum slot."""

    def __init__(self, epoch: int, layer: str) -> None:
        super().__init__()
        self.epoch, self.layer = epoch, layer
        self.seen: dict[str, Any] = {}

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            opt = self.model.optimizer
            var = self.model.get_layer(self.layer).kernel
            self.seen = {
                "optimizer": opt,
                "iterations": int(opt.iterations.numpy()),
                "momentum": momentum_of(opt, var),
            }


# ----------------------------------------------------------------------------- 1. fine_tune


def test_fine_tune_trains_head_then_body(pretrained: Pretrained, few_shot: FewShot) -> None:
    x, y, xv, yv = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(num_classes=5).compile_sgd(lr=0.05)
    rec = EpochWeights("conv1", "fc1", "head_output")
    result = tuner.fine_tune(
        x,
        y,
        head_epochs=2,
        epochs=3,
        validation_data=(xv, yv),
        batch_size=16,
        verbose=0,
        callbacks=[rec],
    )
    assert result.phases == [("head", 2), ("full", 3)]
    assert result.epochs == 5 and len(result.history["val_loss"]) == 5
    assert rec.epochs == [0, 1, 2, 3, 4]  # epochs numbered across the phases
    assert rec.changed_in("conv1") == [False, False, True, True, True]
    assert rec.changed_in("fc1") == [False, False, True, True, True]
    assert all(rec.changed_in("head_output"))
    val = result.history["val_loss"]
    assert result.best_epoch == int(np.argmin(val)) + 1 and result.best == min(val)
    # Phase "full" ran at lr * lr_factor; the compile configuration is the one given.
    assert float(tuner.model.optimizer.learning_rate.numpy()) == pytest.approx(0.005)
    assert tuner.compile_spec is not None and tuner.compile_spec.lr_scale == 1.0
    assert all(layer.trainable for layer in tuner.model.layers[1:])
    # Every phase starts from a fresh optimizer: phase "full" counted only its own steps.
    assert int(tuner.model.optimizer.iterations.numpy()) == 3 * int(np.ceil(len(x) / 16))


def test_fine_tune_full_phase_step_is_lr_times_factor(
    blobs: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.2, momentum=0.0)
    model = tuner.model
    grads_box: dict[str, Any] = {}

    class Capture(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if epoch == 1:
                grads_box["g"] = gradients(model, x, y)
                grads_box["w"] = {
                    n: model.get_layer(n).kernel.numpy().copy() for n in ("d1", "out")
                }

    tuner.fine_tune(
        x,
        y,
        head_epochs=1,
        epochs=1,
        lr_factor=0.25,
        batch_size=len(x),
        shuffle=False,
        verbose=0,
        callbacks=[Capture()],
    )
    for name in ("d1", "out"):
        kernel = model.get_layer(name).kernel
        lr = applied_lr(grads_box["w"][name], kernel.numpy(), grads_box["g"][id(kernel)])
        assert lr == pytest.approx(0.05, rel=1e-3)


def test_fine_tune_without_replace_head_trains_output_layer(
    blobs: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.05)
    rec = EpochWeights("d2", "out")
    result = tuner.fine_tune(x, y, head_epochs=1, epochs=1, verbose=0, callbacks=[rec])
    assert result.phases == [("head", 1), ("full", 1)]
    assert rec.changed_in("out") == [True, True]
    assert rec.changed_in("d2") == [False, True]


def test_fine_tune_keeps_user_frozen_layers_and_batchnorm_policy(
    bn_model: Pretrained, few_shot: FewShot
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(bn_model.keras_path).freeze("conv1").replace_head(num_classes=5)
    tuner.compile("adam")
    bn_before = weights_of(tuner.model.get_layer("bn2"))
    rec = EpochWeights("conv1", "conv2", "bn2")
    tuner.fine_tune(x, y, head_epochs=1, epochs=2, batch_size=16, verbose=0, callbacks=[rec])
    assert rec.changed_in("conv1") == [False, False, False]  # frozen by the user: stays frozen
    assert rec.changed_in("conv2") == [False, True, True]
    assert not tuner.model.get_layer("bn2").trainable  # batchnorm="frozen" (the default)
    for a, b in zip(bn_before, weights_of(tuner.model.get_layer("bn2")), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fine_tune_restore_best_covers_both_phases(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.05)
    rec = EpochWeights("d1", "out")

    class Spoil(keras.callbacks.Callback):  # type: ignore[misc]
        """Makes phase "full" worse than phase "head": wildly overconfident logits."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if epoch == 2:
                kernel = self.model.get_layer("out").kernel
                kernel.assign(kernel * 100.0)

    result = tuner.fine_tune(
        x,
        y,
        head_epochs=2,
        epochs=1,
        validation_data=(x[:16], y[:16]),
        verbose=0,
        restore_best=True,
        callbacks=[rec, Spoil()],
    )
    assert result.best_epoch in (1, 2), result.history
    for name in ("d1", "out"):
        for a, b in zip(
            rec.ends[result.best_epoch - 1][name],
            weights_of(tuner.model.get_layer(name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_fine_tune_errors_change_nothing(pretrained: Pretrained, few_shot: FewShot) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(num_classes=5)
    with pytest.raises(NotCompiledError):
        tuner.fine_tune(x, y)
    tuner.compile_sgd(lr=0.01)
    for kwargs in (
        {"head_epochs": -1},
        {"head_epochs": 0, "epochs": 0},
        {"lr_factor": 0.0},
        {"lr_factor": float("nan")},
        {"initial_epoch": 2},
    ):
        with pytest.raises(ConfigError):
            tuner.fine_tune(x, y, verbose=0, **kwargs)
    flags = [layer.trainable for layer in tuner.model.layers]
    with pytest.raises(DataError):
        tuner.fine_tune(x, y + 10, verbose=0)  # labels out of range
    assert [layer.trainable for layer in tuner.model.layers] == flags


# ---------------------------------------------------------------- 2. discriminative rates


def test_lr_mult_scales_the_applied_step(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.1, momentum=0.0, lr_mult={"d1": 0.1, "d*": 0.5})
    lrs = one_step_lrs(tuner, x, y)
    # d1 is matched by both entries: the last one wins.
    assert lrs == pytest.approx({"d1": 0.05, "d2": 0.05, "out": 0.1}, rel=1e-3)
    tuner = FineTuner(mlp()).compile_sgd(lr=0.1, momentum=0.0, lr_mult={"d*": 0.5, "d1": 0.1})
    assert one_step_lrs(tuner, x, y) == pytest.approx(
        {"d1": 0.01, "d2": 0.05, "out": 0.1}, rel=1e-3
    )


def test_layer_decay_and_class_selector(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile(
        keras.optimizers.SGD(0.1), lr_mult={keras.layers.Dense: 2.0}, layer_decay=0.5
    )
    assert one_step_lrs(tuner, x, y) == pytest.approx({"d1": 0.05, "d2": 0.1, "out": 0.2}, rel=1e-3)


def test_groups_rebuilt_after_flag_change(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.1, momentum=0.0, layer_decay=0.5)
    tuner.fit(x, y, epochs=1, verbose=0)
    tuner.freeze("d1")  # the old MultiOptimizer would now fail ("Gradients must match ...")
    assert one_step_lrs(tuner, x, y) == pytest.approx({"d2": 0.05, "out": 0.1}, rel=1e-3)


def test_nested_bases_with_same_paths_route_by_identity(
    blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = blobs

    def base(name: str) -> keras.Model:
        inp = keras.Input((6,))
        return keras.Model(
            inp, keras.layers.Dense(4, activation="tanh", name="dense")(inp), name=name
        )

    keras.utils.set_random_seed(5)
    inp = keras.Input((6,), name="x")
    h = keras.layers.Concatenate(name="cat")([base("b1")(inp), base("b2")(inp)])
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    tuner = FineTuner(model).compile_sgd(lr=0.1, momentum=0.0, lr_mult={"b1": 0.1})
    b1, b2 = (tuner.model.get_layer(n).get_layer("dense") for n in ("b1", "b2"))
    assert b1.kernel.path == b2.kernel.path  # paths cannot separate the groups
    grads = gradients(tuner.ensure_compiled(y), x, y)
    before = {n: layer.kernel.numpy().copy() for n, layer in (("b1", b1), ("b2", b2))}
    result = tuner.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    assert applied_lr(before["b1"], b1.kernel.numpy(), grads[id(b1.kernel)]) == pytest.approx(
        0.01, rel=1e-3
    )
    assert applied_lr(before["b2"], b2.kernel.numpy(), grads[id(b2.kernel)]) == pytest.approx(
        0.1, rel=1e-3
    )
    path = result.save(tmp_path / "nested.keras")
    # Paths cannot tell the groups apart on reload: Keras loads the weights and skips the
    # optimizer state with its own warning.
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.predict(x), atol=1e-6)


def test_grouped_model_saves_and_reloads(
    blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = blobs
    tuner = FineTuner(mlp()).compile_sgd(lr=0.05, lr_mult={"d1": 0.1}, layer_decay=0.8)
    result = tuner.fit(x, y, epochs=2, verbose=0)
    path = result.save(tmp_path / "grouped.keras")
    reloaded = keras.models.load_model(path)  # plain Keras, compiled from the saved config
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.predict(x), atol=1e-6)
    opt = reloaded.optimizer
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    # The path patterns put d1 in the same group on reload as in memory.
    d1_lr = 0.05 * 0.1 * 0.8**2
    sub = opt.optimizers[opt._var_to_optimizer_idx[opt._var_key(reloaded.get_layer("d1").kernel)]]
    assert float(sub.learning_rate.numpy()) == pytest.approx(d1_lr, rel=1e-5)
    # Momentum slots came back for the same variables.
    orig = tuner.model.optimizer
    for name in ("d1", "d2", "out"):
        np.testing.assert_allclose(
            momentum_of(opt, reloaded.get_layer(name).kernel),
            momentum_of(orig, tuner.model.get_layer(name).kernel),
        )
    result.save(tmp_path / "grouped.h5")
    keras.models.load_model(tmp_path / "grouped.h5")


def test_schedule_is_scaled_per_group(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    tuner = FineTuner(mlp()).compile(keras.optimizers.SGD(schedule), lr_mult={"d1": 0.1})
    tuner.fine_tune(x, y, head_epochs=1, epochs=1, lr_factor=0.5, verbose=0)
    rates = sorted(
        sub.get_config()["learning_rate"]["config"]["initial_learning_rate"]
        for sub in tuner.model.optimizer.optimizers
    )
    assert rates == pytest.approx([0.1 * 0.5 * 0.1, 0.1 * 0.5])


def test_custom_schedule_is_wrapped(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs

    class Constant(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
        def __call__(self, step: Any) -> Any:
            return 0.4

        def get_config(self) -> dict[str, Any]:
            return {}

    tuner = FineTuner(mlp()).compile(lambda: keras.optimizers.SGD(Constant()), lr_mult={"d1": 0.5})
    assert one_step_lrs(tuner, x, y) == pytest.approx({"d1": 0.2, "d2": 0.4, "out": 0.4}, rel=1e-3)


def test_lr_group_validation(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    tuner = FineTuner(mlp())
    for bad in ({"d1": 0}, {"d1": -1.0}, {"d1": float("inf")}, {"d1": True}, {3: 0.5}):
        with pytest.raises(ConfigError):
            tuner.compile_sgd(lr=0.1, lr_mult=bad)
    for decay in (0.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ConfigError):
            tuner.compile_sgd(lr=0.1, layer_decay=decay)
    with pytest.raises(LayerNotFoundError):
        tuner.compile_sgd(lr=0.1, lr_mult={"nope": 0.5})
    with pytest.raises(TransferkitError):
        tuner.compile_sgd(lr=0.1, lr_mult={"conv*": 0.5})
    with pytest.raises(TransferkitError):
        tuner.compile_sgd(lr=0.1, lr_mult={keras.layers.Conv2D: 0.5})
    assert tuner.compile_spec is None and not tuner.model.compiled


# ----------------------------------------------------------------------- 3. unfreezing


def test_unfreeze_at_changes_layers_from_that_epoch_and_keeps_momentum(
    pretrained: Pretrained, few_shot: FewShot
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(num_classes=5)
    tuner.freeze_until("head_dense_1").compile_sgd(lr=0.02, momentum=0.9)
    before, after = OptimizerProbe(2, "head_output"), OptimizerProbe(2, "head_output")
    rec = EpochWeights("conv1", "fc2", "head_output")
    unfreeze = UnfreezeAt(2, ref="fc2", lr_factor=0.5)
    tuner.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[before, unfreeze, after, rec])
    assert rec.changed_in("fc2") == [False, False, True, True]
    assert rec.changed_in("conv1") == [False, False, False, False]  # before ref: still frozen
    assert all(rec.changed_in("head_output"))
    assert unfreeze.switched_at == 2
    steps = 2 * int(np.ceil(len(x) / 16))
    assert before.seen["iterations"] == after.seen["iterations"] == steps
    assert after.seen["optimizer"] is not before.seen["optimizer"]
    assert np.abs(before.seen["momentum"]).sum() > 0
    np.testing.assert_array_equal(after.seen["momentum"], before.seen["momentum"])
    assert float(tuner.model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    assert int(tuner.model.optimizer.iterations.numpy()) == 2 * steps
    # The next fit recompiles (flags changed) and trains at the compiled rate again.
    installed = tuner.model.optimizer
    tuner.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert tuner.model.optimizer is not installed
    assert float(tuner.model.optimizer.learning_rate.numpy()) == pytest.approx(0.02)


def test_gradual_unfreezing_top_down(pretrained: Pretrained, few_shot: FewShot) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(num_classes=5, hidden=())
    tuner.freeze_until("head_output").compile_sgd(lr=0.02)
    cb = GradualUnfreezing(every=2, step=1)
    rec = EpochWeights("fc1", "fc2", "conv2")
    tuner.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[cb, rec])
    # fc2 at epoch 2, fc1 at epoch 4; the weightless dropout/flatten layers go along.
    assert [(e, names[-1]) for e, names in cb.unfrozen] == [(2, "fc2"), (4, "fc1")]
    assert cb.unfrozen[0][1] == ["drop", "fc2"]
    assert rec.changed_in("fc2") == [False, False, True, True, True]
    assert rec.changed_in("fc1") == [False, False, False, False, True]
    assert rec.changed_in("conv2") == [False] * 5


def test_gradual_unfreezing_with_lr_groups_and_batchnorm(
    bn_model: Pretrained, few_shot: FewShot
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(bn_model.keras_path).freeze_until("logits")
    tuner.compile_sgd(lr=0.02, momentum=0.0, layer_decay=0.5)
    cb = GradualUnfreezing(every=1, step=2)
    tuner.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    # BatchNormalization stays frozen under the default policy and is skipped.
    assert cb.unfrozen == [(1, ["fc", "gap", "relu2", "conv2"])]
    assert not tuner.model.get_layer("bn2").trainable
    opt = tuner.model.optimizer
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    conv2 = tuner.model.get_layer("conv2").kernel
    sub = opt.optimizers[opt._var_to_optimizer_idx[opt._var_key(conv2)]]
    assert float(sub.learning_rate.numpy()) == pytest.approx(0.02 * 0.25)
    # batchnorm="train": BN layers count and unfreeze too.
    tuner = FineTuner(bn_model.keras_path, batchnorm="train").freeze_until("logits")
    tuner.compile_sgd(lr=0.02)
    cb = GradualUnfreezing(every=1, step=3)
    tuner.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert tuner.model.get_layer("bn2").trainable
    assert cb.unfrozen[0][1][-1] == "conv2"


def test_callbacks_work_on_plain_keras_fit(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    model = mlp()
    for layer in model.layers[:-1]:
        layer.trainable = False
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    d1 = model.get_layer("d1").kernel.numpy().copy()
    cb = GradualUnfreezing()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb])
    assert [names for _, names in cb.unfrozen] == [["d2"], ["d1"]]
    assert not np.array_equal(d1, model.get_layer("d1").kernel.numpy())
    assert cb.batchnorm_policy == "frozen"


def test_unfreeze_errors(pretrained: Pretrained, few_shot: FewShot) -> None:
    x, y, _, _ = few_shot
    for make in (
        lambda: GradualUnfreezing(every=0),
        lambda: GradualUnfreezing(step=1.5),
        lambda: UnfreezeAt(-1),
        lambda: UnfreezeAt(1, lr_factor=0.0),
        lambda: UnfreezeAt(1, batchnorm="sometimes"),
    ):
        with pytest.raises(ConfigError):
            make()
    tuner = FineTuner(pretrained.keras_path).freeze_until("fc2").compile_sgd(lr=0.01)
    conv1 = weights_of(tuner.model.get_layer("conv1"))
    with pytest.raises(LayerNotFoundError):
        tuner.fit(x, y, epochs=1, verbose=0, callbacks=[UnfreezeAt(0, ref="nope")])
    for a, b in zip(conv1, weights_of(tuner.model.get_layer("conv1")), strict=True):
        np.testing.assert_array_equal(a, b)
    other = FineTuner(pretrained.keras_path).compile_sgd(lr=0.01)
    cb = UnfreezeAt(1)
    cb.bind_tuner(other)
    with pytest.raises(ConfigError):
        tuner.model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])


def test_exports() -> None:
    assert transferkit.train.callbacks.GradualUnfreezing is GradualUnfreezing
    assert transferkit.train.callbacks.UnfreezeAt is UnfreezeAt
    assert GradualUnfreezing.changes_trainable and UnfreezeAt.changes_trainable
