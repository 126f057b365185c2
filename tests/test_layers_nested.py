"""Layers inside custom layers: keras-hub transformer blocks and a hand-written pair of Denses.

keras-hub's ViT and DINOv2 keep every transformer block inside one encoder layer, which is not a
model. `freeze_until`, `freeze` and `unfreeze` reach the blocks by name: the encoder is split into
units, frozen before the block and trained from it on, and training leaves exactly the frozen
weights alone.
"""

from __future__ import annotations

from typing import Any

import hub_models
import keras
import numpy as np
import pytest

from transferkit import FineTuner, LayerNotFoundError
from transferkit.compile.lr_groups import LRGroups, layer_multipliers
from transferkit.model.layers import leaf_layers, resolve

N = 16


@keras.saving.register_keras_serializable(package="transferkit_tests")
class Pair(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer with a weight of its own and two Dense sublayers, used in that order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(8, activation="relu", name="first")
        self.second = keras.layers.Dense(6, activation="relu", name="second")

    def build(self, input_shape: Any) -> None:
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.first.build(input_shape)
        self.second.build((*input_shape[:-1], 8))

    def call(self, x: Any) -> Any:
        return self.second(self.first(x * self.scale))


def _pair_model() -> keras.Model:
    inputs = keras.Input((5,), name="x")
    h = keras.layers.Dense(5, name="stem")(inputs)
    h = Pair(name="pair")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="scores")(h), name="pair_model")


def _values(*layers: keras.layers.Layer) -> list[np.ndarray]:
    return [np.array(v.numpy()) for layer in layers for v in layer.weights]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _changed(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    # Every weight changed, not just one: a partly trained block would pass "not _same".
    return len(a) == len(b) and all(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _trainable_ids(*layers: keras.layers.Layer) -> set[int]:
    return {id(v) for layer in layers for v in layer.trainable_weights}


def _optimizer_ids(model: keras.Model) -> set[int]:
    # Private API (Keras 3.15.1): the variables a built optimizer updates.
    return {id(v) for v in model.optimizer._trainable_variables}


# (builder, block to freeze until, the block before it, the embedding, the final norm)
HUB = {
    "vit": (
        hub_models.vit,
        "transformer_block_2",
        "transformer_block_1",
        "vit_patching_and_embedding",
        "vit_encoder/ln",
    ),
    "dinov2": (hub_models.dinov2, "layers_1", "layers_0", "embeddings", "layernorm"),
}


@pytest.mark.parametrize("name", list(HUB))
def test_freeze_until_a_block_inside_an_encoder_trains_from_that_block_on(name: str) -> None:
    build, block_name, before_name, embedding_name, norm_name = HUB[name]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((N, 32, 32, 3)).astype("float32"), rng.integers(0, 3, N)

    tuner = FineTuner(build()).freeze_until(block_name).replace_head(3)
    work = tuner.model
    block, before, embedding, norm = (
        resolve(work, n) for n in (block_name, before_name, embedding_name, norm_name)
    )
    head = [resolve(work, n) for n in tuner.head.layer_names]  # type: ignore[union-attr]
    # The block's encoder is split into units; its blocks keep flags of their own.
    names = [leaf.name for leaf in leaf_layers(work)]
    assert before_name in names and block_name in names
    assert not before.trainable and block.trainable
    expected = _trainable_ids(block, norm, *head)
    assert {id(v) for v in work.trainable_variables} == expected
    assert "partly" in tuner.summary() and block_name in tuner.summary()

    frozen_before = _values(before, embedding)
    trained_before = _values(block, norm, *head)
    result = tuner.compile("adam", run_eagerly=hub_models.EAGER).fit(
        x, y, epochs=1, batch_size=8, verbose=0, cache=True
    )
    assert _optimizer_ids(result.model) == expected
    assert _same(_values(before, embedding), frozen_before)
    trained_after = _values(block, norm, *head)
    assert _changed(
        [w for w in trained_after if w.size > 1], [w for w in trained_before if w.size > 1]
    )
    # The cache never cuts inside the split encoder: it is one trainable unit, cut before.
    assert result.cached is True and result.cache_layer == embedding_name


def test_freeze_and_unfreeze_a_block_inside_an_encoder() -> None:
    tuner = FineTuner(hub_models.vit())
    work = tuner.model
    everything = {id(v) for v in work.trainable_variables}
    first, second = resolve(work, "transformer_block_1"), resolve(work, "transformer_block_2")

    tuner.freeze("transformer_block_1")
    assert {id(v) for v in work.trainable_variables} == everything - _ids(first)
    assert not first.trainable and second.trainable
    assert resolve(work, "vit_encoder").trainable  # split: stays trainable for block 2

    tuner.unfreeze("transformer_block_1")
    assert {id(v) for v in work.trainable_variables} == everything
    # Once its units agree again, the encoder is one unit again.
    assert "vit_encoder" in [leaf.name for leaf in leaf_layers(work)]
    assert "transformer_block_1" not in [leaf.name for leaf in leaf_layers(work)]

    # Freezing the whole encoder after a split freezes its blocks too, and a path reaches one.
    tuner.freeze("transformer_block_2").freeze("vit_encoder").unfreeze("vit_encoder/ln")
    encoder, norm = resolve(work, "vit_encoder"), resolve(work, "vit_encoder/ln")
    assert {id(v) for v in work.trainable_variables} == everything - _ids(encoder) | _ids(norm)


def _ids(layer: keras.layers.Layer) -> set[int]:
    return {id(v) for v in layer.weights}


@pytest.mark.parametrize(
    ("build", "wrong", "listed"),
    [
        (hub_models.vit, "transformer_block_9", "'transformer_block_1'"),
        (hub_models.dinov2, "layers_7", "'layers_0'"),
    ],
)
def test_a_wrong_block_name_lists_the_nested_blocks(build: Any, wrong: str, listed: str) -> None:
    tuner = FineTuner(build())
    before = [bool(v.trainable) for v in tuner.model.weights]
    with pytest.raises(LayerNotFoundError, match=listed):
        tuner.freeze_until(wrong)
    assert [bool(v.trainable) for v in tuner.model.weights] == before


def test_a_name_shared_by_blocks_is_ambiguous_and_shows_their_paths() -> None:
    tuner = FineTuner(hub_models.vit())
    with pytest.raises(LayerNotFoundError, match=r"ambiguous.*transformer_block_2/ln_1"):
        tuner.freeze_until("ln_1")
    tuner.freeze_until("transformer_block_2/ln_1")
    assert not resolve(tuner.model, "transformer_block_1").trainable


def test_a_hand_written_custom_layer_is_split_with_its_own_weight() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 5)).astype("float32"), rng.integers(0, 3, 32)
    tuner = FineTuner(_pair_model()).freeze_until("second")
    work = tuner.model
    stem, pair, first, second, scores = (
        resolve(work, n) for n in ("stem", "pair", "first", "second", "scores")
    )
    # The pair's own `scale` comes before its sublayers: it is frozen with `first`.
    assert pair.trainable and not pair.scale.trainable
    expected = _trainable_ids(second, scores)
    assert {id(v) for v in work.trainable_variables} == expected
    rows = tuner.summary()
    assert "first" in rows and "second" in rows

    frozen_before, trained_before = [*_values(stem, first), pair.scale.numpy()], _values(second)
    result = tuner.compile("adam", run_eagerly=True).fit(
        x, y, epochs=1, batch_size=8, verbose=0, cache=True
    )
    assert _optimizer_ids(result.model) == expected
    assert _same([*_values(stem, first), pair.scale.numpy()], frozen_before)
    assert _changed(_values(second), trained_before)
    assert result.cache_layer == "stem"  # cut after the frozen stem, before the split pair

    # lr_mult reaches a layer inside the custom layer.
    mults = layer_multipliers(work, LRGroups(lr_mult=(("second", 0.5),)))
    assert {mults[id(v)] for v in second.trainable_weights} == {0.5}
    assert {mults[id(v)] for v in scores.trainable_weights} == {1.0}


def test_fine_tune_restores_a_split_custom_layer_in_phase_full() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 5)).astype("float32"), rng.integers(0, 3, 32)
    tuner = FineTuner(_pair_model()).freeze_until("second").replace_head(3)
    work = tuner.model
    first, second, pair = (resolve(work, n) for n in ("first", "second", "pair"))
    frozen_before, trained_before = [*_values(first), pair.scale.numpy()], _values(second)
    tuner.compile("adam", run_eagerly=True)
    tuned = tuner.fine_tune(x, y, head_epochs=1, epochs=1, batch_size=8, verbose=0)
    assert tuned.phases == [("head", 1), ("full", 1)]
    # Phase "head" froze the whole pair; phase "full" restored the split exactly.
    assert _same([*_values(first), pair.scale.numpy()], frozen_before)
    assert _changed(_values(second), trained_before)
    assert pair.trainable and not first.trainable and not pair.scale.trainable


def test_the_copy_of_a_model_keeps_flags_inside_custom_layers() -> None:
    model = _pair_model()
    pair = model.get_layer("pair")
    pair.first.trainable = False
    pair.scale.trainable = False
    work = FineTuner(model).model
    assert work is not model
    copied = resolve(work, "pair")
    assert copied.trainable and not copied.first.trainable and not copied.scale.trainable
    assert {v.path for v in work.trainable_variables} == {v.path for v in model.trainable_variables}
