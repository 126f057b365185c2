"""Tiny keras-hub backbones built from config (random weights, no presets, no downloads).

The tests of the chain (`test_hub`), of the default cut (`test_heads_real`) and of layers inside
custom layers (`test_layers_nested`) build the same few models; each builder here takes keyword
overrides of its config for the tests that need another size. keras-hub is imported when a
model is built, and a test that builds one is skipped where keras-hub is not installed.
"""

from __future__ import annotations

from typing import Any

import keras
import pytest

IMAGE = (32, 32, 3)
SEQ = 12
VOCAB = 50
# How the tests compile these models' steps. On TensorFlow an eager step is faster: tracing a
# transformer's train function costs seconds. On JAX an eager step compiles every op as its own
# XLA program (about 1,000 per test on the ViT) where a jitted step is one: measured on the
# ViT chain test, 13.5 s eager and 8.8 s jitted.
EAGER = keras.backend.backend() == "tensorflow"


def _hub() -> Any:
    return pytest.importorskip("keras_hub")


def resnet(**config: Any) -> keras.Model:
    """A two-stack ResNet of basic blocks on 32x32 images."""
    # ResNetBackbone insists on 64 filters in the first stack.
    defaults: dict[str, Any] = {
        "input_conv_filters": [64],
        "input_conv_kernel_sizes": [3],
        "stackwise_num_filters": [64, 8],
        "stackwise_num_blocks": [1, 1],
        "stackwise_num_strides": [1, 2],
        "block_type": "basic_block",
        "use_pre_activation": False,
        "image_shape": IMAGE,
    }
    return _hub().models.ResNetBackbone(**{**defaults, **config})


def vit(**config: Any) -> keras.Model:
    """A ViT of two blocks on 32x32 images (keras-hub numbers them from 1:
    `transformer_block_1`, `transformer_block_2`)."""
    defaults: dict[str, Any] = {
        "image_shape": IMAGE,
        "patch_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 16,
        "mlp_dim": 32,
    }
    return _hub().models.ViTBackbone(**{**defaults, **config})


def dinov2(**config: Any) -> keras.Model:
    """A DINOv2 of two layers (`layers_0`, `layers_1`) on 32x32 images."""
    defaults: dict[str, Any] = {
        "patch_size": 8,
        "num_layers": 2,
        "hidden_dim": 16,
        "num_heads": 2,
        "intermediate_dim": 32,
        "image_shape": IMAGE,
        "position_embedding_shape": (32, 32),
    }
    return _hub().models.DINOV2Backbone(**{**defaults, **config})


def bert(**config: Any) -> keras.Model:
    """A BERT of two transformer layers on sequences of `SEQ` tokens out of `VOCAB`."""
    defaults: dict[str, Any] = {
        "vocabulary_size": VOCAB,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 16,
        "intermediate_dim": 32,
        "max_sequence_length": SEQ,
    }
    return _hub().models.BertBackbone(**{**defaults, **config})
