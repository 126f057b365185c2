"""The feature cache on cut tensors with None axes besides the batch (a sequence length): cached
with the shapes the data has, exactly, also when they change between batches (kept batch by
batch); and a frozen keras-hub BERT encoder with a new head."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from transferkit import FineTuner
from transferkit.errors import ConfigError
from transferkit.train.cache.plan import plan_cache

FIT = {"epochs": 3, "batch_size": 16, "verbose": 0, "shuffle": False}


def close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True)
    )


def twin(tuner: FineTuner, x: Any, y: Any, **kw: Any) -> tuple[Any, Any, list[np.ndarray]]:
    start = [w.copy() for w in tuner.model.get_weights()]
    tuner.compile_sgd(lr=0.05)
    plain = tuner.fit(x, y, cache=False, **kw)
    plain_w = [w.copy() for w in tuner.model.get_weights()]
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=0.05)
    cached = tuner.fit(x, y, cache=True, **kw)
    assert not plain.cached
    return cached, plain_w, tuner.model.get_weights()


def sequence_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    inp = keras.Input((None, 4), name="seq")
    h = keras.layers.Conv1D(8, 3, padding="same", name="frozen_conv", trainable=False)(inp)
    h = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="conv")(h)
    h = keras.layers.GlobalAveragePooling1D(name="gap")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def test_sequence_axis_none_in_the_graph_is_cached_exactly() -> None:
    tuner = FineTuner(sequence_model())
    plan = plan_cache(tuner.model)
    assert plan.cut_layer == "frozen_conv"
    assert tuple(plan.prefix.outputs[0].shape) == (None, None, 8)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12, 4)).astype("float32")
    cached, plain_w, cached_w = twin(tuner, x, rng.integers(0, 3, 64), **FIT)
    assert cached.cached and cached.cache_layer == "frozen_conv"
    assert close(plain_w, cached_w)


def _two_lengths(seed: int, lengths: tuple[int, ...] = (12, 8, 12)) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)

    def part(length: int) -> tf.data.Dataset:
        x = rng.normal(size=(16, length, 4)).astype("float32")
        return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 3, 16))).batch(16)

    ds = part(lengths[0])
    for length in lengths[1:]:
        ds = ds.concatenate(part(length))
    return ds


def test_lengths_that_change_between_batches_are_cached_batch_by_batch() -> None:
    # Text padded per batch: the cut tensor is (16, 12, 8), then (16, 8, 8), then (16, 12, 8).
    # The features cannot be one array; kept batch by batch, the head trains on each batch as
    # plain fit does, and the validation batches (other lengths again) score the same.
    train, val = _two_lengths(1), _two_lengths(2, (5, 9))
    tuner = FineTuner(sequence_model())
    cached, plain_w, cached_w = twin(tuner, train, None, epochs=3, verbose=0, validation_data=val)
    assert cached.cached and cached.cache_layer == "frozen_conv"
    assert close(plain_w, cached_w)


def test_changing_lengths_with_val_loss_equal_to_plain_fit() -> None:
    train, val = _two_lengths(3), _two_lengths(4, (7, 3))
    tuner = FineTuner(sequence_model())
    start = [w.copy() for w in tuner.model.get_weights()]
    tuner.compile_sgd(lr=0.05)
    plain = tuner.fit(train, epochs=2, verbose=0, validation_data=val, cache=False)
    tuner.model.set_weights(start)
    tuner.compile_sgd(lr=0.05)
    cached = tuner.fit(train, epochs=2, verbose=0, validation_data=val, cache=True)
    assert cached.cached
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(cached.history[key], plain.history[key], rtol=1e-4)


def test_changing_lengths_with_batches_reshuffled_are_cached() -> None:
    # The batches come in a new order each epoch (their contents fixed): the cached head
    # trains on the same batches, drawn in its own order.
    keras.utils.set_random_seed(0)
    ds = _two_lengths(5).shuffle(3, seed=1, reshuffle_each_iteration=True)
    tuner = FineTuner(sequence_model())
    head = tuner.model.get_layer("out")
    before = head.kernel.numpy().copy()
    result = tuner.compile_sgd(lr=0.05).fit(ds, epochs=2, verbose=0, cache=True)
    assert result.cached and np.isfinite(result.history["loss"]).all()
    assert not np.allclose(head.kernel.numpy(), before)


def test_changing_lengths_with_elements_reshuffled_fall_back() -> None:
    # Elements reshuffled before batching: every epoch pads other batches. The pipeline's graph
    # says so before anything is computed.
    rng = np.random.default_rng(6)
    rows = [rng.normal(size=(n, 4)).astype("float32") for n in rng.integers(3, 12, 48)]
    labels = rng.integers(0, 3, 48)
    ds = tf.data.Dataset.from_generator(
        lambda: zip(rows, labels, strict=True),
        output_signature=(
            tf.TensorSpec((None, 4), tf.float32),
            tf.TensorSpec((), tf.int64),
        ),
    )
    ds = ds.shuffle(48, seed=2, reshuffle_each_iteration=True).padded_batch(16)
    tuner = FineTuner(sequence_model())
    tuner.compile_sgd(lr=0.05)
    assert not tuner.fit(ds, epochs=2, verbose=0).cached  # plain fit handles every length
    with pytest.raises(ConfigError, match=r"`PaddedBatchDatasetV2` step after its reshuffle"):
        tuner.fit(ds, epochs=1, verbose=0, cache=True)


def test_frozen_bert_encoder_with_a_new_head() -> None:
    import keras_hub  # type: ignore[import-untyped]

    keras.utils.set_random_seed(6)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    backbone.trainable = False
    names = ("token_ids", "segment_ids", "padding_mask")
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in names}
    pooled = backbone(inputs)["pooled_output"]
    model = keras.Model(inputs, keras.layers.Dense(2, name="new_head")(pooled))
    # BERT's embeddings and transformer layers hold Dropout: under Keras semantics the cut
    # falls after the embeddings, a (batch, None, 8) tensor, with the padding mask beside it.
    train = plan_cache(FineTuner(model, copy=False).model)
    assert train.cut_layer == "padding_mask"
    assert [tuple(t.shape) for t in train.prefix.outputs] == [(None, None, 8), (None, None)]
    tuner = FineTuner(model, copy=False, dropout="frozen")
    rng = np.random.default_rng(2)
    x = {
        "token_ids": rng.integers(1, 50, (48, 10)).astype("int32"),
        "segment_ids": np.zeros((48, 10), "int32"),
        "padding_mask": np.ones((48, 10), "int32"),
    }
    cached, plain_w, cached_w = twin(tuner, x, rng.integers(0, 2, 48), **FIT)
    assert cached.cached and cached.cache_layer == "pooled_dense"
    assert close(plain_w, cached_w)
