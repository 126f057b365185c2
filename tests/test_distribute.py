"""FineTuner on tf.distribute: 2 logical CPUs, 2 worker processes, and the copy=False refusal.

Device configuration and `TF_CONFIG` are process-wide, so the distributed runs happen in fresh
interpreters running `tests/distribute_worker.py` (the code docs/scaling-out.md shows), bounded by
timeouts, in their own process groups, which are always killed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import keras
import numpy as np
import pytest
import tensorflow as tf

from transferkit import ConfigError, FineTuner
from transferkit.train.distribution import (
    check_strategy,
    foreign_variables,
    in_scope,
    is_chief,
    worker_path,
)

# tf.distribute is TensorFlow's engine; on JAX the engine is keras.distribution.
pytestmark = pytest.mark.tensorflow_only(reason="tf.distribute strategies")

WORKER = Path(__file__).with_name("distribute_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
RUN_TIMEOUT_S = 240.0

# Equal "within float32 rounding": with 2 replicas every step all-reduces two half-batch
# gradients instead of summing the 64 per-sample terms in one pass, so each gradient differs in
# its last bits (float32 unit roundoff is 6e-8). Over the 28 momentum-SGD steps of the run these
# differences stay below 1e-6 (measured: at most 2.4e-7, on weights of magnitude <= 1). The
# tolerance is ~40x that, and 100x smaller than how far every variable moved in training, which
# the tests assert too, so a replica that trained on the wrong data or skipped an update fails.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, pretrained, digits) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """The pre-trained CNN (`.keras`) and the new task's data (`.npz`) for the subprocesses."""
    root = tmp_path_factory.mktemp("distribute")
    data = root / "digits_new.npz"
    np.savez(data, x=digits.x_new, y=digits.y_new)
    return pretrained.keras_path, data


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["CUDA_VISIBLE_DEVICES"] = ""  # The test is about CPU devices, GPU machine or not.
    env.pop("TF_CONFIG", None)
    env.update(extra or {})
    return env


def _run_all(
    commands: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float
) -> list[str]:
    """Runs the commands at once, each in its own session, and returns their outputs.

    Output goes to files (a full pipe would stall a worker while we wait on the other). On a
    timeout, a failed process or any error, every process group still alive is killed.
    """
    procs: list[subprocess.Popen[bytes]] = []
    files = [logs / f"process{i}.log" for i in range(len(commands))]
    try:
        for (args, env), log in zip(commands, files, strict=True):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), *args],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        # A worker that dies leaves the others waiting for it forever: stop at the first failure.
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                texts = "\n".join(f.read_text(errors="replace")[-3000:] for f in files)
                pytest.fail(f"distributed run exceeded {timeout:.0f} s:\n{texts}")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outputs = [f.read_text(errors="replace") for f in files]
    codes = [proc.returncode for proc in procs]
    report = "\n".join(
        f"--- exit code {c}:\n{t[-3000:]}" for c, t in zip(codes, outputs, strict=True)
    )
    assert codes == [0] * len(procs), report
    return outputs


def _free_ports(n: int) -> list[int]:
    # Held open together so the ports differ; released just before the workers bind them.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files)]


def _assert_close_and_trained(
    got: list[np.ndarray], want: list[np.ndarray], start: list[np.ndarray]
) -> None:
    assert [w.shape for w in got] == [w.shape for w in want] == [w.shape for w in start]
    for i, (g, w, s) in enumerate(zip(got, want, start, strict=True)):
        np.testing.assert_allclose(g, w, rtol=0, atol=TOLERANCE, err_msg=f"variable {i}")
        assert np.abs(w - s).max() > 100 * TOLERANCE, f"variable {i} did not train"


def _worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distribute_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mirrored_two_cpus_matches_single_device(task: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = task
    (text,) = _run_all(
        [(["mirrored", str(model), str(data), str(tmp_path)], _env())], tmp_path, RUN_TIMEOUT_S
    )
    # The run really was distributed: 2 replicas, every variable mirrored on both devices.
    assert "replicas=2 variables=MirroredVariable\n" in text, text[-3000:]
    # The feature cache works under the strategy too (features once, head on the replicas).
    assert "cached=True,True layer=flatten" in text, text[-3000:]
    _assert_close_and_trained(
        _load(tmp_path / "mirrored.npz"),
        _load(tmp_path / "single.npz"),
        _load(tmp_path / "start.npz"),
    )


def test_recipes_under_mirrored_strategy(task: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = task
    (text,) = _run_all(
        [(["recipes", str(model), str(data), str(tmp_path)], _env())], tmp_path, RUN_TIMEOUT_S
    )
    for name in ("mirrored", "single"):
        assert f"{name} fine_tune phases=[('head', 1), ('full', 1)]" in text, text[-3000:]
        assert f"{name} checkpoint epochs=2 cached=True" in text, text[-3000:]
        assert f"{name} find_lr swept=True unchanged=True" in text, text[-3000:]
    # Each recipe trains the same under 2 replicas as on one device (float32 all-reduce
    # rounding only, as in the plain fine-tune above). Runs that train every layer for long at a
    # high rate amplify that rounding (measured: 1.7e-3 after 2 epochs at lr 0.05), so these
    # recipes train briefly (fine_tune: 1+1 epochs, the body at lr 0.005) or only the head.
    assert "mirrored adapt_batchnorm moved=True" in text, text[-3000:]
    assert (
        "mirrored gradual_unfreezing unfrozen=[(1, ['flatten', 'pool', 'conv2', 'conv1'])]" in text
    ), text[-3000:]
    for recipe in ("fine_tune", "lora", "checkpoint", "adapt_batchnorm", "gradual_unfreezing"):
        got = _load(tmp_path / f"{recipe}_mirrored.npz")
        want = _load(tmp_path / f"{recipe}_single.npz")
        assert [g.shape for g in got] == [w.shape for w in want], recipe
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=0, atol=TOLERANCE, err_msg=f"{recipe} {i}")


def test_multi_worker_two_processes(task: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = task
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    commands = [
        (
            ["multiworker", str(model), str(data), str(tmp_path)],
            _env(
                {
                    "TF_CONFIG": json.dumps(
                        {"cluster": cluster, "task": {"type": "worker", "index": i}}
                    )
                }
            ),
        )
        for i in range(2)
    ]
    chief_text, other_text = _run_all(commands, tmp_path, RUN_TIMEOUT_S)
    assert "task=0 chief=True replicas=2" in chief_text, chief_text[-3000:]
    assert "task=1 chief=False replicas=2" in other_text, other_text[-3000:]
    assert "cached=True" in chief_text and "cached=True" in other_text, chief_text[-3000:]

    # Synchronous training: the two workers end with bit-identical weights (both apply the same
    # all-reduced gradient to the same values).
    w0, w1 = _load(tmp_path / "worker0.npz"), _load(tmp_path / "worker1.npz")
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)

    # Validation ran on both workers (the test step works too) and logged the same loss.
    val_losses = [t.split("val_loss=", 1)[1].splitlines()[0] for t in (chief_text, other_text)]
    assert val_losses[0] == val_losses[1] and len(json.loads(val_losses[0])) == 2

    # Only the chief wrote the result file; the other worker wrote into a temporary directory.
    result_file = tmp_path / "model.keras"
    assert f"saved={result_file}\n" in chief_text
    other_saved = Path(other_text.split("saved=", 1)[1].splitlines()[0])
    assert other_saved.parent != tmp_path and other_saved.name == "model.keras"
    reloaded = keras.models.load_model(result_file)
    for a, b in zip(w0, [v.numpy() for v in reloaded.trainable_variables], strict=True):
        np.testing.assert_array_equal(a, b)

    # batch_size=64 is the global batch: each worker trains on its half of every batch, and
    # the run equals the same fine-tune on one device.
    digits = np.load(data)
    worker = _worker_module()
    tuner, _, start = worker.fine_tune(str(model), digits["x"], digits["y"], None)
    single = [v.numpy() for v in tuner.model.trainable_variables]
    _assert_close_and_trained(w0, single, [start[k] for k in sorted(start)])


@pytest.fixture(scope="module")
def one_device() -> tf.distribute.Strategy:
    # A real MirroredStrategy on the one CPU: creates mirrored variables, needs no device split.
    return tf.distribute.MirroredStrategy(["CPU:0"])


def test_copy_false_outside_scope_raises_config_error(
    pretrained, one_device: tf.distribute.Strategy
) -> None:  # type: ignore[no-untyped-def]
    outside = keras.models.clone_model(pretrained.model)
    with pytest.raises(ConfigError, match=r"built outside the scope.*copy=True"):
        FineTuner(outside, copy=False, strategy=one_device)
    assert foreign_variables(outside, one_device)  # Untouched, still plain variables.


def test_model_outside_scope_is_copied_into_it(
    pretrained, digits, one_device: tf.distribute.Strategy
) -> None:  # type: ignore[no-untyped-def]
    before = [w.copy() for w in pretrained.model.get_weights()]
    tuner = (
        FineTuner(pretrained.model, strategy=one_device)
        .freeze_until("fc1")
        .replace_head(5, at="fc2", hidden=(8,))
        .compile_sgd(lr=0.05)
    )
    assert tuner.strategy is one_device
    assert foreign_variables(tuner.model, one_device) == []
    result = tuner.fit(digits.x_new[:128], digits.y_new[:128], epochs=1, batch_size=32, verbose=0)
    assert np.isfinite(result.history["loss"][0])
    assert foreign_variables(tuner.model.optimizer, one_device) == []
    for a, b in zip(before, pretrained.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_copy_false_inside_scope_adopts_its_strategy(
    pretrained, digits, one_device: tf.distribute.Strategy
) -> None:  # type: ignore[no-untyped-def]
    with one_device.scope():
        inside = keras.models.clone_model(pretrained.model)
    tuner = FineTuner(inside, copy=False).replace_head(3, at="fc2").compile_sgd(lr=0.01)
    assert tuner.strategy is one_device
    tuner.fit(digits.x_new[:64], digits.y_new[:64] % 3, epochs=1, batch_size=32, verbose=0)
    assert foreign_variables(tuner.model, one_device) == []


def test_helpers_without_strategy() -> None:
    with pytest.raises(ConfigError, match=r"tf\.distribute\.Strategy or None"):
        check_strategy("mirrored")
    assert check_strategy(None) is None
    with in_scope(None):
        assert not tf.distribute.has_strategy()
    assert is_chief(None)
    assert worker_path("runs/model.keras", None) == "runs/model.keras"
