"""Pictures of a fine-tune: learning curves and the frozen/trainable/new layer strip.

matplotlib is the optional `plot` extra; figures are made and saved by `_utils.figures`
(without `pyplot`: a notebook shows the returned figure once, as the cell's value).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transferkit._utils.figures import new_figure, save_figure
from transferkit.results.summary import LayerRow

__all__ = ["STATE_COLORS", "leaf_rows", "metric_names", "plot_history", "plot_layers"]

# Colour-blind safe (Okabe-Ito) colours per trainable state of a layer.
STATE_COLORS: dict[str, str] = {
    "no": "#999999",
    "partly": "#E69F00",
    "yes": "#0072B2",
    "new": "#009E73",
}
_STATE_LABELS = {"no": "frozen", "partly": "partly trainable", "yes": "trainable", "new": "new"}
_TRAIN_COLOR = "#0072B2"
_VAL_COLOR = "#D55E00"


def metric_names(history: Mapping[str, Sequence[float]]) -> list[str]:
    """The quantities to plot, loss first: every key that has a training or `val_` series.

    Optimizer bookkeeping (`learning_rate*`) is left out: it is not a learning curve.
    """
    names: list[str] = []
    for key in history:
        base = key[4:] if key.startswith("val_") else key
        if base.startswith(("learning_rate", "lr")) or base in names:
            continue
        names.append(base)
    return sorted(names, key=lambda n: (n != "loss", names.index(n)))


def plot_history(
    history: Mapping[str, Sequence[float]],
    *,
    phases: Sequence[tuple[str, int]] = (),
    best_epoch: int = 0,
    monitor: str = "",
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Draws loss and each metric, training and validation, one panel per quantity.

    Args:
        history: `{name: values per epoch}`, as Keras' `History.history`.
        phases: `(name, epochs)` per phase; with more than one, dashed lines mark where a
            phase ends and the next begins, and each phase's name is written at the top.
        best_epoch: 1-based epoch to mark on the `monitor` panel (0: none).
        monitor: the monitored key (`"val_loss"` or `"loss"`).
        path: when given, the figure is also saved there (PNG unless the suffix says otherwise).

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        MissingExtraError: matplotlib is not installed.
        SaveError: `path` cannot be written.
    """
    names = metric_names(history) or ["loss"]
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = new_figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    boundaries: list[tuple[float, str]] = []
    start = 0
    for name, epochs in phases:
        boundaries.append((start + 0.5, name))
        start += epochs
    for ax, name in zip(axes, names, strict=False):
        for key, label, color, style in (
            (name, "train", _TRAIN_COLOR, "-"),
            (f"val_{name}", "validation", _VAL_COLOR, "--"),
        ):
            values = list(history.get(key, []))
            if values:
                epochs_axis = range(1, len(values) + 1)
                ax.plot(epochs_axis, values, style, color=color, marker="o", ms=3, label=label)
        if best_epoch and monitor in (name, f"val_{name}") and history.get(monitor):
            ax.axvline(best_epoch, color="#555555", lw=0.8, ls=":", label=f"best ({best_epoch})")
        if len(phases) > 1:
            for i, (x, phase) in enumerate(boundaries):
                if i:
                    ax.axvline(x, color="#333333", lw=1.0, ls="--", alpha=0.6)
                ax.annotate(
                    phase,
                    (x, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -3),
                    textcoords="offset points",
                    va="top",
                    fontsize=8,
                    color="#333333",
                )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    save_figure(fig, path)
    return fig


def leaf_rows(rows: Sequence[LayerRow]) -> list[LayerRow]:
    """The rows that are not containers of other rows (nested models are drawn by their layers,
    so no parameter is counted twice)."""
    out: list[LayerRow] = []
    for i, row in enumerate(rows):
        is_container = i + 1 < len(rows) and rows[i + 1].depth > row.depth
        if not is_container:
            out.append(row)
    return out


def _short(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def plot_layers(
    rows: Sequence[LayerRow],
    *,
    title: str = "",
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Draws the layers as a strip coloured frozen / partly trainable / trainable / new, with
    a bar of each layer's parameter count (log scale) above it.

    Args:
        rows: `summary.layer_rows(model, new_layers=...)`.
        title: the figure title (the model name).
        path: when given, the figure is also saved there (PNG unless the suffix says otherwise).

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        MissingExtraError: matplotlib is not installed.
        SaveError: `path` cannot be written.
    """
    leaves = leaf_rows(rows)
    n = len(leaves)
    width = min(max(6.0, 0.42 * n + 1.5), 40.0)
    fig = new_figure(figsize=(width, 4.2), layout="constrained")
    bars, strip = fig.subplots(2, 1, sharex=True, height_ratios=(5, 1))
    xs = list(range(n))
    colors = [STATE_COLORS.get(r.trainable, "#CC79A7") for r in leaves]
    # A layer without parameters still gets its cell in the strip; its bar stays empty.
    heights = [max(r.params, 0) for r in leaves]
    bars.bar(xs, [h if h > 0 else math.nan for h in heights], color=colors, width=0.8)
    if any(h > 0 for h in heights):
        bars.set_yscale("log")
    bars.set_ylabel("parameters")
    label_every = max(1, math.ceil(n / 60))
    if n <= 60:
        for x, h in zip(xs, heights, strict=True):
            if h > 0:
                bars.annotate(
                    _short(h),
                    (x, h),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    bars.grid(axis="y", alpha=0.3)
    strip.bar(xs, [1] * n, color=colors, width=1.0, edgecolor="white", linewidth=0.5)
    strip.set_yticks([])
    strip.set_ylim(0, 1)
    strip.set_xticks(xs[::label_every])
    strip.set_xticklabels(
        ["  " * r.depth + r.name for r in leaves][::label_every],
        rotation=60,
        ha="right",
        fontsize=8,
    )
    strip.set_xlim(-0.6, n - 0.4)
    totals: dict[str, int] = {}
    for r in leaves:
        totals[r.trainable] = totals.get(r.trainable, 0) + r.params
    from matplotlib.patches import Patch

    handles = [
        Patch(color=STATE_COLORS[s], label=f"{_STATE_LABELS[s]}: {totals[s]:,}")
        for s in ("no", "partly", "yes", "new")
        if s in totals
    ]
    bars.legend(handles=handles, fontsize=8, loc="upper left", title="parameters")
    if title:
        bars.set_title(title)
    save_figure(fig, path)
    return fig
