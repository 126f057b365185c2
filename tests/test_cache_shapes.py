"""The feature cache on cut tensors with None axes besides the batch (a sequence length): cached
with the shapes the data has, exactly; and a frozen keras-hub BERT encoder with a new head."""

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


def test_lengths_that_change_between_batches_fall_back() -> None:
    rng = np.random.default_rng(1)

    def part(length: int) -> tf.data.Dataset:
        x = rng.normal(size=(16, length, 4)).astype("float32")
        return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 3, 16))).batch(16)

    ds = part(12).concatenate(part(8))
    tuner = FineTuner(sequence_model())
    tuner.compile_sgd(lr=0.05)
    assert not tuner.fit(ds, epochs=2, verbose=0).cached  # plain fit handles both lengths
    with pytest.raises(ConfigError, match=r"sizes change between batches.*\(12, 8\) then \(8, 8\)"):
        tuner.fit(ds, epochs=2, verbose=0, cache=True)


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
