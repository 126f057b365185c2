"""keras-hub models built from tiny configs (no presets, no downloads) through the whole chain.

For ResNet, ViT, DINOv2 and BERT backbones and a ResNet image classifier (a keras-hub Task):
load into FineTuner, summary, freeze_until a block, a new head, fit (with the feature cache where
it applies), fine_tune, save and reload; then LoRA, its adapter file and its merged save. A
Gemma decoder checks LoRA on a decoder with a tied ReversibleEmbedding.

The default head is not right yet on every backbone (DINOv2: "layer 'encoder' has several
outputs"; BERT: two outputs), so every case passes an explicit `at=` except the task, whose
default cut drops its classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hub_models
import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import transferkit  # noqa: E402
from transferkit import FineTuner  # noqa: E402
from transferkit.model.layers import resolve  # noqa: E402

N = 16
SEQ = hub_models.SEQ
VOCAB = hub_models.VOCAB


def _classifier() -> keras.Model:
    return keras_hub.models.ResNetImageClassifier(
        backbone=hub_models.resnet(), num_classes=4, preprocessor=None
    )


def _gemma_classifier() -> keras.Model:
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    inputs = {k: keras.Input((SEQ,), dtype="int32", name=k) for k in ("token_ids", "padding_mask")}
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="scores")(pooled), name="gemma_scores")


def _images(rng: np.random.Generator) -> Any:
    return rng.random((N, 32, 32, 3)).astype("float32")


def _tokens(rng: np.random.Generator) -> Any:
    return {
        "token_ids": rng.integers(0, VOCAB, (N, SEQ)).astype("int32"),
        "segment_ids": np.zeros((N, SEQ), "int32"),
        "padding_mask": np.ones((N, SEQ), "int32"),
    }


@dataclass(frozen=True)
class Case:
    """One keras-hub model and what the chain should find on it."""

    build: Callable[[], keras.Model]
    data: Callable[[np.random.Generator], Any]
    block: str  # freeze_until this block
    frozen: str  # a layer with weights before it
    at: str | None  # where the head goes (None: the default cut)
    cached: bool | None  # whether cache="auto" fires (None: not asserted, see below)
    inside: str  # a LoRA target path fragment inside a custom layer (or a plain layer)


CASES = {
    "resnet": Case(
        hub_models.resnet, _images, "stack1_block0_1_conv", "conv1_conv", None, True, "conv"
    ),
    "vit": Case(
        hub_models.vit,
        _images,
        "vit_encoder",
        "vit_patching_and_embedding",
        None,
        True,
        "vit_encoder/transformer_block_1/mha/query",
    ),
    # DINOv2's embeddings hold a Dropout(rate=0.0), which counts as deterministic.
    "dinov2": Case(
        hub_models.dinov2,
        _images,
        "encoder",
        "embeddings",
        None,
        True,
        "encoder/layers_0/attention/attention/query",
    ),
    # BERT takes sequences of any length: the cut tensor's sequence axis is None in the graph,
    # fixed in the data, and cached at the data's shape.
    "bert": Case(
        hub_models.bert,
        _tokens,
        "transformer_layer_1",
        "token_embedding",
        "pooled_output",
        True,
        "transformer_layer_0/self_attention_layer/query",
    ),
    "task": Case(
        _classifier, _images, "stack1_block0_1_conv", "conv1_conv", None, True, "conv1_conv"
    ),
}


def _predict(model: keras.Model, x: Any) -> np.ndarray:
    # A direct call, not `predict`: tracing a transformer's predict function costs seconds.
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def _values(layer: keras.layers.Layer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in layer.weights]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_chain(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = case.build()
    x, y = case.data(rng), rng.integers(0, 3, N)
    original = [v.numpy().copy() for v in model.weights]

    tuner = FineTuner(model)
    assert case.block in tuner.summary()
    tuner.freeze_until(case.block).replace_head(3, at=case.at)
    work = tuner.model
    frozen, block, head = (resolve(work, n) for n in (case.frozen, case.block, "head_output"))
    frozen_before, block_before, head_before = _values(frozen), _values(block), _values(head)
    result = tuner.compile("adam", run_eagerly=hub_models.EAGER).fit(
        x, y, epochs=2, batch_size=8, verbose=0, cache="auto"
    )
    assert not _same(_values(head), head_before)
    assert _same(_values(frozen), frozen_before)
    if case.cached is not None:
        assert result.cached is case.cached

    saved = result.save(tmp_path / f"{name}.keras")
    expected = _predict(result.model, x)
    reloaded, info = transferkit.load(saved)
    np.testing.assert_allclose(_predict(reloaded, x), expected, atol=1e-5)
    np.testing.assert_allclose(_predict(keras.saving.load_model(saved), x), expected, atol=1e-5)
    assert info["history"]["loss"] == result.history["loss"]

    tuned = tuner.fine_tune(x, y, head_epochs=1, epochs=1, batch_size=8, verbose=0)
    assert tuned.phases == [("head", 1), ("full", 1)]
    assert not _same(_values(block), block_before)  # the unfrozen block trained in "full"
    assert _same(_values(frozen), frozen_before)
    # The model passed in is never changed.
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(original, model.weights, strict=True))

    lora = FineTuner(model).replace_head(3, at=case.at).lora(rank=2)
    assert lora._lora is not None
    assert any(case.inside in target for target in lora._lora.targets), lora._lora.targets
    lora_result = lora.compile("adam", run_eagerly=hub_models.EAGER).fit(
        x, y, epochs=1, batch_size=8, verbose=0
    )
    adapters = lora_result.save_adapters(tmp_path / f"{name}.npz")
    with np.load(adapters) as data:
        assert any(case.inside in key and "lora_" in key for key in data.files)
    again = FineTuner(model).replace_head(3, at=case.at).load_adapters(adapters)
    lora_expected = _predict(lora_result.model, x)
    np.testing.assert_array_equal(_predict(again.model, x), lora_expected)
    merged = lora_result.save(tmp_path / f"{name}-merged.keras")
    np.testing.assert_allclose(
        _predict(keras.saving.load_model(merged), x), lora_expected, atol=1e-5
    )


def test_vit_copies_by_its_config_where_clone_model_fails() -> None:
    vit = hub_models.vit()
    with pytest.raises(Exception, match="ViTPatchingAndEmbedding"):
        keras.models.clone_model(vit)
    tuner = FineTuner(vit)
    copy = tuner.model
    assert type(copy) is type(vit) and copy is not vit
    assert [layer.name for layer in copy.layers] == [layer.name for layer in vit.layers]
    for a, b in zip(vit.weights, copy.weights, strict=True):
        assert a is not b
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = _images(np.random.default_rng(1))
    np.testing.assert_array_equal(_predict(copy, images), _predict(vit, images))
    # The head sits on the backbone called whole, so the result saves as a ViTBackbone inside.
    tuner.replace_head(3, at="vit_encoder")
    assert [type(layer).__name__ for layer in tuner.model.layers][1] == "ViTBackbone"


def test_lora_on_gemma_decoder_and_its_tied_embedding(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = _gemma_classifier()
    x = {
        "token_ids": rng.integers(0, VOCAB, (N, SEQ)).astype("int32"),
        "padding_mask": np.ones((N, SEQ), "int32"),
    }
    y = rng.integers(0, 3, N)
    tuner = FineTuner(model).replace_head(3, at="pool").lora(rank=2)
    assert tuner._lora is not None
    targets = tuner._lora.targets
    assert targets[0] == "gemma_backbone/token_embedding"
    for part in ("query", "key", "value", "attention_output", "ffw_gating", "ffw_linear"):
        assert f"gemma_backbone/decoder_block_0/{part}" in targets or any(
            t.endswith(f"/{part}") for t in targets
        ), (part, targets)
    embedding = resolve(tuner.model, "token_embedding")
    assert [v.name for v in embedding.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    result = tuner.compile("adam", run_eagerly=hub_models.EAGER).fit(
        x, y, epochs=2, batch_size=8, verbose=0
    )
    assert np.abs(embedding.lora_embeddings_b.numpy()).sum() > 0
    path = result.save_adapters(tmp_path / "gemma.npz")
    with np.load(path) as data:
        assert "gemma_backbone/token_embedding/lora_embeddings_a" in data.files
    again = FineTuner(model).replace_head(3, at="pool").load_adapters(path)
    np.testing.assert_array_equal(_predict(again.model, x), _predict(result.model, x))
