"""Merged saves: a plain copy of a LoRA model with every update merged into its kernel."""

from __future__ import annotations

from typing import Any

import keras

from transferkit._utils.configs import map_config
from transferkit.errors import SaveError
from transferkit.recipes.lora.paths import layer_tree, own_weights

__all__ = ["merged_copy", "strip_lora"]


def _plain_layer(node: Any) -> Any:
    if isinstance(node, dict) and "lora_rank" in node:
        node = {k: v for k, v in node.items() if k != "lora_alpha"}
        node["lora_rank"] = None
    return node


def strip_lora(config: Any) -> Any:
    """A copy of a model config in which no layer enables LoRA.

    Every layer config with a `lora_rank` gets `lora_rank: None` and loses its `lora_alpha`, so
    that `from_config` builds plain layers whose weights are the merged kernels.

    Args:
        config: a model's `get_config()` (a tree of dicts and lists).

    Returns:
        The rewritten copy; `config` is not changed.
    """
    return map_config(config, _plain_layer)


def merged_copy(model: keras.Model) -> keras.Model:
    """A plain copy of `model` with every LoRA update merged into its layer's kernel.

    The live model keeps its adapters. The copy saves to `.h5` and `.keras` and reloads with
    plain `keras.models.load_model`.

    Raises:
        SaveError: the model cannot be rebuilt from its configuration.
    """
    try:
        copy = type(model).from_config(strip_lora(model.get_config()))
    except Exception as exc:
        raise SaveError(f"cannot build a merged copy of {model.name!r}: {exc}") from exc
    src_nodes, dst_nodes = layer_tree(model), layer_tree(copy)
    for src, dst in zip(src_nodes, dst_nodes, strict=False):
        if src.path != dst.path:
            raise SaveError(f"merged copy: layer {src.path!r} rebuilt as {dst.path!r}.")
        if getattr(src.layer, "lora_enabled", False):
            # Keras' own serialisation (3.15) stores `kernel + (alpha / rank) * A @ B` in the
            # kernel slot, in the order the plain layer loads.
            store: dict[str, Any] = {}
            src.layer.save_own_variables(store)
            dst.layer.load_own_variables(store)
            continue
        mine, theirs = own_weights(src.layer), own_weights(dst.layer)
        if [tuple(v.shape) for v in mine] != [tuple(v.shape) for v in theirs]:
            raise SaveError(f"merged copy: the weights of {src.path!r} were rebuilt differently.")
        for a, b in zip(mine, theirs, strict=True):
            b.assign(a)
    if len(src_nodes) != len(dst_nodes):
        raise SaveError(
            f"merged copy: {model.name!r} has {len(src_nodes)} layers, its rebuilt copy "
            f"{len(dst_nodes)}."
        )
    return copy
