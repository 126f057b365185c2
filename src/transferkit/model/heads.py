"""Cutting a network and putting a new head on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import keras

from transferkit._utils.checks import check_fraction, check_int, is_int
from transferkit.errors import ConfigError, LayerNotFoundError
from transferkit.model.graph import (
    Recorded,
    derived_model,
    fresh_inputs,
    is_container,
    output_names,
    producer,
    replay,
)
from transferkit.model.layers import LayerRef, all_layers, resolve, top_layers

__all__ = [
    "CutPoint",
    "HeadSpec",
    "build_head",
    "classifier_layers",
    "cut_tensor",
    "default_cut",
    "describe_outputs",
]

Pool = Literal["flatten", "avg", "max"]
_POOLS = ("flatten", "avg", "max")


@dataclass(frozen=True)
class HeadSpec:
    """What `replace_head` built: enough to infer the loss and to describe the run.

    Attributes:
        kind: "regression" or "classification".
        units: width of the new output layer (outputs or classes).
        cut_layer: name of the last kept layer.
        hidden: sizes of the hidden Dense layers.
        activation: activation of the hidden layers.
        dropout: dropout rate after each hidden layer.
        pool: how spatial dimensions were reduced.
        layer_names: names of the new layers, in order.
    """

    kind: Literal["regression", "classification"]
    units: int
    cut_layer: str
    hidden: tuple[int, ...]
    activation: str
    dropout: float
    pool: str
    layer_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dictionary."""
        return asdict(self)


@dataclass(frozen=True)
class CutPoint:
    """The tensor a new head is put on.

    Attributes:
        name: the layer (or graph operation) producing the tensor: `HeadSpec.cut_layer`.
        producer: that layer or operation, or None when the tensor is taken from the model's
            outputs (`output` says which).
        index: the tensor's position among the producer's (flattened) outputs.
        output: the index in `model.outputs`, when the head goes on an output of the model.
        inline: the producer sits inside a nested model, which is then replayed layer by layer.
        removed: the old classifier a default cut drops (its layers, output side first); empty
            for a model without a classifier and for an explicit `at=`.
    """

    name: str
    producer: Any = None
    index: int = 0
    output: int | None = None
    inline: bool = False
    removed: tuple[Any, ...] = ()


def _is_backbone(model: Any) -> bool:
    # A keras-hub Backbone is a feature extractor by definition, whatever its last layer is.
    return any(
        cls.__name__ == "Backbone" and cls.__module__.startswith("keras_hub")
        for cls in type(model).__mro__
    )


def _has_weights(op: Any) -> bool:
    return bool(getattr(op, "weights", None))


def _per_sample(shape: Sequence[int | None]) -> int | None:
    size = 1
    for dim in shape[1:]:
        if dim is None:
            return None
        size *= dim
    return size


def _same_size(a: Any, b: Any) -> bool:
    """Whether two tensors hold as many values per sample (an element-wise op or a reshape)."""
    sa, sb = _per_sample(tuple(a.shape)), _per_sample(tuple(b.shape))
    return sa == sb if sa is not None and sb is not None else tuple(a.shape) == tuple(b.shape)


def _is_classifier(op: Any, features: Any) -> bool:
    """Whether `op` maps one feature vector per sample (`features`) to class scores.

    A Dense, or a convolution with a 1x1 kernel, whose input has no spatial extent left (rank 2,
    or every spatial axis of size 1 after a pooling that kept its axes).
    """
    shape = tuple(features.shape)
    if isinstance(op, keras.layers.Dense):
        spatial = shape[1:-1]
    elif isinstance(op, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        if any(k != 1 for k in op.kernel_size):
            return False
        spatial = shape[2:] if op.data_format == "channels_first" else shape[1:-1]
    else:
        return False
    return all(dim == 1 for dim in spatial)


def _climb_out(tensor: Any, frames: list[tuple[Any, Any]]) -> Any:
    """The tensor the caller fed to the innermost nested model, whose input `tensor` is.

    Pops that nested model's frame off `frames`.
    """
    container, node = frames.pop()
    position = next(i for i, t in enumerate(container.inputs) if t is tensor)
    return node.input_tensors[position]


def _find_classifier(model: keras.Model) -> tuple[Any, tuple[Any, ...], bool] | None:
    """Walks back from the single output to the old classifier.

    Returns:
        `(features, removed, nested)`: the tensor the classifier reads, the classifier's layers
        (output side first) and whether `features` lies inside a nested model; None when the
        model has no classifier.
    """
    tensor = model.outputs[0]
    if len(tensor.shape) != 2 or _is_backbone(model):
        return None
    frames: list[tuple[Any, Any]] = []  # the nested models walked into, with their call nodes
    removed: list[Any] = []
    features = None
    while features is None:
        found = producer(tensor)
        if found is None:
            if not frames:
                return None  # only parameter-free steps down to the model's input
            tensor = _climb_out(tensor, frames)
            continue
        op, node, index = found
        if is_container(op):
            if _is_backbone(op):
                return None
            frames.append((op, node))
            tensor = op.outputs[index]
            continue
        inputs = list(node.input_tensors)
        if len(inputs) != 1 or len(keras.tree.flatten(node.outputs)) != 1:
            return None  # a merge (a residual Add), or a layer with several outputs
        if _has_weights(op):
            if not _is_classifier(op, inputs[0]):
                return None
            removed.append(op)
            features = inputs[0]
        elif _same_size(inputs[0], tensor):
            removed.append(op)
            tensor = inputs[0]
        else:
            return None  # a pooling: the output is features, not scores
    while producer(features) is None and frames:
        features = _climb_out(features, frames)
    return features, tuple(removed), bool(frames)


def describe_outputs(model: keras.Model) -> str:
    """`'name' (shape)` for each output of `model`, comma-separated."""
    return ", ".join(
        f"{name!r} {tuple(t.shape)}"
        for name, t in zip(output_names(model), model.outputs, strict=True)
    )


def _single_output(model: keras.Model) -> None:
    if len(model.outputs) != 1:
        raise ConfigError(
            f"model {model.name!r} has {len(model.outputs)} outputs: "
            f"{describe_outputs(model)}. A new head goes on one tensor: pass at= with one of "
            "these output names (or any layer name)."
        )


def default_cut(model: keras.Model) -> CutPoint:
    """Where a default head goes: the old classifier is removed, and nothing else.

    Walking back from the model's output, the trailing parameter-free layers that keep every
    value (activations, softmax, Dropout and noise layers, Flatten, Reshape) are skipped; the
    first layer with weights reached is the old classifier when it is a `Dense` or a 1x1
    convolution (MobileNetV3's `Logits`) reading one feature vector per sample (rank 2, or every
    spatial axis of size 1). The classifier and the layers after it are removed; the head goes
    on the classifier's input. Nested models are walked into.

    A model without a classifier loses nothing and the head goes on its output: an output with
    spatial or sequence axes (a `keras.applications` base with `include_top=False`), pooled
    features (`pooling="avg"`: the walk stops at the pooling), a residual sum or any other merge,
    a last layer with weights that is not a Dense or a 1x1 convolution (BatchNormalization,
    LayerNormalization) and a keras-hub `Backbone`.

    Raises:
        ConfigError: the model has several outputs (the message lists them), or its
            classifier reads the model's input directly so that nothing would remain.

    Example:

    >>> base = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None)
    >>> cut = default_cut(base)
    >>> cut.name, [layer.name for layer in cut.removed]
    ('dropout', ['predictions', 'flatten', 'logits'])
    """
    _single_output(model)
    found = _find_classifier(model)
    if found is None:
        source = producer(model.outputs[0])
        name = str(source[0].name) if source else output_names(model)[0]
        return CutPoint(name=name, output=0)
    features, removed, nested = found
    source = producer(features)
    if source is None:
        raise ConfigError(
            f"the classifier of model {model.name!r} ({removed[-1].name!r}) reads the model's "
            "input: nothing would remain below a new head. Pass at= explicitly."
        )
    op, _node, index = source
    return CutPoint(name=str(op.name), producer=op, index=index, inline=nested, removed=removed)


def classifier_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of the old classifier, input side first: what a default `replace_head`
    removes (empty for a model without a classifier).

    Raises:
        ConfigError: the model has several outputs.
    """
    cut = default_cut(model)
    return [op for op in reversed(cut.removed) if isinstance(op, keras.layers.Layer)]


def _cut_at(model: keras.Model, at: LayerRef) -> CutPoint:
    """The `CutPoint` of an explicit `at=`: a layer reference or an output name."""
    try:
        layer = resolve(model, at)
    except LayerNotFoundError:
        names = output_names(model)
        dict_outputs = isinstance(getattr(model, "_outputs_struct", None), dict)
        if isinstance(at, str) and dict_outputs and at in names:
            index = names.index(at)
            source = producer(model.outputs[index])
            return CutPoint(name=str(source[0].name) if source else at, output=index)
        if len(model.outputs) > 1:
            raise LayerNotFoundError(
                f"no layer or output named {at!r}; the model's outputs are "
                f"{describe_outputs(model)}."
            ) from None
        raise
    nested = all(layer is not top for top in top_layers(model))
    return CutPoint(name=layer.name, producer=layer, inline=nested)


def _validate(
    num_classes: int | None,
    regression: bool,
    outputs: int,
    hidden: Sequence[int],
    activation: str,
    dropout: float,
    pool: str,
) -> tuple[Literal["regression", "classification"], int]:
    if regression and num_classes is not None:
        raise ConfigError(
            "replace_head got both regression=True and num_classes: pass exactly one of them."
        )
    if not regression and num_classes is None:
        raise ConfigError(
            "replace_head needs num_classes=N for a classifier or regression=True for a regressor."
        )
    if num_classes is not None:
        check_int(num_classes, "num_classes", minimum=2)
    check_int(outputs, "outputs", minimum=1)
    if isinstance(hidden, (int, str)):
        raise ConfigError(
            f"hidden must be a sequence of layer sizes such as (64,), got {hidden!r}."
        )
    if not all(is_int(size, minimum=1) for size in hidden):
        raise ConfigError(f"hidden layer sizes must be ints >= 1, got {tuple(hidden)!r}.")
    check_fraction(dropout, "dropout")
    if pool not in _POOLS:
        raise ConfigError(f"pool must be one of {', '.join(_POOLS)}, got {pool!r}.")
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"unknown activation {activation!r}: {exc}") from None
    if regression:
        return "regression", outputs
    assert num_classes is not None
    return "classification", num_classes


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate


def _pool_layer(rank: int, pool: str, name: str) -> keras.layers.Layer:
    if pool == "flatten":
        return keras.layers.Flatten(name=name)
    spatial = rank - 2
    table: dict[str, dict[int, type[keras.layers.Layer]]] = {
        "avg": {
            1: keras.layers.GlobalAveragePooling1D,
            2: keras.layers.GlobalAveragePooling2D,
            3: keras.layers.GlobalAveragePooling3D,
        },
        "max": {
            1: keras.layers.GlobalMaxPooling1D,
            2: keras.layers.GlobalMaxPooling2D,
            3: keras.layers.GlobalMaxPooling3D,
        },
    }
    if spatial not in table[pool]:
        raise ConfigError(f"pool={pool!r} cannot reduce a rank-{rank} output; use pool='flatten'.")
    return table[pool][spatial](name=name)


def _describe_value(value: Any) -> str:
    flat = keras.tree.flatten(value)
    return ", ".join(str(tuple(t.shape)) for t in flat)


def cut_tensor(model: keras.Model, cut: CutPoint) -> tuple[list[Any], Any]:
    """Fresh inputs for `model` and the tensor at `cut` computed from them.

    A layer inside a nested model is reached by replaying the nested models layer by layer.

    Raises:
        ConfigError: the cut layer is not called in the graph, is called more than once (shared),
            or returns several tensors.
    """
    inputs = fresh_inputs(model)
    record: Recorded = {}
    outputs = replay(model, inputs, inline=cut.inline, record=record)
    if cut.producer is None:
        return inputs, keras.tree.flatten(outputs)[cut.output or 0]
    produced = record.get(id(cut.producer), [])
    if not produced:
        raise ConfigError(
            f"layer {cut.name!r} is not used by the model's graph (no output depends on it): "
            "cut at a layer the model calls."
        )
    if len(produced) > 1:
        raise ConfigError(
            f"layer {cut.name!r} is called {len(produced)} times in the model (a shared layer): "
            "cut at a layer that is called once."
        )
    flat = keras.tree.flatten(produced[0])
    if len(flat) == 1 or cut.removed:
        # A default cut found its tensor in the graph, so `index` says which output it is.
        return inputs, flat[cut.index]
    readers = sorted(
        {
            str(node.operation.name)
            for node in getattr(cut.producer, "_outbound_nodes", [])
            if node.operation is not None
        }
    )
    hint = f" (a layer that reads them: {', '.join(repr(r) for r in readers)})" if readers else ""
    raise ConfigError(
        f"layer {cut.name!r} returns {len(flat)} tensors ({_describe_value(produced[0])}), and a "
        f"new head goes on one: cut at a layer that returns one tensor{hint}, or leave at= out "
        "to put the head on the model's output."
    )


def build_head(
    model: keras.Model,
    *,
    num_classes: int | None = None,
    regression: bool = False,
    outputs: int = 1,
    at: LayerRef | None = None,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
    dropout: float = 0.0,
    pool: Pool = "flatten",
) -> tuple[keras.Model, HeadSpec]:
    """A new model: `model` up to and including `at`, then a freshly initialised head.

    Kept layers are the same objects (same weights, same trainable flags). See
    `FineTuner.replace_head` for the arguments.

    Returns:
        The new model and the `HeadSpec` describing its head.

    Raises:
        ConfigError: contradictory or invalid arguments.
        LayerNotFoundError: `at` names no layer.
    """
    kind, units = _validate(num_classes, regression, outputs, hidden, activation, dropout, pool)
    cut = default_cut(model) if at is None else _cut_at(model, at)
    inputs, x = cut_tensor(model, cut)
    taken = {layer.name for layer in all_layers(model)}
    names: list[str] = []
    rank = len(x.shape)
    if rank > 2:
        layer = _pool_layer(rank, pool, _unique(f"head_{pool}", taken))
        names.append(layer.name)
        x = layer(x)
    for i, size in enumerate(hidden, start=1):
        dense = keras.layers.Dense(
            size, activation=activation, name=_unique(f"head_dense_{i}", taken)
        )
        names.append(dense.name)
        x = dense(x)
        if dropout > 0:
            drop = keras.layers.Dropout(float(dropout), name=_unique(f"head_dropout_{i}", taken))
            names.append(drop.name)
            x = drop(x)
    out_layer = keras.layers.Dense(units, name=_unique("head_output", taken), dtype="float32")
    names.append(out_layer.name)
    y = out_layer(x)
    try:
        new_model = derived_model(model, inputs, y, model.name)
    except ValueError as exc:
        raise ConfigError(f"cannot cut model {model.name!r} at {cut.name!r}: {exc}") from exc
    spec = HeadSpec(
        kind=kind,
        units=units,
        cut_layer=cut.name,
        hidden=tuple(int(h) for h in hidden),
        activation=str(activation),
        dropout=float(dropout),
        pool=str(pool),
        layer_names=tuple(names),
    )
    return new_model, spec
