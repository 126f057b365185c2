"""Cutting a network and putting a new head on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import keras

from transferkit.errors import ConfigError
from transferkit.model.graph import Recorded, derived_model, fresh_inputs, replay
from transferkit.model.layers import LayerRef, all_layers, resolve, top_layers

__all__ = ["HeadSpec", "build_head", "default_cut"]

Pool = Literal["flatten", "avg", "max"]
_POOLS = ("flatten", "avg", "max")
_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.Softmax, keras.layers.ReLU)


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


def default_cut(model: keras.Model) -> keras.layers.Layer:
    """The layer a default head replaces from: all but the output layer (and a trailing
    softmax/activation layer with it).

    Raises:
        ConfigError: the model has several outputs, or too few layers to cut.
    """
    if len(model.outputs) != 1:
        raise ConfigError(
            f"model {model.name!r} has {len(model.outputs)} outputs: pass at= to say where the "
            "new head goes."
        )
    layers = top_layers(model)
    drop = 2 if layers and isinstance(layers[-1], _ACTIVATION_LAYERS) else 1
    if len(layers) <= drop:
        raise ConfigError(
            f"model {model.name!r} has {len(layers)} layer(s): nothing would remain below a new "
            "head. Pass at= explicitly."
        )
    return layers[-drop - 1]


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
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1:
        raise ConfigError(f"outputs must be an int >= 1, got {outputs!r}.")
    if isinstance(hidden, (int, str)):
        raise ConfigError(
            f"hidden must be a sequence of layer sizes such as (64,), got {hidden!r}."
        )
    for size in hidden:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"hidden layer sizes must be ints >= 1, got {tuple(hidden)!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a float in [0, 1), got {dropout!r}.")
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


def cut_tensor(model: keras.Model, layer: keras.layers.Layer) -> tuple[list[Any], Any]:
    """Fresh inputs for `model` and the tensor `layer` produces from them.

    A layer inside a nested model is reached by replaying the nested models layer by layer.

    Raises:
        ConfigError: the layer is called more than once (shared) or has several outputs.
    """
    nested = all(layer is not top for top in top_layers(model))
    inputs = fresh_inputs(model)
    record: Recorded = {}
    replay(model, inputs, inline=nested, record=record)
    produced = record.get(id(layer), [])
    if len(produced) != 1:
        raise ConfigError(
            f"layer {layer.name!r} is called {len(produced)} times in the model (a shared layer): "
            "cut at a layer that is called once."
        )
    out = produced[0]
    if isinstance(out, (list, tuple, dict)):
        raise ConfigError(
            f"layer {layer.name!r} has several outputs: cut at a single-output layer."
        )
    return inputs, out


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
    cut = default_cut(model) if at is None else resolve(model, at)
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
