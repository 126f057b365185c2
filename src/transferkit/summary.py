"""A per-layer table of a working model: what is frozen, trainable or new."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import keras
import numpy as np

from transferkit.graph import is_container
from transferkit.layers import top_layers

__all__ = ["LayerRow", "count_params", "layer_rows", "render_summary"]


def _size(variables: list[keras.Variable]) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


def count_params(model: keras.layers.Layer) -> tuple[int, int]:
    """(trainable, non-trainable) parameter counts, as Keras' `model.summary()` counts them."""
    trainable = _size(model.trainable_weights)
    return trainable, _size(model.weights) - trainable


@dataclass(frozen=True)
class LayerRow:
    """One row of the summary table."""

    name: str
    cls: str
    output_shape: str
    params: int
    trainable: str  # "yes", "no", "partly" or "new"
    depth: int
    lora_rank: int | None = None


def _shape(layer: keras.layers.Layer) -> str:
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return "?"
    shapes = [tuple(t.shape) for t in keras.tree.flatten(out)]
    text = ", ".join(
        "(" + ", ".join("None" if d is None else str(d) for d in s) + ")" for s in shapes
    )
    return text


def _state(layer: keras.layers.Layer, new: Collection[str]) -> str:
    if layer.name in new:
        return "new"
    if not layer.weights:
        return "yes" if layer.trainable else "no"
    trainable = _size(layer.trainable_weights)
    if trainable == 0:
        return "no"
    if trainable == _size(layer.weights):
        return "yes"
    return "partly"


def layer_rows(
    model: keras.Model, *, new_layers: Collection[str] = (), expand: bool = True
) -> list[LayerRow]:
    """Rows for the top-level layers, and the layers of nested models below them when `expand`."""
    rows: list[LayerRow] = []

    def visit(container: keras.layers.Layer, depth: int) -> None:
        for layer in top_layers(container):
            rank = (
                getattr(layer, "lora_rank", None) if getattr(layer, "lora_enabled", False) else None
            )
            rows.append(
                LayerRow(
                    name=layer.name,
                    cls=type(layer).__name__,
                    output_shape=_shape(layer),
                    params=_size(layer.weights),
                    trainable=_state(layer, new_layers),
                    depth=depth,
                    lora_rank=int(rank) if rank else None,
                )
            )
            if expand and is_container(layer):
                visit(layer, depth + 1)

    visit(model, 0)
    return rows


def render_summary(model: keras.Model, *, new_layers: Collection[str] = ()) -> str:
    """A plain-text table: one row per layer and the parameter totals."""
    rows = layer_rows(model, new_layers=new_layers)
    headers = ("#", "layer", "class", "output shape", "params", "trainable")
    table = [
        (
            str(i) if row.depth == 0 else "",
            "  " * row.depth + row.name,
            row.cls + (f" (LoRA r={row.lora_rank})" if row.lora_rank else ""),
            row.output_shape,
            f"{row.params:,}",
            row.trainable,
        )
        for i, row in enumerate(rows)
    ]
    # Index only top-level rows, counting as integer layer references count.
    top_i = 0
    indexed = []
    for row, cells in zip(rows, table, strict=True):
        if row.depth == 0:
            cells = (str(top_i), *cells[1:])
            top_i += 1
        indexed.append(cells)
    widths = [
        max(len(h), *(len(r[c]) for r in indexed)) if indexed else len(h)
        for c, h in enumerate(headers)
    ]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if c in (0, 4) else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "-" * len(line(headers))
    trainable, frozen = count_params(model)
    total = trainable + frozen
    share = 100.0 * trainable / total if total else 0.0
    # One decimal, like PEFT's print_trainable_parameters; LoRA shares below 0.1% keep two digits.
    shown = f"{share:.1f}" if share >= 0.1 or share == 0 else f"{share:.2g}"
    out = [f'Model "{model.name}"', sep, line(headers), sep, *(line(r) for r in indexed), sep]
    out.append(f"Parameters: {trainable:,} of {total:,} trainable ({shown}%)")
    out.append(f"Non-trainable params: {frozen:,}")
    return "\n".join(out)
