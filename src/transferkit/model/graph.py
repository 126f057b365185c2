"""Walking and replaying a model's graph.

Keras 3 keeps a Functional model's graph in private structures (`_nodes_by_depth`, node
arguments). Every touch of them lives here, checked against Keras 3.15. Replaying a graph on
fresh `keras.Input` tensors, with the same layer objects, gives us what `.input` / `.output`
cannot: a Functional twin of any Sequential (loaded ones included), the tensor produced by any
layer (even a layer inside a nested base, or a layer called again in another graph), and models
cut at any point that share their weights with the original.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import keras

__all__ = [
    "Recorded",
    "derived_model",
    "fresh_inputs",
    "input_paths",
    "is_container",
    "output_names",
    "pack_inputs",
    "producer",
    "quiet_dict_inputs",
    "replay",
]

# Maps id(layer) -> the output tensors it produced, one entry per call in the replayed graph.
Recorded = dict[int, list[Any]]


def is_container(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a model used as a layer (a nested Functional or Sequential base)."""
    return isinstance(layer, keras.Model)


def graph_inputs(model: keras.Model) -> list[Any]:
    """The symbolic inputs of a built model (`model.inputs` works where `.input` raises)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(f"model {model.name!r} is not built")
    return list(inputs)


def fresh_inputs(model: keras.Model) -> list[Any]:
    """New `keras.Input` tensors shaped like the model's inputs."""
    return [
        keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=_input_name(t, i))
        for i, t in enumerate(graph_inputs(model))
    ]


def _inputs_struct(model: keras.Model) -> Any:
    # Private API (checked on Keras 3.15.1): the structure (tensor, list or dict) a Functional
    # model was built with; `model.inputs` is its flattening.
    return getattr(model, "_inputs_struct", None)


def pack_inputs(model: keras.Model, inputs: Sequence[Any]) -> Any:
    """`inputs` (flat, in `model.inputs` order) in the structure `model` was built with.

    A model built on a dict of inputs keeps taking a dict keyed the same way, so a model derived
    from it (a new head, the feature cache's prefix) accepts the caller's data unchanged. A list
    of one input becomes the tensor itself, as `.input` would otherwise be a list.
    """
    flat = list(inputs)
    struct = _inputs_struct(model)
    if isinstance(struct, dict) and len(keras.tree.flatten(struct)) == len(flat):
        return keras.tree.pack_sequence_as(struct, flat)
    return flat[0] if len(flat) == 1 else flat


def derived_model(
    model: keras.Model, inputs: Sequence[Any], outputs: Any, name: str
) -> keras.Model:
    """A Functional model on `inputs` (flat, in `model.inputs` order) packed like `model`'s.

    Keras warns when a dict's keys differ from its input tensors' names; `model` was built
    that way already (its author saw the warning), so models derived from it do not repeat it.
    """
    with quiet_dict_inputs():
        return keras.Model(pack_inputs(model, inputs), outputs, name=name)


@contextmanager
def quiet_dict_inputs() -> Iterator[None]:
    """Silences Keras' warning about dict keys unlike the input names, for models we rebuild."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="When providing `inputs` as a dict")
        yield


def input_paths(model: keras.Model) -> list[tuple[Any, ...]] | None:
    """The key path of each of `model.inputs` when the model takes a dict, else None."""
    struct = _inputs_struct(model)
    if not isinstance(struct, dict):
        return None
    return [tuple(path) for path, _ in keras.tree.flatten_with_path(struct)]


def producer(tensor: Any) -> tuple[Any, Any, int] | None:
    """Where a symbolic tensor of a built graph comes from.

    Returns:
        `(operation, node, index)`: the layer or operation whose call produced `tensor`, that
        call's node, and the position of `tensor` in the call's flattened outputs; or None when
        `tensor` is an input of its graph.
    """
    # Private API (checked on Keras 3.15.1): every KerasTensor made by a call carries
    # `_keras_history` (operation, node_index, tensor_index) into `operation._inbound_nodes`.
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    op, node_index, tensor_index = history
    node = op._inbound_nodes[node_index]
    if node.is_input:
        return None
    return op, node, int(tensor_index)


def output_names(model: keras.Model) -> list[str]:
    """A name for each of `model.outputs`, in order.

    A model built with a dict of outputs (a keras-hub `BertBackbone`'s `pooled_output` and
    `sequence_output`) names them by their keys; other models by the layers that produce them.
    """
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return ["/".join(str(k) for k in path) for path, _ in keras.tree.flatten_with_path(struct)]
    names = []
    for tensor in model.outputs:
        found = producer(tensor)
        names.append(str(found[0].name) if found else str(getattr(tensor, "name", "input")))
    return names


def _input_name(tensor: Any, index: int) -> str:
    name = getattr(tensor, "name", None)
    if isinstance(name, str) and name and not name.startswith("keras_tensor"):
        return name
    return "input" if index == 0 else f"input_{index}"


def _as_list(x: Any) -> list[Any]:
    return list(keras.tree.flatten(x))


def replay(
    model: keras.Model,
    inputs: Sequence[Any],
    *,
    inline: bool = False,
    record: Recorded | None = None,
) -> Any:
    """Calls the layers of `model` on `inputs` in graph order and returns the outputs.

    Args:
        model: a built Functional or Sequential model.
        inputs: tensors matching `model.inputs` (flattened).
        inline: when True, nested models are not called as one layer but replayed layer by layer,
            so every leaf layer gets its own output tensor in the new graph.
        record: when given, collects the output tensors of every layer called.

    Returns:
        The output structure of the model, computed on `inputs`.
    """
    if isinstance(model, keras.Sequential):
        x = inputs[0] if len(inputs) == 1 else list(inputs)
        for layer in model.layers:
            x = _call(layer, (x,), {}, inline=inline, record=record)
        return x
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None:
        # A subclassed model: it is one opaque callable.
        out = model(inputs[0] if len(inputs) == 1 else list(inputs))
        return out
    tensor_dict: dict[int, Any] = {}
    for ref, new in zip(model.inputs, inputs, strict=True):
        tensor_dict[id(ref)] = new
    for depth in sorted(nodes_by_depth.keys(), reverse=True):
        for node in nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(t) not in tensor_dict for t in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(tensor_dict)
            outputs = _call(node.operation, args, kwargs, inline=inline, record=record)
            for ref, new in zip(node.outputs, _as_list(outputs), strict=False):
                tensor_dict[id(ref)] = new
    flat = [tensor_dict[id(t)] for t in model.outputs]
    return keras.tree.pack_sequence_as(model._outputs_struct, flat)


def _call(
    op: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    inline: bool,
    record: Recorded | None,
) -> Any:
    if inline and is_container(op) and hasattr(op, "layers"):
        sub_inputs = _as_list(args[0]) if args else _as_list(next(iter(kwargs.values())))
        out = replay(op, sub_inputs, inline=True, record=record)
    else:
        out = op(*args, **kwargs)
    if record is not None:
        record.setdefault(id(op), []).append(out)
    return out
