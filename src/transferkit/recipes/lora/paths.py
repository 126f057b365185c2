"""The model tree LoRA works on: every layer by its path and every variable by its key.

A path names the nested models, the layer, then the sublayers inside custom layers
(`vit_encoder/transformer_block_0/mha/query`); a key adds the variable's name
(`base/fc1/lora_kernel_a`). Both are the same on every copy of a model, so that adapter files
name variables across processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import keras

from transferkit.model.graph import is_container
from transferkit.model.layers import all_layers, top_layers

__all__ = ["Node", "layer_paths", "layer_tree", "own_weights", "sublayers", "variable_keys"]


@dataclass(frozen=True)
class Node:
    """One layer of the model tree: its path, the layer, and the graph leaf it belongs to.

    `leaf` is the layer itself for a graph leaf, the enclosing graph leaf for a sublayer of a
    custom layer (an attention projection inside an encoder block), and None for a container.
    """

    path: str
    layer: keras.layers.Layer
    leaf: keras.layers.Layer | None


def sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers directly below `layer`: a container's graph layers, a custom layer's tracked
    sublayers; input layers left out."""
    # Private API (checked on Keras 3.15.1): `_layers` lists the sublayers a layer tracks as
    # attributes, in assignment order, which is the same for every instance built from the same
    # config. For a container it is its graph layers (`Model.layers`).
    kids = top_layers(layer) if is_container(layer) else list(getattr(layer, "_layers", []))
    return [kid for kid in kids if not isinstance(kid, keras.layers.InputLayer)]


def _stable_name(layer: keras.layers.Layer) -> str:
    """The name of a sublayer without the counter Keras adds to a generated name.

    Sublayer names are not saved: a sublayer created without a name (a custom layer's softmax,
    dropout or dense) is named by a process-wide counter (`softmax_16`), which differs between
    two copies of the same model. Only graph layers keep their saved names.
    """
    # The pattern of Keras 3.15's `naming.auto_name`: snake_case(class name), then `_<n>`.
    snake = re.sub(r"\W+", "", type(layer).__name__)
    snake = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", snake)
    snake = re.sub("([a-z])([A-Z])", r"\1_\2", snake).lower()
    return snake if re.fullmatch(rf"{re.escape(snake)}(_\d+)?", layer.name) else str(layer.name)


def layer_tree(model: keras.Model) -> list[Node]:
    """Every layer below `model`, depth-first: graph layers and the sublayers of custom layers.

    A graph layer keeps its graph path even when a custom layer also tracks it, and a shared
    sublayer is listed once, under its first owner. A sublayer's generated name loses its
    counter, and sibling layers with the same name get `#2`, `#3` suffixes, so that every copy
    of a model has the same paths.
    """
    graph_ids = {id(layer) for layer in all_layers(model)}
    seen: set[int] = set()
    nodes: list[Node] = []

    def visit(parent: keras.layers.Layer, prefix: str, leaf: keras.layers.Layer | None) -> None:
        used: dict[str, int] = {}
        for child in sublayers(parent):
            if id(child) in seen or (leaf is not None and id(child) in graph_ids):
                continue
            seen.add(id(child))
            base = child.name if leaf is None else _stable_name(child)
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}#{used[base]}"
            path = prefix + name
            owner = leaf if leaf is not None else (None if is_container(child) else child)
            nodes.append(Node(path, child, owner))
            visit(child, path + "/", owner)

    visit(model, "", None)
    return nodes


def layer_paths(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every layer by its path: nested model names, the layer name, then the names of sublayers
    inside custom layers (`base/fc1`, `vit_encoder/transformer_block_0/mha/query`)."""
    return {node.path: node.layer for node in layer_tree(model)}


def own_weights(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The variables `layer` made itself, without those of its sublayers (a class token, a
    layer scale, a kernel)."""
    # `layer.weights` includes every sublayer's; a variable belongs to the layer that made it.
    inner = {id(w) for child in sublayers(layer) for w in child.weights}
    return [w for w in layer.weights if id(w) not in inner]


def variable_keys(model: keras.Model) -> dict[str, tuple[keras.layers.Layer, keras.Variable]]:
    """Every weight of the model keyed by `<layer path>/<variable name>`, in model order.

    The key does not use `variable.path`: Keras builds it from the name scopes at creation time,
    so it carries counter-dependent prefixes for in-memory models (`sequential_3/fc1/kernel`) and
    LoRA variables created later on a nested layer lack the names of its parents.
    """
    keys: dict[str, tuple[keras.layers.Layer, keras.Variable]] = {}
    seen: set[int] = set()
    for node in layer_tree(model):
        for variable in own_weights(node.layer):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            key = f"{node.path}/{variable.name}"
            unique, i = key, 1
            while unique in keys:
                i += 1
                unique = f"{key}#{i}"
            keys[unique] = (node.layer, variable)
    return keys
