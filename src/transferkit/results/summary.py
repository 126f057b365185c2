"""A per-layer table of a working model: what is frozen, trainable or new."""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass
from html import escape
from typing import Any, TextIO

import keras
import numpy as np

from transferkit.model.graph import is_container
from transferkit.model.layers import is_split, sublayers
from transferkit.recipes.lora.apply import lora_rank

__all__ = [
    "LayerRow",
    "count_params",
    "layer_rows",
    "print_summary",
    "render_html",
    "render_rich",
    "render_summary",
]


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
    """Rows for the top-level layers, and below them when `expand` the layers of nested models
    and of custom layers whose blocks are frozen apart (see `transferkit.model.layers`)."""
    rows: list[LayerRow] = []

    def visit(container: keras.layers.Layer, depth: int) -> None:
        for layer in sublayers(container):
            rank = lora_rank(layer)
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
            if expand and (is_container(layer) or is_split(layer)):
                visit(layer, depth + 1)

    visit(model, 0)
    return rows


_HEADERS = ("#", "layer", "class", "output shape", "params", "trainable")
_STATE_STYLE = {"no": "dim", "partly": "yellow", "yes": "bold blue", "new": "bold green"}


def _cells(rows: list[LayerRow]) -> list[tuple[str, ...]]:
    # Only top-level rows are numbered, as integer layer references count them.
    out: list[tuple[str, ...]] = []
    top_i = 0
    for row in rows:
        index = ""
        if row.depth == 0:
            index = str(top_i)
            top_i += 1
        out.append(
            (
                index,
                "  " * row.depth + row.name,
                row.cls + (f" (LoRA r={row.lora_rank})" if row.lora_rank else ""),
                row.output_shape,
                f"{row.params:,}",
                row.trainable,
            )
        )
    return out


def _totals(model: keras.Model) -> tuple[str, str]:
    trainable, frozen = count_params(model)
    total = trainable + frozen
    share = 100.0 * trainable / total if total else 0.0
    # One decimal, like PEFT's print_trainable_parameters; LoRA shares below 0.1% keep two digits.
    shown = f"{share:.1f}" if share >= 0.1 or share == 0 else f"{share:.2g}"
    return (
        f"Parameters: {trainable:,} of {total:,} trainable ({shown}%)",
        f"Non-trainable params: {frozen:,}",
    )


def render_summary(model: keras.Model, *, new_layers: Collection[str] = ()) -> str:
    """A plain-text table: one row per layer and the parameter totals."""
    cells = _cells(layer_rows(model, new_layers=new_layers))
    widths = [
        max(len(h), *(len(r[c]) for r in cells)) if cells else len(h)
        for c, h in enumerate(_HEADERS)
    ]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if c in (0, 4) else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    sep = "-" * len(line(_HEADERS))
    out = [f'Model "{model.name}"', sep, line(_HEADERS), sep, *(line(r) for r in cells), sep]
    out.extend(_totals(model))
    return "\n".join(out)


def render_rich(model: keras.Model, *, new_layers: Collection[str] = ()) -> Any:
    """The summary as a `rich` renderable (a table with the totals as its caption).

    `rich` is a dependency of Keras, so it is always there.
    """
    from rich import box
    from rich.markup import escape as markup
    from rich.table import Table

    rows = layer_rows(model, new_layers=new_layers)
    table = Table(
        title=f"Model [bold]{markup(model.name)}[/bold]",
        caption="\n".join(_totals(model)),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for c, header in enumerate(_HEADERS):
        table.add_column(header, justify="right" if c in (0, 4) else "left", no_wrap=c == 1)
    for row, cells in zip(rows, _cells(rows), strict=True):
        state = _STATE_STYLE.get(row.trainable, "")
        plain = [markup(cell) for cell in cells]
        table.add_row(*plain[:-1], f"[{state}]{plain[-1]}[/]" if state else plain[-1])
    return table


def render_html(model: keras.Model, *, new_layers: Collection[str] = ()) -> str:
    """The summary as an HTML table (for notebooks), the totals below it."""
    rows = layer_rows(model, new_layers=new_layers)
    colors = {"no": "#888", "partly": "#b8860b", "yes": "#0072B2", "new": "#009E73"}
    head = "".join(f"<th>{escape(h)}</th>" for h in _HEADERS)
    body = []
    for row, cells in zip(rows, _cells(rows), strict=True):
        tds = []
        for c, cell in enumerate(cells):
            align = "right" if c in (0, 4) else "left"
            style = f"text-align:{align}"
            if c == 1:
                style += f";padding-left:{0.5 + 1.2 * row.depth:.1f}em"
                cell = cell.strip()
            if c == 5:
                style += f";color:{colors.get(row.trainable, 'inherit')};font-weight:bold"
            tds.append(f'<td style="{style}">{escape(cell)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    totals = "<br>".join(escape(t) for t in _totals(model))
    return (
        f'<div class="transferkit-summary"><b>Model &quot;{escape(model.name)}&quot;</b>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<p>{totals}</p></div>"
    )


def print_summary(
    model: keras.Model, *, new_layers: Collection[str] = (), file: TextIO | None = None
) -> None:
    """Prints the summary to `file` (stdout): a `rich` table on a terminal, plain text otherwise
    (a pipe, a log file or a notebook), so logs never fill with colour codes."""
    stream = file if file is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from rich.console import Console

        Console(file=stream).print(render_rich(model, new_layers=new_layers))
    else:
        print(render_summary(model, new_layers=new_layers), file=stream)
