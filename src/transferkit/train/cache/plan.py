"""The split: a model cut into a prefix computed once and a suffix that trains on its outputs.

`cut_frontier` is the pure decision (which tensors separate the cacheable part of a graph from
the rest: one or several, since a cut after a residual `Add` is one tensor and two frozen
branches feeding trainable layers are two); `plan_cache` applies it to a model, replaying nested
models layer by layer so that the cut can fall inside a nested base, and builds both models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from transferkit.model.graph import derived_model, fresh_inputs, replay
from transferkit.train.cache.errors import CannotCache
from transferkit.train.cache.layers import is_augmentation, layer_blocker, sublayers

__all__ = ["CachePlan", "cut_frontier", "plan_cache"]


@dataclass
class CachePlan:
    """A model split into a cacheable prefix and the suffix that trains.

    Attributes:
        prefix: raw inputs -> the cut tensors (a list of one or more outputs).
        suffix: one input per cut tensor -> the full model's outputs, sharing its layers.
        cut_layer: name of the layer producing the last cut tensor.
        prefix_layers: names of the layers computed once.
        augmentation: names of the prefix layers that are random augmentation (planned with
            `augment=True`); their outputs differ between passes.
    """

    prefix: keras.Model
    suffix: keras.Model
    cut_layer: str
    prefix_layers: list[str]
    augmentation: list[str] = field(default_factory=list)


def cut_frontier(
    nodes: Sequence[tuple[Sequence[int], Sequence[int], bool]],
    inputs: Sequence[int],
    outputs: Sequence[int],
) -> tuple[list[int], set[int]]:
    """The tensors at which a graph is cut between its cacheable prefix and the rest.

    Args:
        nodes: the graph's calls in topological order, as (input tensor ids, output tensor ids,
            whether the operation itself is cacheable).
        inputs: ids of the graph's input tensors.
        outputs: ids of the graph's output tensors.

    Returns:
        `(frontier, cached)`: the ids of the cacheable tensors that a non-cacheable call (or the
        graph's output) consumes, in order of first use; and the ids of every cacheable tensor.
        A call is cacheable when its operation is and all its inputs are.

    Example:

    >>> cut_frontier([((0,), (1,), True), ((1,), (2,), False)], [0], [2])
    ([1], {0, 1})
    """
    cached = set(inputs)
    for ins, outs, ok in nodes:
        if ok and all(t in cached for t in ins):
            cached.update(outs)
    frontier: list[int] = []
    for ins, outs, _ok in nodes:
        if all(t in cached for t in outs):
            continue
        for t in ins:
            if t in cached and t not in frontier:
                frontier.append(t)
    for t in outputs:
        if t in cached and t not in frontier:
            frontier.append(t)
    return frontier, cached


def _nodes_in_order(model: keras.Model) -> list[Any]:
    # Private API (checked on Keras 3.15.1), as in graph.replay: a Functional model's calls by
    # depth; the deepest (closest to the inputs) come first.
    nodes_by_depth = model._nodes_by_depth
    ordered = []
    for depth in sorted(nodes_by_depth.keys(), reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                ordered.append(node)
    return ordered


def _producer_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    op = history[0] if history else None
    return str(getattr(op, "name", "input"))


def plan_cache(model: keras.Model, augment: bool = False) -> CachePlan:
    """Splits `model` at the end of its longest deterministic frozen prefix.

    Nested models are replayed layer by layer, so the cut can fall inside a nested base.

    Args:
        model: the model to split.
        augment: random augmentation layers may be part of the prefix (augmentation views).

    Returns:
        A `CachePlan`.

    Raises:
        CannotCache: nothing worthwhile can be cached; its reason says why.
    """
    try:
        flat_inputs = fresh_inputs(model)
        flat_outputs = replay(model, flat_inputs, inline=True)
        flat = derived_model(model, flat_inputs, flat_outputs, f"{model.name}_flat")
    except Exception as exc:  # Keras raises several types for graphs it cannot rebuild.
        raise CannotCache(f"its graph cannot be replayed layer by layer ({exc})") from None
    nodes = _nodes_in_order(flat)
    blockers = {id(n): layer_blocker(n.operation, augment) for n in nodes}
    described = [
        (
            [id(t) for t in n.input_tensors],
            [id(t) for t in keras.tree.flatten(n.outputs)],
            blockers[id(n)] is None,
        )
        for n in nodes
    ]
    out_ids = [id(t) for t in flat.outputs]
    frontier_ids, cached = cut_frontier(described, [id(t) for t in flat.inputs], out_ids)
    prefix_nodes = [n for n in nodes if all(id(t) in cached for t in keras.tree.flatten(n.outputs))]
    if not any(getattr(n.operation, "weights", None) for n in prefix_nodes):
        first = next((n for n in nodes if blockers[id(n)]), None)
        why = f": layer {first.operation.name!r} {blockers[id(first)]}" if first else ""
        raise CannotCache(
            f"no frozen layer with weights comes before the first trainable or random one{why}"
        )
    if any(t in cached for t in out_ids):
        raise CannotCache("an output of the model is computed by frozen layers only")
    tensors = {id(t): t for n in nodes for t in keras.tree.flatten(n.outputs)}
    tensors.update({id(t): t for t in flat.inputs})
    frontier = [tensors[t] for t in frontier_ids]
    # Axes that are None in the graph (a sequence length) get the sizes the data has when the
    # features are stored (`store.Store`); the suffix keeps the graph's None.
    try:
        # The user's batches (a dict keyed like the model's inputs, too) go to the prefix as is.
        prefix = derived_model(model, flat.inputs, frontier, f"{model.name}_prefix")
        mapping: dict[int, Any] = {}
        new_inputs = []
        for i, t in enumerate(frontier):
            new = keras.Input(
                batch_shape=tuple(t.shape), dtype=t.dtype, name=f"cached_features_{i}"
            )
            mapping[id(t)] = new
            new_inputs.append(new)
        for node in nodes:
            if all(id(t) in cached for t in keras.tree.flatten(node.outputs)):
                continue
            args, kwargs = node.arguments.fill_in(mapping)
            out = node.operation(*args, **kwargs)
            for ref, value in zip(
                keras.tree.flatten(node.outputs), keras.tree.flatten(out), strict=True
            ):
                mapping[id(ref)] = value
        outs = [mapping[id(t)] for t in flat.outputs]
        suffix = keras.Model(
            new_inputs, outs[0] if len(outs) == 1 else outs, name=f"{model.name}_head"
        )
    except Exception as exc:  # Name clashes after inlining, unusual layers, ...
        raise CannotCache(f"the graph cannot be split at the cut ({exc})") from None
    # Same variables train either way: a trainable leaf inside a frozen nested model does not
    # train in plain fit but would in the flat suffix.
    if {id(v) for v in suffix.trainable_variables} != {id(v) for v in model.trainable_variables}:
        raise CannotCache("its trainable variables differ once nested models are flattened")
    suffix.output_names = list(model.output_names)
    last = max((i for i, n in enumerate(nodes) if n in prefix_nodes), default=-1)
    cut_tensor = frontier[-1]
    cut_layer = _producer_name(cut_tensor)
    if last >= 0 and any(id(t) == id(cut_tensor) for t in keras.tree.flatten(nodes[last].outputs)):
        cut_layer = nodes[last].operation.name
    augmenting = [
        n.operation.name
        for n in prefix_nodes
        if isinstance(n.operation, keras.layers.Layer)
        and any(is_augmentation(sub) for sub in sublayers(n.operation))
    ]
    names = [n.operation.name for n in prefix_nodes]
    return CachePlan(prefix, suffix, cut_layer, names, augmenting)
