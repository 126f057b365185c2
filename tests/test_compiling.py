"""Optimizer factories, loss inference, the loss actually used, and recompiling on flag changes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import Pretrained, weights_of

from transferkit import ConfigError, FineTuner
from transferkit.compile.spec import infer_loss, optimizer_factory, output_activation, sgd_factory


def _tiny(activation: str | None, units: int, softmax_layer: bool = False) -> keras.Model:
    inp = keras.Input((4,))
    x = keras.layers.Dense(units, activation=activation)(inp)
    if softmax_layer:
        x = keras.layers.Softmax()(x)
    return keras.Model(inp, x)


@pytest.mark.parametrize(
    ("model_args", "loss_cls", "from_logits", "metric"),
    [
        (("softmax", 3), keras.losses.SparseCategoricalCrossentropy, False, "accuracy"),
        ((None, 3, True), keras.losses.SparseCategoricalCrossentropy, False, "accuracy"),
        (("sigmoid", 1), keras.losses.BinaryCrossentropy, False, "accuracy"),
        ((None, 3), keras.losses.SparseCategoricalCrossentropy, True, "accuracy"),
        ((None, 1), keras.losses.MeanSquaredError, None, "mae"),
    ],
)
def test_infer_loss_for_untouched_outputs(
    model_args: tuple, loss_cls: type, from_logits: bool | None, metric: str
) -> None:
    loss, metrics = infer_loss(_tiny(*model_args), None)
    assert isinstance(loss, loss_cls)
    if from_logits is not None:
        assert loss.get_config()["from_logits"] is from_logits
    names = [m if isinstance(m, str) else m.name for m in metrics]
    assert names == [metric]


def test_output_activation_reads_the_last_layer() -> None:
    assert output_activation(_tiny("softmax", 3)) == "softmax"
    assert output_activation(_tiny(None, 3, softmax_layer=True)) == "softmax"
    assert output_activation(_tiny("tanh", 2)) == "tanh"
    with pytest.raises(ConfigError, match="pass loss= explicitly"):
        infer_loss(_tiny("tanh", 2), None)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def test_regression_head_evaluates_mean_squared_error(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    target = (y + 5).astype("float32")
    tuner = FineTuner(pretrained.h5).replace_head(regression=True).compile_sgd(lr=1e-3)
    result = tuner.fit(x, target, epochs=1, verbose=0)
    pred = result.predict(x)[:, 0]
    got = result.evaluate(x, target, batch_size=len(x))
    assert got["loss"] == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-4)
    assert got["mae"] == pytest.approx(float(np.mean(np.abs(pred - target))), rel=1e-4)


def test_classification_head_evaluates_cross_entropy_from_logits(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.keras_path).replace_head(5).compile_sgd(lr=1e-3)
    result = tuner.fit(x, y, epochs=1, verbose=0)
    logits = result.predict(x).astype("float64")
    want = float(np.mean(_logsumexp(logits) - logits[np.arange(len(y)), y]))
    got = result.evaluate(x, y, batch_size=len(x))
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    assert got["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y)))


def test_untouched_softmax_evaluates_cross_entropy_on_probabilities(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.h5).compile_sgd(lr=1e-3)
    probs = tuner.model.predict(x, verbose=0).astype("float64")
    got = tuner.model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    want = float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    # The wrong loss (softmax outputs read as logits) would give a clearly different number.
    as_logits = float(np.mean(_logsumexp(probs) - probs[np.arange(len(y)), y]))
    assert abs(as_logits - want) > 0.1


def test_one_hot_labels_switch_to_categorical_cross_entropy(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    onehot = np.eye(5, dtype="float32")[y]
    tuner = FineTuner(pretrained.model).replace_head(5).compile_sgd(lr=1e-3)
    result = tuner.fit(x, onehot, epochs=1, verbose=0)
    assert isinstance(tuner.model.loss, keras.losses.CategoricalCrossentropy)
    assert tuner.model.loss.get_config()["from_logits"] is True
    logits = result.predict(x).astype("float64")
    want = float(np.mean(_logsumexp(logits) - logits[np.arange(len(y)), y]))
    assert result.evaluate(x, onehot, batch_size=len(x))["loss"] == pytest.approx(want, rel=1e-4)
    # Back to integer labels: sparse again.
    tuner.fit(x, y, epochs=1, verbose=0)
    assert isinstance(tuner.model.loss, keras.losses.SparseCategoricalCrossentropy)


def test_compile_sgd_maps_lr_and_momentum() -> None:
    opt = sgd_factory(0.05, momentum=0.5, nesterov=True)()
    assert isinstance(opt, keras.optimizers.SGD)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.05)
    assert opt.momentum == 0.5 and opt.nesterov is True


def test_optimizer_factory_from_instance_name_and_callable() -> None:
    inst = keras.optimizers.Adam(learning_rate=3e-4, beta_1=0.8)
    make = optimizer_factory(inst)
    a, b = make(), make()
    assert a is not b and a is not inst
    assert a.get_config()["beta_1"] == pytest.approx(0.8)
    assert float(a.learning_rate.numpy()) == pytest.approx(3e-4)
    assert isinstance(optimizer_factory("rmsprop")(), keras.optimizers.RMSprop)
    made = optimizer_factory(lambda: keras.optimizers.SGD(0.1))()
    assert isinstance(made, keras.optimizers.SGD)
    with pytest.raises(ConfigError, match=r"must return a keras\.optimizers\.Optimizer"):
        optimizer_factory(lambda: "adam")
    with pytest.raises(ConfigError, match="unknown optimizer name"):
        optimizer_factory("adamz")
    with pytest.raises(ConfigError, match="zero-argument factory"):
        optimizer_factory(3)


def test_compile_kwargs_pass_through(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model).compile("adam", steps_per_execution=2, loss=None)
    assert tuner.model.steps_per_execution == 2
    assert isinstance(tuner.model.optimizer, keras.optimizers.Adam)


def test_explicit_string_loss_is_used(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    target = (y + 5).astype("float32")
    tuner = FineTuner(pretrained.model).replace_head(regression=True)
    tuner.compile_sgd(lr=1e-3, loss="mae", metrics=["mse"])
    result = tuner.fit(x, target, epochs=1, verbose=0)
    pred = result.predict(x)[:, 0]
    got = result.evaluate(x, target, batch_size=len(x))
    assert got["loss"] == pytest.approx(float(np.mean(np.abs(pred - target))), rel=1e-4)


def test_logits_mismatch_is_refused(pretrained: Pretrained) -> None:
    tuner = FineTuner(pretrained.model)
    with pytest.raises(ConfigError, match="already applies softmax"):
        tuner.compile_sgd(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tuner.replace_head(5)
    with pytest.raises(ConfigError, match="output is linear"):
        tuner.compile_sgd(loss=keras.losses.SparseCategoricalCrossentropy())
    assert tuner.compile_spec is None


def test_unfreezing_after_compile_takes_effect_on_next_fit(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.h5).freeze_until("fc2").compile_sgd(lr=1e-2)
    tuner.fit(x, y, epochs=1, verbose=0)
    first_opt = tuner.model.optimizer
    conv = weights_of(tuner.model.get_layer("conv1"))
    np.testing.assert_array_equal(conv[0], weights_of(pretrained.model.get_layer("conv1"))[0])

    tuner.unfreeze("conv1")  # no compile call by the user
    result = tuner.fit(x, y, epochs=1, verbose=0)
    after = weights_of(tuner.model.get_layer("conv1"))
    assert not np.array_equal(conv[0], after[0])
    # A fresh optimizer of the same configuration.
    assert tuner.model.optimizer is not first_opt
    assert float(tuner.model.optimizer.learning_rate.numpy()) == pytest.approx(1e-2)
    assert result.trainable_params > 0

    tuner.freeze("conv1", "fc2", "out")
    frozen = weights_of(tuner.model.get_layer("conv1"))
    tuner.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(frozen[0], weights_of(tuner.model.get_layer("conv1"))[0])


def test_head_change_after_compile_recompiles_with_the_new_loss(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    tuner = FineTuner(pretrained.model).compile_sgd(lr=1e-3)
    assert tuner.model.loss.get_config()["from_logits"] is False
    tuner.replace_head(regression=True)
    tuner.fit(x, (y + 5).astype("float32"), epochs=1, verbose=0)
    assert isinstance(tuner.model.loss, keras.losses.MeanSquaredError)


def test_compile_state_holds_the_recipe_the_compile_and_the_phase_scale() -> None:
    """One owner for the compile: the recipe, what was compiled from it (the resolved loss),
    and the learning-rate scale of a `fine_tune` phase, which never overwrites the recipe."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    labels = rng.integers(0, 3, size=32)
    inp = keras.Input((4,))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, "relu")(inp))
    tuner = FineTuner(keras.Model(inp, out)).compile_sgd(lr=0.1)
    state = tuner._compile
    spec = tuner.compile_spec
    assert spec is state.spec and state.compiled is not None
    assert isinstance(state.compiled.loss, keras.losses.SparseCategoricalCrossentropy)
    tuner.fit(x, np.eye(3, dtype="float32")[labels], epochs=1, verbose=0)
    # One-hot labels: the inferred loss was resolved to its categorical twin and recorded.
    assert isinstance(state.compiled.loss, keras.losses.CategoricalCrossentropy)
    assert state.spec is spec and state.spec.loss is None
    seen: list[tuple[float, float]] = []

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: object = None) -> None:
            active = tuner.compile_spec
            assert active is not None
            seen.append((active.lr_scale, float(self.model.optimizer.learning_rate.numpy())))

    tuner.fine_tune(
        x, labels, head_epochs=1, epochs=1, lr_factor=0.25, verbose=0, callbacks=[Probe()]
    )
    assert seen == [(1.0, pytest.approx(0.1)), (0.25, pytest.approx(0.025))]
    # Afterwards: the recipe as given, and the next fit recompiles at its learning rate.
    assert tuner.compile_spec is spec and spec.lr_scale == 1.0 and state.compiled is None
    tuner.fit(x, labels, epochs=1, verbose=0)
    assert float(tuner.model.optimizer.learning_rate.numpy()) == pytest.approx(0.1)
    assert state.compiled is not None and state.compiled.lr_scale == 1.0
