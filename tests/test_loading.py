"""Loading `.keras` / `.h5` files (genuine Keras 2 ones included) and copying models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from conftest import Pretrained, build_cnn, weights_of

import transferkit
from transferkit import ConfigError, DataError, FineTuner, LayerNotFoundError, ModelLoadError
from transferkit.model.keras2.config import keras2_config
from transferkit.model.keras2.layers import keras2_hard_sigmoid
from transferkit.model.loading import copy_model, load_model, to_functional

KERAS2 = Path(__file__).parent / "data" / "keras2"
# The files written by Keras 2.15; tf-keras 2.21's (`tfk221_*`) are tested in test_keras2_tfk221.
KERAS2_FILES = sorted(p.stem for p in KERAS2.glob("*.h5") if not p.stem.startswith("tfk221_"))
KERAS2_ARCHIVES = sorted(p.stem for p in KERAS2.glob("*.keras") if not p.stem.startswith("tfk221_"))


# Fixtures plain Keras 3 cannot load at all (the rest load, but not their compiled losses).
PLAIN_KERAS_FAILS = {
    "nested_base",
    "seq_depthwise",
    "tf_ops",
    "tutorial_mobilenet",
    "slash_names",
    "seq2seq_lstm",
    "attention_block",
    "conv_zoo",
    "conv_lstm",
    "lambda_tf",
    "mixed_policy",
}
# Lambda fixtures need safe_mode=False; float16 compute differs between Keras 2 and 3 by ~5e-4.
LAMBDAS = {"seq_lambda", "lambda_tf"}
ATOL = {"mixed_policy": 2e-3}


def test_all_keras2_fixtures_are_listed() -> None:
    assert KERAS2_FILES == [
        "app_layers",
        "attention_block",
        "conv_lstm",
        "conv_zoo",
        "func_resnet",
        "lambda_tf",
        "mixed_policy",
        "nested_base",
        "seq2seq_lstm",
        "seq_cnn",
        "seq_depthwise",
        "seq_lambda",
        "seq_mlp_mse",
        "seq_no_compile",
        "slash_names",
        "tf_ops",
        "tutorial_mobilenet",
    ]


def _targets(model: keras.Model, n: int) -> np.ndarray:
    units = int(model.output_shape[-1])
    if units == 1:
        return np.linspace(-1, 1, n, dtype="float32")[:, None]
    return (np.arange(n) % units).astype("int64")


def _io(stem: str) -> tuple[Any, np.ndarray]:
    """The fixture's inputs (a list for several: x0, x1, ...) and Keras 2's predictions."""
    io = np.load(KERAS2 / f"{stem}_io.npz")
    xs = [io[k] for k in sorted(k for k in io.files if k.startswith("x"))]
    return (xs[0] if len(xs) == 1 else xs), io["y"]


def _rows(x: Any) -> int:
    return len(x[0]) if isinstance(x, list) else len(x)


@pytest.mark.parametrize("stem", KERAS2_FILES)
def test_keras2_h5_loads_predicts_the_same_and_fine_tunes(stem: str) -> None:
    x, y = _io(stem)
    tuner = FineTuner(KERAS2 / f"{stem}.h5", safe_mode=stem not in LAMBDAS)
    np.testing.assert_allclose(tuner.model.predict(x, verbose=0), y, atol=ATOL.get(stem, 1e-5))

    before = [w.copy() for w in tuner.model.get_weights()]
    result = tuner.compile_sgd(lr=1e-2).fit(x, _targets(tuner.model, _rows(x)), epochs=1, verbose=0)
    assert result.epochs == 1 and np.isfinite(result.history["loss"]).all()
    changed = [
        not np.array_equal(a, b) for a, b in zip(before, tuner.model.get_weights(), strict=True)
    ]
    assert any(changed)


@pytest.mark.parametrize("stem", sorted(PLAIN_KERAS_FAILS))
def test_plain_keras3_cannot_load_these_keras2_files(stem: str) -> None:
    # What transferkit fixes: each of these stops `keras.models.load_model` in Keras 3.15.1.
    with pytest.raises((TypeError, ValueError, IndexError, AttributeError, NotImplementedError)):
        keras.models.load_model(KERAS2 / f"{stem}.h5", compile=False, safe_mode=False)


@pytest.mark.parametrize("stem", KERAS2_ARCHIVES)
def test_keras2_keras_archives_load_and_predict_the_same(stem: str) -> None:
    # Keras 2.13-2.15 `.keras` archives name `keras.src.engine.functional`: plain Keras 3 fails.
    with pytest.raises((TypeError, ValueError, AttributeError)):
        keras.models.load_model(KERAS2 / f"{stem}.keras", compile=False)
    x, y = _io(stem)
    tuner = FineTuner(KERAS2 / f"{stem}.keras", safe_mode=stem not in LAMBDAS)
    np.testing.assert_allclose(tuner.model.predict(x, verbose=0), y, atol=ATOL.get(stem, 1e-5))
    result = tuner.compile_sgd(lr=1e-2).fit(x, _targets(tuner.model, _rows(x)), epochs=1, verbose=0)
    assert np.isfinite(result.history["loss"]).all()


def test_keras2_keras_archive_list() -> None:
    assert KERAS2_ARCHIVES == [
        "app_layers",
        "attention_block",
        "conv_lstm",
        "conv_zoo",
        "lambda_tf",
        "mixed_policy",
        "nested_base",
        "seq2seq_lstm",
        "seq_cnn",
        "slash_names",
        "tutorial_mobilenet",
    ]


def test_keras2_slash_names_are_renamed_and_point_the_way(tmp_path: Path) -> None:
    tuner = FineTuner(KERAS2 / "slash_names.h5")
    names = [layer.name for layer in tuner.model.layers]
    # "block/conv" would clash with the existing "block_conv": it gets a unique name.
    assert names[1:] == ["stem_base", "block_conv_1", "block_conv", "head_pool", "head_out"]
    base = tuner.model.get_layer("stem_base")
    assert [layer.name for layer in base.layers[1:]] == ["stem_conv", "stem_bn", "stem_relu"]
    with pytest.raises(LayerNotFoundError, match=r"forbids '/'.*'head_pool'"):
        tuner.freeze_until("head/pool")
    x, _ = _io("slash_names")
    tuner.freeze_until("head_pool").compile_sgd(lr=1e-2)
    with pytest.raises(DataError, match=r"np.asarray\(y\)"):
        tuner.fit(x, [0, 1, 2, 0], epochs=2)
    result = tuner.fit(x, np.array([0, 1, 2, 0]), epochs=2, verbose=0)
    assert result.cached and result.cache_layer == "head_pool"
    result.save(tmp_path / "renamed.h5")
    reloaded = keras.models.load_model(tmp_path / "renamed.h5", compile=False)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.predict(x), atol=1e-6)


def test_keras2_recurrent_states_and_hard_sigmoid_survive_a_save(tmp_path: Path) -> None:
    # The decoder's initial_state (three inputs in Keras 2's node) is a keyword again.
    x, y = _io("seq2seq_lstm")
    tuner = FineTuner(KERAS2 / "seq2seq_lstm.h5")
    decoder = tuner.model.get_layer("decoder")
    assert [t.shape for t in keras.tree.flatten(decoder._inbound_nodes[0].input_tensors)] == [
        (None, 4, 2),
        (None, 6),
        (None, 6),
    ]
    # Keras 2's hard_sigmoid (slope 0.2) is kept: Keras 3's own (slope 1/6) would differ by 5e-3.
    lstm = FineTuner(KERAS2 / "conv_lstm.h5").model
    assert lstm.get_layer("conv_lstm").cell.recurrent_activation is keras2_hard_sigmoid
    assert lstm.get_layer("gate").activation is keras2_hard_sigmoid
    xl, yl = _io("conv_lstm")
    for model, data, want in ((tuner.model, x, y), (lstm, xl, yl)):
        for suffix in (".keras", ".h5"):
            path = tmp_path / f"{model.name}{suffix}"
            model.save(path)
            again = keras.models.load_model(path, compile=False)
            np.testing.assert_allclose(again.predict(data, verbose=0), want, atol=1e-5)


def test_keras2_tf_op_layers_load_and_survive_a_save(tmp_path: Path) -> None:
    # TFOpLambda / SlicingOpLambda are gone from Keras 3. The tutorial's `preprocess_input`
    # (x / 127.5 - 1) and `x * 2.0 + 1.0` become built-in Rescaling layers, so the fine-tuned
    # model saves to a file that plain Keras reads in a process that never imported transferkit.
    tuner = FineTuner(KERAS2 / "tutorial_mobilenet.h5")
    classes = {type(layer).__name__ for layer in tuner.model.layers}
    assert {"Rescaling", "RandomFlip", "Sequential"} <= classes and "TFOpLambda" not in classes
    # DepthwiseConv2D's Keras 2 `groups=1` was dropped, the weights kept.
    base = tuner.model.get_layer("base")
    assert any(type(layer).__name__ == "DepthwiseConv2D" for layer in base.layers)
    x = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype("float32")
    tuned = tuner.replace_head(num_classes=2, hidden=()).compile_sgd(lr=1e-3)
    fitted = tuned.fit(x, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    fitted.save(tmp_path / "tutorial.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", fitted.predict(x))
    script = (
        "import sys, numpy as np, keras\n"
        "d = sys.argv[1]\n"
        "m = keras.models.load_model(d + '/tutorial.keras')\n"
        "got = m.predict(np.load(d + '/x.npy'), verbose=0)\n"
        "assert 'transferkit' not in sys.modules\n"
        "np.testing.assert_allclose(got, np.load(d + '/want.npy'), atol=1e-6)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    # Ops without a built-in layer keep the stand-ins, which reload once transferkit is imported.
    io = np.load(KERAS2 / "tf_ops_io.npz")
    ops = FineTuner(KERAS2 / "tf_ops.h5")
    op_classes = {type(layer).__name__ for layer in ops.model.layers}
    assert {"SlicingOpLambda", "TFOpLambda", "Add", "Concatenate", "ReLU"} <= op_classes
    result = ops.replace_head(num_classes=2, hidden=()).compile_sgd(lr=1e-2)
    fitted = result.fit(io["x"], np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"ops{suffix}"
        fitted.save(path)
        reloaded = keras.models.load_model(path)
        np.testing.assert_allclose(
            reloaded.predict(io["x"], verbose=0), fitted.predict(io["x"]), atol=1e-6
        )


def test_keras2_config_rewrites_op_layers() -> None:
    def op(name: str, function: str, node: list[object]) -> dict[str, object]:
        return {
            "class_name": "TFOpLambda",
            "name": name,
            "config": {"name": name, "function": function, "dtype": "float32"},
            "inbound_nodes": [node],
        }

    layers = [
        {"class_name": "InputLayer", "name": "input_1", "config": {}, "inbound_nodes": []},
        {"class_name": "Dense", "name": "dense", "config": {}, "inbound_nodes": []},
        # Keras 2 wrote one-input op calls as a bare entry, tensors in keywords as references.
        op("max", "math.maximum", ["dense", 0, 0, {"y": ["input_1", 0, 0], "name": None}]),
        op("add", "__operators__.add", ["dense", 0, 0, {"y": ["input_1", 0, 0], "name": None}]),
        op("div", "math.truediv", ["add", 0, 0, {"y": 127.5, "name": None}]),
        op("sub", "math.subtract", ["div", 0, 0, {"y": 1.0, "name": None}]),
        op("erf", "math.erf", ["sub", 0, 0, {"name": None}]),
        {
            "class_name": "DepthwiseConv2D",
            "name": "dw",
            "config": {"name": "dw", "kernel_size": [3, 3], "groups": 1},
            "inbound_nodes": [],
        },
    ]
    config = {
        "class_name": "Functional",
        "config": {
            "layers": layers,
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [["erf", 0, 0]],
        },
    }
    fixed = {layer["name"]: layer for layer in keras2_config(config)["config"]["layers"]}
    # No built-in layer computes tf.math.maximum: the stand-in takes the tensor as an input.
    kwargs = {"name": None, "transferkit_tensor_kwargs": ["y"]}
    assert fixed["max"]["class_name"] == "TFOpLambda"
    assert fixed["max"]["inbound_nodes"] == [[["dense", 0, 0, kwargs], ["input_1", 0, 0, kwargs]]]
    # Built-in equivalents: a merge layer, and Rescaling for arithmetic with a constant.
    assert fixed["add"]["class_name"] == "Add"
    assert fixed["add"]["inbound_nodes"] == [[["dense", 0, 0, {}], ["input_1", 0, 0, {}]]]
    assert fixed["div"]["class_name"] == "Rescaling"
    assert fixed["div"]["config"] == {
        "name": "div",
        "dtype": "float32",
        "scale": pytest.approx(1 / 127.5),
        "offset": 0.0,
    }
    assert fixed["sub"]["config"]["scale"] == 1.0 and fixed["sub"]["config"]["offset"] == -1.0
    assert fixed["erf"]["inbound_nodes"] == [[["sub", 0, 0, {"name": None}]]]
    assert "groups" not in fixed["dw"]["config"]
    assert layers[-1]["config"]["groups"] == 1  # the input is not modified


def test_keras2_nested_base_keeps_the_base_as_one_layer() -> None:
    tuner = FineTuner(KERAS2 / "nested_base.h5")
    names = [layer.name for layer in tuner.model.layers]
    assert names[1:] == ["base", "dense_6"]
    base = tuner.model.get_layer("base")
    assert isinstance(base, keras.Model)
    # batchnorm="frozen" reaches inside the nested base.
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bn) == 1 and not bn[0].trainable
    tuner.freeze_until("flatten_1")
    flags = {layer.name: layer.trainable for layer in base.layers[1:]}
    assert flags == {
        "conv2d_7": False,
        "batch_normalization_3": False,
        "flatten_1": True,
        "dense_5": True,
    }


def test_keras2_config_shifts_only_nested_model_references() -> None:
    def ref(name: str, node: int) -> list[Any]:
        return [name, node, 0, {}]

    inner = {
        "class_name": "Functional",
        "name": "inner",
        "config": {
            "name": "inner",
            "layers": [
                {"class_name": "InputLayer", "name": "i0", "inbound_nodes": []},
                {"class_name": "Dense", "name": "d0", "inbound_nodes": [[ref("i0", 0)]]},
            ],
            "input_layers": [["i0", 0, 0]],
            "output_layers": [["d0", 0, 0]],
        },
    }
    base = {
        "class_name": "Functional",
        "name": "base",
        "config": {
            "name": "base",
            "layers": [
                {"class_name": "InputLayer", "name": "i1", "inbound_nodes": []},
                {**inner, "inbound_nodes": [[ref("i1", 0)]]},
                {"class_name": "Dense", "name": "d1", "inbound_nodes": [[ref("inner", 1)]]},
            ],
            "input_layers": [["i1", 0, 0]],
            "output_layers": [["d1", 0, 0]],
        },
    }
    outer = {
        "class_name": "Functional",
        "config": {
            "name": "outer",
            "layers": [
                {"class_name": "InputLayer", "name": "i2", "inbound_nodes": []},
                {**base, "inbound_nodes": [[ref("i2", 0)]]},
                {"class_name": "Dense", "name": "d2", "inbound_nodes": [[ref("base", 1)]]},
                {
                    "class_name": "Add",
                    "name": "add",
                    "inbound_nodes": [[ref("base", 2), ref("d2", 1)]],
                },
            ],
            "input_layers": [["i2", 0, 0]],
            "output_layers": [["add", 0, 0], ["base", 1, 0]],
        },
    }
    fixed = keras2_config(outer)
    layers = fixed["config"]["layers"]
    assert layers[2]["inbound_nodes"] == [[ref("base", 0)]]
    # Only nested-model references move; an ordinary layer's node index is left alone.
    assert layers[3]["inbound_nodes"] == [[ref("base", 1), ref("d2", 1)]]
    assert fixed["config"]["output_layers"] == [["add", 0, 0], ["base", 0, 0]]
    assert fixed["config"]["input_layers"] == [["i2", 0, 0]]
    # One level down, recursively.
    assert layers[1]["config"]["layers"][2]["inbound_nodes"] == [[ref("inner", 0)]]
    # The input is untouched.
    assert outer["config"]["layers"][2]["inbound_nodes"] == [[ref("base", 1)]]  # type: ignore[index]


def test_lambda_file_needs_safe_mode_false() -> None:
    with pytest.raises(ModelLoadError, match="safe_mode=False") as info:
        FineTuner(KERAS2 / "seq_lambda.h5")
    assert "seq_lambda.h5" in str(info.value)


def test_copy_of_a_lambda_model_honours_safe_mode() -> None:
    io = np.load(KERAS2 / "seq_lambda_io.npz")
    raw = keras.models.load_model(KERAS2 / "seq_lambda.h5", compile=False, safe_mode=False)
    with pytest.raises(ConfigError, match="safe_mode=False"):
        FineTuner(raw)
    tuner = FineTuner(raw, safe_mode=False)
    assert tuner.model is not raw
    np.testing.assert_allclose(tuner.model.predict(io["x"], verbose=0), io["y"], atol=1e-6)


@pytest.mark.parametrize("fmt", ["h5", "keras_path"])
def test_file_and_load_classmethod_predict_like_the_original(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...], fmt: str
) -> None:
    x = few_shot[2][:20]
    path = getattr(pretrained, fmt)
    want = pretrained.model.predict(x, verbose=0)
    for tuner in (FineTuner(path), FineTuner.load(path), FineTuner(str(path))):
        assert tuner.source == path
        np.testing.assert_allclose(tuner.model.predict(x, verbose=0), want, atol=1e-6)
        # A loaded Sequential has no `.input`; the working model (a Functional twin) has.
        assert tuple(tuner.model.input.shape) == (None, 8, 8, 1)


def test_loaded_sequential_becomes_a_functional_twin(pretrained: Pretrained) -> None:
    loaded = load_model(pretrained.h5)
    assert isinstance(loaded, keras.Sequential)
    with pytest.raises(AttributeError):
        _ = loaded.input
    twin = to_functional(loaded)
    assert not isinstance(twin, keras.Sequential)
    assert [layer.name for layer in twin.layers[1:]] == [layer.name for layer in loaded.layers]
    assert all(a is b for a, b in zip(twin.layers[1:], loaded.layers, strict=True))


def test_copy_model_keeps_weights_and_flags_with_new_variables(pretrained: Pretrained) -> None:
    src = keras.models.load_model(pretrained.keras_path, compile=False)
    src.get_layer("conv1").trainable = False
    clone = copy_model(src)
    assert clone.get_layer("conv1").trainable is False
    assert clone.get_layer("conv2").trainable is True
    for a, b in zip(src.weights, clone.weights, strict=True):
        assert a is not b
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_copy_true_leaves_the_callers_model_untouched(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    caller = keras.models.load_model(pretrained.keras_path, compile=False)
    caller.get_layer("fc1").trainable = False
    flags = {layer.name: layer.trainable for layer in caller.layers}
    weights = [w.copy() for w in caller.get_weights()]

    tuner = FineTuner(caller)  # copy=True is the default
    tuner.unfreeze().freeze("conv*").replace_head(3, at="fc2").compile_sgd(lr=1e-2)
    tuner.fit(x, y % 3, epochs=1, verbose=0)

    assert tuner.model.get_layer("fc1").trainable is True  # it did change in the copy
    assert {layer.name: layer.trainable for layer in caller.layers} == flags
    for old, new in zip(weights, caller.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert caller.output_shape == (None, 5)


def test_copy_false_works_in_place(
    pretrained: Pretrained, few_shot: tuple[np.ndarray, ...]
) -> None:
    x, y, _, _ = few_shot
    model = keras.models.load_model(pretrained.keras_path, compile=False)
    before = weights_of(model.get_layer("fc1"))
    tuner = FineTuner(model, copy=False).freeze_until("fc1").compile_sgd(lr=1e-2)
    assert model.get_layer("conv1").trainable is False
    assert model.get_layer("fc1").trainable is True
    # The working model is a Functional twin over the very same layer objects.
    assert tuner.model.get_layer("fc1") is model.get_layer("fc1")
    tuner.fit(x, y, epochs=1, verbose=0)
    after = weights_of(model.get_layer("fc1"))
    assert not np.array_equal(before[0], after[0])


def test_copy_false_on_a_functional_model_is_the_same_object() -> None:
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    assert FineTuner(model, copy=False).model is model
    assert FineTuner(model).model is not model


def test_unbuilt_sequential_is_refused() -> None:
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match="not built"):
        FineTuner(model)


def test_copy_of_fixture_cnn_is_independent() -> None:
    model = build_cnn("indep")
    tuner = FineTuner(model)
    tuner.model.get_layer("fc1").kernel.assign(np.zeros((256, 32), "float32"))
    assert np.abs(model.get_layer("fc1").kernel.numpy()).sum() > 0


def test_keras2_lambda_using_tf_loads_copies_and_saves(tmp_path: Path) -> None:
    # Keras 3 runs a deserialized lambda without Keras 2's `tf` global; the layer gets it back.
    x, y = _io("lambda_tf")
    tuner = FineTuner(KERAS2 / "lambda_tf.h5", safe_mode=False)  # copy=True clones it too
    assert type(tuner.model.get_layer("l2_norm")).__name__ == "Keras2Lambda"
    result = tuner.compile_sgd(lr=1e-2).fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "lambda_tf.keras"
    result.save(path)
    again = keras.models.load_model(path, safe_mode=False)
    np.testing.assert_allclose(again.predict(x, verbose=0), result.predict(x), atol=1e-6)
    # Lambdas without such globals stay plain Keras Lambda layers.
    plain = FineTuner(KERAS2 / "seq_lambda.h5", safe_mode=False).model
    assert {type(layer).__name__ for layer in plain.layers} >= {"Lambda"}
    # A mixed-precision Keras 2 file keeps its policy.
    mixed = FineTuner(KERAS2 / "mixed_policy.h5").model
    assert mixed.get_layer("conv").dtype_policy.name == "mixed_float16"
    assert mixed.get_layer("probs").dtype_policy.name == "float32"


@keras.saving.register_keras_serializable(package="transferkit_tests")
class _Tagged(keras.layers.Dense):
    """A layer whose config has a key its constructor refuses, as keras-hub ViT's patching layer."""

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "note": "not an argument"}


@keras.saving.register_keras_serializable(package="transferkit_tests")
class _SelfBuilt(keras.Model):
    """A Functional subclass that builds its graph from its own arguments, as keras-hub's
    backbones do; it round-trips only as a whole."""

    def __init__(self, units: int = 4, **kwargs: object) -> None:
        inputs = keras.Input((3,), name="x")
        outputs = _Tagged(units, name="tagged")(inputs)
        super().__init__(inputs, outputs, **kwargs)
        self.units = units

    def get_config(self) -> dict[str, object]:
        return {"units": self.units, "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config: dict[str, object]) -> _SelfBuilt:  # type: ignore[override]
        return cls(**config)


def test_copy_falls_back_to_from_config_and_saved_results_reload(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = _SelfBuilt(4, name="self_built")
    with pytest.raises(Exception, match="note"):
        keras.models.clone_model(model)
    tuner = FineTuner(model)
    assert type(tuner.model) is _SelfBuilt and tuner.model is not model
    for a, b in zip(model.weights, tuner.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    result = (
        tuner.replace_head(2, at="tagged")
        .compile("adam")
        .fit(x, np.arange(16) % 2, epochs=1, verbose=0)
    )
    # The head sits on the model called whole: the saved file holds it as one _SelfBuilt.
    assert [type(layer) for layer in result.model.layers][1] is _SelfBuilt
    path = result.save(tmp_path / "self_built.keras")
    for loaded in (transferkit.load(path)[0], keras.saving.load_model(path)):
        np.testing.assert_allclose(loaded.predict(x, verbose=0), result.predict(x), atol=1e-6)
