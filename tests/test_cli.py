"""The `transferkit` command line, run for real in subprocesses (and in-process for the many
argument errors, which would otherwise cost a TensorFlow start each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import Digits, Pretrained

from transferkit.cli import main, parse_head, parse_layer_ref

SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args: str, exe: list[str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the command in a fresh process with this checkout's sources first on the path."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    environ["PYTHONPATH"] = os.pathsep.join([str(SRC), environ.get("PYTHONPATH", "")])
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environ.update(env)
    command = (exe or [sys.executable, "-m", "transferkit"]) + list(args)
    return subprocess.run(
        command, capture_output=True, text=True, env=environ, timeout=240, check=False
    )


def error_lines(stderr: str) -> list[str]:
    """The lines transferkit wrote (TensorFlow's start-up log lines are not ours)."""
    return [line for line in stderr.splitlines() if line.startswith("transferkit")]


@pytest.fixture
def npz(tmp_path: Path, digits: Digits) -> tuple[Path, Path]:
    train, val = tmp_path / "train.npz", tmp_path / "val.npz"
    np.savez(train, x=digits.x_new[:150], y=digits.y_new[:150])
    np.savez(val, x=digits.x_new[150:250], y=digits.y_new[150:250])
    return train, val


def test_fit_end_to_end_in_a_subprocess(
    pretrained: Pretrained, npz: tuple[Path, Path], tmp_path: Path
) -> None:
    train, val = npz
    out = tmp_path / "tuned.keras"
    proc = run(
        "fit", str(pretrained.h5), "--data", str(train), "--val", str(val),
        "--freeze-until", "fc1", "--head", "classify:5", "--lr", "0.01",
        "--epochs", "2", "--batch-size", "16", "--cache", "off", "--out", str(out),
        TF_CPP_MIN_LOG_LEVEL="0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The CLI turned oneDNN off before TensorFlow started (TensorFlow announces it when on).
    assert "oneDNN custom operations are on" not in proc.stderr
    assert "Epoch 2/2" in proc.stdout and "head_output" in proc.stdout
    assert "best val_loss" in proc.stdout
    assert proc.stdout.splitlines()[-1].split() == ["saved", str(out)]
    tuned = keras.models.load_model(out)
    assert tuned.output_shape == (None, 5)
    frozen = tuned.get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(frozen, pretrained.model.get_layer("conv1").get_weights()[0])
    trained = tuned.get_layer("fc1").get_weights()[0]
    assert not np.allclose(trained, pretrained.model.get_layer("fc1").get_weights()[0])


def test_inspect_in_a_subprocess(nested_model: Pretrained) -> None:
    proc = run("inspect", str(nested_model.h5))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("base", "  base_conv1", "top_out", "Parameters:"):
        assert name in proc.stdout
    assert "Output activation: softmax" in proc.stdout
    assert "Inferred loss: SparseCategoricalCrossentropy(from_logits=False)" in proc.stdout


def test_console_script_reports_bad_input_in_one_line_with_exit_code_2(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    script = Path(sys.executable).with_name("transferkit")
    assert script.is_file(), "install the package (pip install -e .) to get the console script"
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 1)), labels=np.zeros(2))
    proc = run(
        "fit", str(pretrained.h5), "--data", str(bad), "--out", str(tmp_path / "o.keras"),
        exe=[str(script)],
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("transferkit fit: error:")
    assert "'x' and 'y'" in lines[0] and "['images', 'labels']" in lines[0]
    assert not (tmp_path / "o.keras").exists()


@pytest.mark.parametrize("command", ["inspect", "fit", "demo", None])
def test_help_of_each_command(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as stop:
        code = main(args)  # `demo --help` returns instead of exiting (it adds the demo's own)
        raise SystemExit(code)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: transferkit")
    if command == "fit":
        for option in ("--data", "--val", "--freeze-until", "--head", "--lr", "--epochs"):
            assert option in out
        assert "--batch-size" in out and "--cache" in out and "--out" in out


def test_demo_command_hands_its_arguments_to_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo itself runs in tests/test_demo.py; here the CLI must pass everything after
    # `demo` through unchanged and return the demo's exit status.
    from transferkit import demo

    seen: list[list[str]] = []

    def fake_main(argv: list[str] | None = None) -> int:
        seen.append(list(argv or []))
        return 3

    monkeypatch.setattr(demo, "main", fake_main)
    assert main(["demo", "--quick", "--shots", "2"]) == 3
    assert seen == [["--quick", "--shots", "2"]]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["fit", "{model}", "--data", "{train}"], "required: --out"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--head", "classify"],
         "invalid head 'classify'"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--epochs", "0"],
         "expected a positive integer"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--lr", "-1"],
         "expected a positive number"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--cache", "maybe"],
         "invalid choice: 'maybe'"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.txt"], "must end in .keras or .h5"),
        (["fit", "{model}", "--data", "{train}", "--out", "nodir/o.keras"], "does not exist"),
        (["fit", "{model}", "--data", "missing.npz", "--out", "o.keras"], "no such file"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--freeze-until", "nope"],
         "no layer named 'nope'"),
        (["fit", "{model}", "--data", "{train}", "--out", "o.keras", "--head", "classify:3"],
         "class labels must lie in 0..2"),
        (["inspect", "missing.h5"], "MODEL 'missing.h5': no such file"),
        (["inspect", "{model}", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
def test_bad_arguments_give_one_line_and_exit_code_2(
    args: list[str],
    fragment: str,
    pretrained: Pretrained,
    npz: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    filled = [a.format(model=pretrained.h5, train=npz[0]) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("transferkit"), err
    assert fragment in err
    assert not (tmp_path / "o.keras").exists()


def test_parsers() -> None:
    assert parse_head("classify:10") == {"num_classes": 10}
    assert parse_head("regression") == {"regression": True}
    assert parse_head("regression:3") == {"regression": True, "outputs": 3}
    assert parse_layer_ref("-5") == -5 and parse_layer_ref("3") == 3
    assert parse_layer_ref("block5_conv1") == "block5_conv1"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from transferkit import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"transferkit {__version__}"


def test_backend_flag_selects_the_keras_backend(
    pretrained: Pretrained, npz: tuple[Path, Path], tmp_path: Path
) -> None:
    # The flag wins over the environment: it is set before Keras is imported. Each pass of the
    # suite asks for the backend it does not run on, so both directions are tested.
    other = keras.backend.backend()
    backend = "jax" if other == "tensorflow" else "tensorflow"
    train, _ = npz
    out = tmp_path / "tuned.keras"
    proc = run(
        "--backend", backend, "fit", str(pretrained.keras_path), "--data", str(train),
        "--freeze-until", "fc1", "--head", "classify:5", "--epochs", "2", "--cache", "on",
        "--out", str(out), KERAS_BACKEND=other,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(Path(f"{out}.transferkit.json").read_text())
    assert record["versions"]["keras_backend"] == backend
    assert keras.models.load_model(out).output_shape == (None, 5)


def test_backend_flag_refuses_a_backend_keras_is_not_running(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In this process Keras is imported already: asking for another backend cannot work.
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    assert main(["--backend", other, "--version"]) == 2
    line = capsys.readouterr().err.strip()
    assert "already imported" in line and f"KERAS_BACKEND={other}" in line
