"""matplotlib figures without `pyplot`: one way to make them, show them and save them.

matplotlib is the optional `plot` extra. Figures are built with `matplotlib.figure.Figure`
directly, not through `pyplot`: no global figure registry to leak into, no GUI backend needed
(PNG rendering uses Agg whatever backend is configured), and a notebook shows the returned
figure once, as the cell's value. Every plot of transferkit (learning curves, the layer strip,
the LR finder's sweep) goes through `new_figure` and `save_figure`.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

from transferkit.errors import MissingExtraError, SaveError

__all__ = ["new_figure", "save_figure"]


@functools.cache
def _displayable(figure_class: type) -> Any:
    class TransferkitFigure(figure_class):  # type: ignore[misc]
        """A Figure that a notebook shows as the value of a cell.

        A Figure made without `pyplot` has no display hook until the inline backend is set up
        (which importing `pyplot` does); `_repr_png_` lets IPython show it either way, once.
        """

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            return buffer.getvalue()

    return TransferkitFigure


def new_figure(**kwargs: Any) -> Any:
    """A `matplotlib.figure.Figure` (shown by notebooks as a cell's value).

    Args:
        **kwargs: `Figure` arguments (`figsize`, `layout`, ...).

    Raises:
        MissingExtraError: matplotlib is not installed; the message names the extra.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(
            'plotting needs matplotlib: pip install "transferkit[plot]"'
        ) from exc
    return _displayable(Figure)(**kwargs)


def save_figure(fig: Any, path: str | os.PathLike[str] | None) -> None:
    """Saves `fig` to `path` (PNG unless the suffix names another format); nothing for None.

    Raises:
        SaveError: the directory does not exist or the file cannot be written.
    """
    if path is None:
        return
    target = Path(os.fspath(path))
    if not target.parent.is_dir():  # "x.png" has the parent ".", which exists
        raise SaveError(
            f"cannot save the plot to {str(target)!r}: directory {str(target.parent)!r} "
            "does not exist."
        )
    # PNG unless the suffix names another format matplotlib knows (.svg, .pdf, ...).
    fmt = None if target.suffix else "png"
    try:
        fig.savefig(target, format=fmt, dpi=100, bbox_inches="tight")
    except OSError as exc:
        raise SaveError(f"cannot save the plot to {str(target)!r}: {exc}") from exc
