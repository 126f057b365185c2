"""LoRA: targets, frozen bases, adapter files, merged saves, summary."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import Pretrained

from transferkit import AdapterMismatchError, ConfigError, FineTuner
from transferkit.recipes.lora.paths import layer_paths, variable_keys

FewShot = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _lora_tuner(path: Path, **lora_kwargs: object) -> FineTuner:
    return FineTuner(path).replace_head(5).lora(**lora_kwargs)  # type: ignore[arg-type]


def test_default_targets_train_only_adapters_and_head(
    pretrained: Pretrained, few_shot: FewShot
) -> None:
    x, y, _, _ = few_shot
    tuner = _lora_tuner(pretrained.keras_path, rank=2)
    model = tuner.model
    lora_names = [layer.name for layer in model.layers if getattr(layer, "lora_enabled", False)]
    assert lora_names == ["conv1", "conv2", "fc1", "fc2"]
    names = sorted(f"{v.path.split('/')[-2]}/{v.name}" for v in model.trainable_variables)
    expected = sorted(
        [f"{n}/lora_kernel_{ab}" for n in lora_names for ab in "ab"]
        + [f"{n}/{w}" for n in ("head_dense_1", "head_output") for w in ("kernel", "bias")]
    )
    assert names == expected
    frozen = {
        f"{layer.name}/{v.name}": v.numpy().copy()
        for layer in model.layers
        if layer.name in lora_names
        for v in layer.weights
        if "lora" not in v.name
    }
    b_before = model.get_layer("fc1").lora_kernel_b.numpy().copy()
    tuner.compile("adam").fit(x, y, epochs=3, batch_size=16, verbose=0)
    for layer in model.layers:
        for v in layer.weights:
            key = f"{layer.name}/{v.name}"
            if key in frozen:
                np.testing.assert_array_equal(v.numpy(), frozen[key], err_msg=key)
    assert not np.array_equal(model.get_layer("fc1").lora_kernel_b.numpy(), b_before)


def test_summary_shows_ranks_and_trainable_share(pretrained: Pretrained) -> None:
    tuner = _lora_tuner(pretrained.keras_path, rank=2)
    text = tuner.summary()
    assert "Conv2D (LoRA r=2)" in text and "Dense (LoRA r=2)" in text
    model = tuner.model
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    # conv1: A 3*3*1 x 2 + B 2 x 8; conv2: 3*3*8 x 2 + 2 x 16; fc1: 256x2 + 2x32; fc2: 32x2 + 2x16;
    # head: 16*64 + 64 + 64*5 + 5.
    assert trainable == (18 + 16) + (144 + 32) + (512 + 64) + (64 + 32) + (1088 + 325)
    share = f"{100 * trainable / total:.1f}"
    assert f"Parameters: {trainable:,} of {total:,} trainable ({share}%)" in text


def test_adapter_file_restores_predictions_exactly(
    pretrained: Pretrained, few_shot: FewShot, tmp_path: Path
) -> None:
    x, y, x_test, _ = few_shot
    result = (
        _lora_tuner(pretrained.h5, rank=4, alpha=8.0)
        .compile("adam")
        .fit(x, y, epochs=3, batch_size=16, verbose=0)
    )
    path = result.save_adapters(tmp_path / "digits.npz")
    with np.load(path) as data:
        keys = set(data.files)
        header = json.loads(bytes(data["__transferkit__"]).decode())
    assert "fc1/lora_kernel_a" in keys and "head_output/kernel" in keys
    assert "fc1/kernel" not in keys and "conv1/bias" not in keys  # no base weights
    assert header["rank"] == 4 and header["alpha"] == 8.0
    assert header["targets"] == ["conv1", "conv2", "fc1", "fc2"]
    assert "fc1/kernel" in header["base"]

    fresh = FineTuner(pretrained.h5).replace_head(5)
    assert fresh.load_adapters(path) is fresh
    np.testing.assert_array_equal(
        fresh.model.predict(x_test, verbose=0), result.model.predict(x_test, verbose=0)
    )
    assert [v.name for v in fresh.model.get_layer("fc1").trainable_weights] == [
        "lora_kernel_a",
        "lora_kernel_b",
    ]


def test_mismatched_base_or_head_names_the_first_variable(
    pretrained: Pretrained, few_shot: FewShot, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    result = (
        _lora_tuner(pretrained.keras_path, rank=2).compile("adam").fit(x, y, epochs=1, verbose=0)
    )
    path = result.save_adapters(tmp_path / "a.npz")
    other = keras.models.load_model(pretrained.keras_path, compile=False)
    bias = other.get_layer("fc2").bias
    bias.assign(bias.numpy() + 1e-3)
    other_path = tmp_path / "other.keras"
    other.save(other_path)
    fresh = FineTuner(other_path).replace_head(5)
    with pytest.raises(AdapterMismatchError, match="'fc2/bias'"):
        fresh.load_adapters(path)
    assert not any(getattr(layer, "lora_enabled", False) for layer in fresh.model.layers)
    with pytest.raises(AdapterMismatchError, match="head_output/kernel"):
        FineTuner(pretrained.keras_path).replace_head(4).load_adapters(path)
    with pytest.raises(AdapterMismatchError, match="head"):
        FineTuner(pretrained.keras_path).load_adapters(path)


def test_saved_lora_model_reloads_with_plain_keras_in_both_formats(
    pretrained: Pretrained, few_shot: FewShot, tmp_path: Path
) -> None:
    x, y, x_test, _ = few_shot
    result = (
        _lora_tuner(pretrained.keras_path, rank=2).compile("adam").fit(x, y, epochs=2, verbose=0)
    )
    expected = result.predict(x_test)
    for suffix in (".h5", ".keras"):
        path = result.save(tmp_path / f"lora{suffix}")
        loaded = keras.models.load_model(path)
        assert not any(getattr(layer, "lora_enabled", False) for layer in loaded.layers)
        np.testing.assert_allclose(loaded.predict(x_test, verbose=0), expected, atol=1e-5)
    # The live model keeps its adapters.
    assert result.model.get_layer("fc1").lora_enabled
    np.testing.assert_array_equal(result.predict(x_test), expected)


def test_selectors(pretrained: Pretrained) -> None:
    t = _lora_tuner(pretrained.keras_path, targets=["fc*"])
    assert [n for n in ("conv1", "fc1", "fc2") if t.model.get_layer(n).lora_enabled] == [
        "fc1",
        "fc2",
    ]
    t = _lora_tuner(pretrained.keras_path, targets=keras.layers.Dense)
    enabled = [layer.name for layer in t.model.layers if getattr(layer, "lora_enabled", False)]
    assert enabled == ["fc1", "fc2"]  # the head's Dense layers train fully
    t = _lora_tuner(pretrained.keras_path, targets="conv2", rank=3)
    assert t.model.get_layer("conv2").lora_rank == 3


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("pool", "MaxPooling2D has no LoRA"),
        ("nope", "no layer named 'nope'"),
        ("head_output", "part of the new head"),
        (["fc1", "zz*"], "matches no layer"),
    ],
)
def test_bad_targets_raise_and_change_nothing(
    pretrained: Pretrained, targets: object, message: str
) -> None:
    tuner = FineTuner(pretrained.keras_path).replace_head(5)
    flags = [layer.trainable for layer in tuner.model.layers]
    with pytest.raises(ConfigError, match=message):
        tuner.lora(targets=targets)  # type: ignore[arg-type]
    assert [layer.trainable for layer in tuner.model.layers] == flags
    assert not any(getattr(layer, "lora_enabled", False) for layer in tuner.model.layers)


def test_flags_are_locked_after_lora(pretrained: Pretrained, few_shot: FewShot) -> None:
    tuner = _lora_tuner(pretrained.keras_path, rank=2)
    for call in (tuner.unfreeze, lambda: tuner.freeze("fc1"), lambda: tuner.freeze_until(0)):
        with pytest.raises(ConfigError, match="base kernels"):
            call()
    with pytest.raises(ConfigError, match="already"):
        tuner.lora()
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="rank"):
            FineTuner(pretrained.keras_path).lora(rank=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        FineTuner(pretrained.keras_path).lora(alpha=-1.0)
    x, y, _, _ = few_shot
    with pytest.raises(ConfigError, match="no LoRA"):
        FineTuner(pretrained.keras_path).replace_head(5).compile("adam").fit(
            x, y, epochs=1, verbose=0
        ).save_adapters("never.npz")


def test_nested_base_round_trip(
    nested_model: Pretrained, few_shot: FewShot, tmp_path: Path
) -> None:
    x, y, x_test, _ = few_shot
    result = (
        FineTuner(nested_model.keras_path)
        .replace_head(5)
        .lora(rank=2)
        .compile("adam")
        .fit(x, y, epochs=1, verbose=0)
    )
    path = result.save_adapters(tmp_path / "nested.npz")
    with np.load(path) as data:
        assert "base/base_fc/lora_kernel_b" in data.files
        assert "top_fc/lora_kernel_a" in data.files
    fresh = FineTuner(nested_model.h5).replace_head(5).load_adapters(path)
    np.testing.assert_array_equal(fresh.model.predict(x_test, verbose=0), result.predict(x_test))


# ------------------------------------------------ nested layers, embeddings, atomicity


@keras.saving.register_keras_serializable(package="transferkit_tests")
class Block(keras.layers.Layer):
    """A custom layer owning Dense and EinsumDense sublayers, like a transformer block's MLP
    and attention projections; `spare` (when asked for) is never called, so never built."""

    def __init__(self, units: int = 8, spare: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.units, self.spare = units, spare
        self.proj = keras.layers.EinsumDense("bi,io->bo", output_shape=(units,), name="proj")
        self.mlp = keras.layers.Dense(units, activation="relu", name="mlp")
        self.scale = self.add_weight(shape=(units,), initializer="ones", name="scale")
        if spare:
            self.unused = keras.layers.Dense(units, name="unused")

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.proj.build(input_shape)
        self.mlp.build((None, self.units))

    def call(self, x: object) -> object:
        return self.mlp(self.proj(x)) * self.scale

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "units": self.units, "spare": self.spare}


def _block_model(spare: bool = False, constraint: bool = False, embed: bool = False) -> keras.Model:
    keras.utils.set_random_seed(4)
    if embed:
        inp = keras.Input((6,), dtype="int32", name="tokens")
        x = keras.layers.Embedding(
            20,
            8,
            name="emb",
            embeddings_constraint=keras.constraints.NonNeg() if constraint else None,
        )(inp)
        x = keras.layers.Flatten(name="flat")(x)
    else:
        inp = keras.Input((8,), name="features")
        x = keras.layers.Dense(
            8,
            name="fc",
            kernel_constraint=keras.constraints.NonNeg() if constraint else None,
        )(inp)
    x = Block(8, name="block_1")(x)
    x = Block(8, spare=spare, name="block_2")(x)
    out = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inp, out, name="blocks")


def _flags_and_weights(model: keras.Model) -> tuple[list[object], list[np.ndarray]]:
    flags: list[object] = [(p, layer.trainable) for p, layer in layer_paths(model).items()]
    flags += [(v.path, v.trainable) for v in model.weights]
    return flags, [v.numpy().copy() for v in model.weights]


def test_lora_reaches_layers_inside_custom_layers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype("float32"), rng.integers(0, 3, 32)
    tuner = FineTuner(_block_model()).replace_head(3, at="block_2").lora(rank=2)
    model = tuner.model
    assert tuner._lora is not None
    assert tuner._lora.targets == (
        "fc",
        "block_1/proj",
        "block_1/mlp",
        "block_2/proj",
        "block_2/mlp",
    )
    assert "Block (LoRA r=2)" in tuner.summary()
    block = model.get_layer("block_1")
    keys = {id(v): key for key, (_, v) in variable_keys(model).items()}
    trainable = sorted(keys[id(v)] for v in model.trainable_variables)
    assert "block_1/proj/lora_kernel_a" in trainable and "block_1/mlp/lora_kernel_b" in trainable
    # The block's own weight and the projections' kernels and biases stay frozen.
    assert trainable == sorted(
        [
            f"{b}/{p}/lora_kernel_{ab}"
            for b in ("block_1", "block_2")
            for p in ("proj", "mlp")
            for ab in "ab"
        ]
        + ["fc/lora_kernel_a", "fc/lora_kernel_b"]
        + [f"{n}/{w}" for n in ("head_dense_1", "head_output") for w in ("kernel", "bias")]
    )
    # `.kernel` of a LoRA layer is the merged kernel; `_kernel` is the frozen variable.
    frozen = [v.numpy().copy() for v in (block.scale, block.proj._kernel, block.mlp.bias)]
    b_before = block.mlp.lora_kernel_b.numpy().copy()
    result = tuner.compile("adam").fit(x, y, epochs=2, batch_size=8, verbose=0)
    for before, v in zip(frozen, (block.scale, block.proj._kernel, block.mlp.bias), strict=True):
        np.testing.assert_array_equal(v.numpy(), before)
    assert not np.array_equal(block.mlp.lora_kernel_b.numpy(), b_before)
    path = result.save_adapters(tmp_path / "blocks.npz")
    with np.load(path) as data:
        assert "block_2/proj/lora_kernel_a" in data.files and "block_1/scale" not in data.files
    fresh = FineTuner(_block_model()).replace_head(3, at="block_2").load_adapters(path)
    np.testing.assert_array_equal(fresh.model.predict(x, verbose=0), result.predict(x))
    saved = result.save(tmp_path / "blocks.keras")
    np.testing.assert_allclose(
        keras.models.load_model(saved).predict(x, verbose=0), result.predict(x), atol=1e-5
    )


def test_selectors_reach_sublayers_by_name_path_and_class() -> None:
    def targets(sel: object) -> tuple[str, ...]:
        tuner = FineTuner(_block_model()).replace_head(3, at="block_2").lora(targets=sel)  # type: ignore[arg-type]
        assert tuner._lora is not None
        return tuner._lora.targets

    assert targets("proj") == ("block_1/proj", "block_2/proj")
    assert targets("block_2/mlp") == ("block_2/mlp",)
    assert targets("block_1") == ("block_1/proj", "block_1/mlp")
    assert targets("block_*/m*") == ("block_1/mlp", "block_2/mlp")
    assert targets(keras.layers.EinsumDense) == ("block_1/proj", "block_2/proj")
    with pytest.raises(ConfigError, match="no layer named 'prj'; closest names: 'proj'"):
        targets("prj")


def test_embedding_adapters_use_keras_names_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 20, (32, 6)).astype("int32"), rng.integers(0, 3, 32)
    tuner = FineTuner(_block_model(embed=True)).replace_head(3, at="block_2").lora(rank=2)
    emb = tuner.model.get_layer("emb")
    assert emb.lora_enabled and [v.name for v in emb.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    result = tuner.compile("adam").fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.abs(emb.lora_embeddings_b.numpy()).sum() > 0
    path = result.save_adapters(tmp_path / "emb.npz")
    with np.load(path) as data:
        assert {"emb/lora_embeddings_a", "emb/lora_embeddings_b"} <= set(data.files)
        assert "emb/embeddings" not in data.files
    fresh = FineTuner(_block_model(embed=True)).replace_head(3, at="block_2").load_adapters(path)
    np.testing.assert_array_equal(fresh.model.predict(x, verbose=0), result.predict(x))
    saved = result.save(tmp_path / "emb.keras")
    np.testing.assert_allclose(
        keras.models.load_model(saved).predict(x, verbose=0), result.predict(x), atol=1e-5
    )


def _prelora(model: keras.Model) -> keras.Model:
    model.get_layer("block_1").mlp.enable_lora(2)
    return model


@pytest.mark.parametrize(
    ("build", "targets", "message"),
    [
        (lambda: _block_model(constraint=True), None, "'fc' .*kernel constraint"),
        (lambda: _block_model(constraint=True), ["block_1", "fc"], "'fc' .*kernel constraint"),
        (lambda: _block_model(constraint=True, embed=True), None, "'emb' .*kernel constraint"),
        (lambda: _block_model(spare=True), None, "'block_2/unused' .*not built"),
        (lambda: _block_model(spare=True), "block_2", "'block_2/unused' .*not built"),
        (lambda: _prelora(_block_model()), "fc", "already enabled on 1 layer.*'block_1/mlp'"),
    ],
)
def test_lora_is_atomic(build: object, targets: object, message: str) -> None:
    tuner = FineTuner(build(), copy=False).replace_head(3, at="block_2")  # type: ignore[operator]
    before_flags, before_values = _flags_and_weights(tuner.model)
    enabled = [p for p, layer in _layer_paths(tuner.model) if getattr(layer, "lora_enabled", 0)]
    with pytest.raises(ConfigError, match=message):
        tuner.lora(rank=2, targets=targets)  # type: ignore[arg-type]
    after_flags, after_values = _flags_and_weights(tuner.model)
    assert after_flags == before_flags
    for a, b in zip(after_values, before_values, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [
        p for p, layer in _layer_paths(tuner.model) if getattr(layer, "lora_enabled", 0)
    ] == enabled


def _layer_paths(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    return list(layer_paths(model).items())
