"""`FineTuner(distribution=...)`: `keras.distribution` on JAX, over 2 host CPU devices.

JAX fixes its device count when it starts, so the runs happen in a fresh interpreter
(`tests/sharding_worker.py`) with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=2`, whatever backend this suite runs on; this
file therefore runs in the TensorFlow pass of `make test`, where it also checks that a
distribution is refused on TensorFlow.

Tolerance: every run computes the same mean loss of the same global batch in float32; split
over two devices, the batch's gradient is summed in another order, and a sharded kernel's
matmul adds its partial products in another order. Each step then differs by float32 rounding
(~1e-7 relative); over 8 SGD-with-momentum steps on weights of order 0.1-1 that stays below
1e-5, which is what the test allows. A wrong result (an unreduced gradient, a replica that did
not train) moves weights by the learning-rate scale, 1e-3 or more.
"""

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

from transferkit import ConfigError, FineTuner

WORKER = Path(__file__).with_name("sharding_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report(
    pretrained: Pretrained, digits: Digits, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    pytest.importorskip("jax", reason="the jax extra is part of the dev install")
    tmp = tmp_path_factory.mktemp("sharding")
    data, out = tmp / "data.npz", tmp / "report.json"
    np.savez(data, x=digits.x_new[:64], y=digits.y_new[:64])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(pretrained.keras_path), str(data), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded: dict[str, object] = json.loads(out.read_text())
    return loaded


def test_data_parallel_equals_one_device_with_and_without_the_cache(
    report: dict[str, object],
) -> None:
    assert report["devices"] == 2
    for cache in (False, True):
        run = report[f"data_parallel_cache_{cache}"]
        assert isinstance(run, dict)
        assert run["cached"] is cache
        assert run["max_diff"] < TOLERANCE and run["pred_diff"] < TOLERANCE
        # Replicated: each device holds the whole kernel (256 -> 32 in the pre-trained CNN).
        assert run["sharding"] == "NamedSharding"
        assert run["fc1_shards"] == [[256, 32], [256, 32]]


def test_model_parallel_splits_the_kernels_and_equals_one_device(
    report: dict[str, object],
) -> None:
    run = report["model_parallel"]
    assert isinstance(run, dict)
    assert run["max_diff"] < TOLERANCE
    # fc1's kernel split along its output axis, fc2's along its input axis: half on each device.
    assert run["fc1_shape"] == [256, 32] and run["fc1_shards"] == [[256, 16], [256, 16]]
    assert run["fc2_shape"] == [32, 16] and run["fc2_shards"] == [[16, 16], [16, 16]]


def test_lora_under_model_parallel_equals_one_device(report: dict[str, object]) -> None:
    run = report["lora_model_parallel"]
    assert isinstance(run, dict)
    assert run["lora_b_max"] > 1e-4  # B starts at zero: the adapters trained
    assert run["max_diff"] < TOLERANCE
    assert run["fc1_shards"] == [[256, 16], [256, 16]]


def test_wrong_arguments_say_what_to_use(report: dict[str, object]) -> None:
    errors = report["errors"]
    assert isinstance(errors, dict)
    assert "copy=True" in errors["copy_false"] and "conv1/kernel" in errors["copy_false"]
    assert "distribution=keras.distribution.DataParallel()" in errors["strategy_on_jax"]
    assert "not both" in errors["both"]
    assert "keras.distribution.Distribution" in errors["not_a_distribution"]
    (warning,) = report["unmatched_warnings"]  # type: ignore[misc]
    assert "['fc1/kernel']" in warning and "'.*dense/kernel'" in warning
    # A model built inside the scope is trained in place.
    assert report["copy_false_inside_scope"] == "no error"


def test_the_backend_of_this_process_takes_or_refuses_a_distribution(
    pretrained: Pretrained,
) -> None:
    if keras.backend.backend() == "jax":  # one device here: the worker covers two
        distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
        tuner = FineTuner(pretrained.keras_path, distribution=distribution)
        assert tuner.distribution is distribution
        return
    distribution = keras.distribution.DataParallel(devices=["cpu:0"])
    # On TensorFlow the message points at its own engine; PyTorch has none.
    hint = r".*strategy=tf\.distribute" if keras.backend.backend() == "tensorflow" else ""
    with pytest.raises(ConfigError, match=r"needs the JAX backend" + hint):
        FineTuner(pretrained.keras_path, distribution=distribution)
