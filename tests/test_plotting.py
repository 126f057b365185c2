"""Plots (`FitResult.plot`, `FineTuner.plot_layers`) and the summary renderings."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Digits, Pretrained

from transferkit import FineTuner, FitResult, MissingExtraError
from transferkit.results.plotting import leaf_rows, metric_names
from transferkit.results.summary import layer_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.fixture(scope="module")
def tuned(pretrained: Pretrained, digits: Digits) -> tuple[FineTuner, FitResult]:
    tuner = FineTuner(pretrained.h5).freeze_until("fc1").replace_head(5).compile_sgd(lr=1e-2)
    result = tuner.fit(
        digits.x_new[:200],
        digits.y_new[:200],
        epochs=3,
        batch_size=32,
        validation_data=(digits.x_new[200:300], digits.y_new[200:300]),
        verbose=0,
    )
    return tuner, result


def test_fit_result_plot_draws_one_panel_per_metric_with_train_and_val(
    tuned: tuple[FineTuner, FitResult], tmp_path: Path
) -> None:
    _, result = tuned
    path = tmp_path / "curves.png"
    fig = result.plot(path)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss", "accuracy"]
    for ax in panels:
        labels = [line.get_label() for line in ax.lines]
        assert "train" in labels and "validation" in labels
        train = next(line for line in ax.lines if line.get_label() == "train")
        assert list(train.get_xdata()) == [1, 2, 3]
    loss_line = next(line for line in panels[0].lines if line.get_label() == "validation")
    np.testing.assert_allclose(loss_line.get_ydata(), result.history["val_loss"])
    width, height = png_size(path)
    assert 600 <= width <= 1400 and 250 <= height <= 500
    assert path.stat().st_size > 10_000


def test_plot_without_path_writes_nothing_and_marks_phases(
    tuned: tuple[FineTuner, FitResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, result = tuned
    monkeypatch.chdir(tmp_path)
    single = result.plot()
    assert not list(tmp_path.iterdir())
    assert not any(t.get_text() == "fit" for t in single.axes[0].texts)
    phased = FitResult.from_history(
        result.model,
        {"loss": [3.0, 2.0, 1.5, 1.0, 0.8], "val_loss": [3.1, 2.2, 1.7, 1.2, 1.1]},
        seconds=1.0,
        trainable_params=1,
        non_trainable_params=1,
        phases=[("head", 2), ("full", 3)],
    )
    fig = phased.plot(tmp_path / "phases.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["head", "full"]
    # One dashed boundary between the phases (after epoch 2) and the best-epoch marker.
    xs = sorted(float(line.get_xdata()[0]) for line in ax.lines if line.get_label() != "train")
    assert 2.5 in xs and 5.0 in xs
    assert png_size(tmp_path / "phases.png")[0] > 300


def test_metric_names_puts_loss_first_and_skips_learning_rate() -> None:
    history = {"accuracy": [1.0], "val_accuracy": [1.0], "loss": [1.0], "learning_rate": [0.1]}
    assert metric_names(history) == ["loss", "accuracy"]
    assert metric_names({"val_mae": [1.0], "val_loss": [2.0]}) == ["loss", "mae"]


def test_plot_layers_colours_states_and_saves_a_png(
    tuned: tuple[FineTuner, FitResult], tmp_path: Path
) -> None:
    tuner, _ = tuned
    path = tmp_path / "layers.png"
    fig = tuner.plot_layers(path)
    bars, strip = fig.axes
    # One strip cell per layer: 8 pre-trained layers kept by the cut (conv1..drop) + 2 new.
    assert len(strip.patches) == len(layer_rows(tuner.model)) == 9
    colours = {p.get_facecolor()[:3] for p in strip.patches}
    assert len(colours) == 3  # frozen, trainable, new
    legend = [t.get_text() for t in bars.get_legend().get_texts()]
    assert legend == ["frozen: 1,248", "trainable: 8,752", "new: 1,413"]
    width, height = png_size(path)
    assert 500 <= width <= 1600 and 300 <= height <= 600


def test_plot_layers_expands_nested_models_without_double_counting(
    nested_model: Pretrained,
) -> None:
    tuner = FineTuner(nested_model.keras_path).freeze_until("top_fc")
    rows = layer_rows(tuner.model)
    leaves = leaf_rows(rows)
    assert "base" in [r.name for r in rows] and "base" not in [r.name for r in leaves]
    assert sum(r.params for r in leaves) == tuner.model.count_params()
    fig = tuner.plot_layers()
    assert len(fig.axes[1].patches) == len(leaves)


def test_missing_matplotlib_names_the_extra(
    tuned: tuple[FineTuner, FitResult], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tuner, result = tuned
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingExtraError, match=r'pip install "transferkit\[plot\]"'):
        result.plot(tmp_path / "x.png")
    with pytest.raises(ImportError):  # still an ImportError for existing except clauses
        tuner.plot_layers()
    assert not (tmp_path / "x.png").exists()


def test_summary_renderings(tuned: tuple[FineTuner, FitResult]) -> None:
    tuner, _ = tuned
    plain = tuner.summary()
    assert isinstance(plain, str) and "head_output" in plain and "\x1b[" not in plain
    html = tuner._repr_html_()
    assert html.count("<tr>") == 1 + 9
    assert "<td" in html and "head_output" in html and "Parameters: 10,165 of" in html

    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(tuner)  # __rich__
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "head_output" in text and "new" in text and "Non-trainable params: 1,248" in text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_print_summary_is_plain_off_a_terminal_and_rich_on_one(
    tuned: tuple[FineTuner, FitResult],
) -> None:
    tuner, _ = tuned
    pipe = io.StringIO()
    tuner.print_summary(file=pipe)
    assert pipe.getvalue() == tuner.summary() + "\n"
    tty = _Tty()
    tuner.print_summary(file=tty)
    out = tty.getvalue()
    assert out != pipe.getvalue() and "head_output" in out and "─" in out
