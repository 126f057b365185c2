"""The demo, on a tiny budget: its functions, its table and its command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transferkit import demo


def test_few_shot_split() -> None:
    data = demo.load_data(demo.DemoConfig(shots=3, seed=5))
    assert data.x_train.shape == (15, 8, 8, 1)
    assert np.bincount(data.y_train).tolist() == [3, 3, 3, 3, 3]
    assert set(np.unique(data.y_old)) == {0, 1, 2, 3, 4}
    assert len(data.y_train) + len(data.y_test) == 1797 - len(data.y_old)
    assert data.value_test.min() == 5 and data.value_test.max() == 9
    # Train and test images are disjoint.
    train = {x.tobytes() for x in data.x_train}
    assert not any(x.tobytes() in train for x in data.x_test[:200])


def test_main_quick_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| arm | metric | value | trainable params | seconds |")
    body = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    assert [r[0] for r in body] == [
        "from scratch",
        "fine-tune all layers",
        "fine-tune last layers",
        "two-phase fine_tune",
        "LoRA r=4 + new head",
        "classifier -> regressor",
        "regressor from scratch",
    ]
    for _name, metric, value, params, seconds in body:
        assert int(params.replace(",", "")) > 0
        assert float(seconds) > 0
        if metric == "accuracy":
            assert 0 <= float(value.rstrip(" %")) <= 100
        else:
            assert metric == "MAE" and float(value) >= 0
    # Fewer parameters train when the convolutions are frozen.
    params = {r[0]: int(r[3].replace(",", "")) for r in body}
    assert params["fine-tune last layers"] < params["fine-tune all layers"]
    # LoRA trains the head and the adapters on the frozen convolutions, not the kernels.
    assert params["fine-tune last layers"] < params["LoRA r=4 + new head"]
    assert params["LoRA r=4 + new head"] < params["fine-tune all layers"]
    assert "Total:" in out


def test_arms_can_be_added(tmp_path: Path) -> None:
    def constant(ctx: demo.DemoContext) -> demo.Row:
        assert ctx.pretrained.suffix == ".h5" and ctx.pretrained.is_file()
        return demo.Row("majority class", "accuracy", float(np.mean(ctx.data.y_test == 0)), 0, 0.0)

    config = demo.DemoConfig(shots=2, pretrain_epochs=1, epochs=1)
    rows = demo.run_demo(config, arms=[demo.Arm("const", constant)], workdir=tmp_path)
    assert [r.arm for r in rows] == ["majority class"]
    assert (tmp_path / "digits_0_4.h5").is_file()
    table = demo.format_table(rows)
    assert table.splitlines()[2].startswith("| majority class | accuracy | ")
