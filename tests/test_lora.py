"""LoRA: targets, frozen bases, adapter files, merged saves, summary."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import Pretrained

from transferkit import AdapterMismatchError, ConfigError, FineTuner

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
