"""The program `tests/test_sharding.py` runs in a subprocess: `keras.distribution` on JAX.

JAX fixes its device count when it starts, so the two host CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`) and `KERAS_BACKEND=jax` are set here,
before JAX is imported:

    python tests/sharding_worker.py MODEL DATA OUT.json

MODEL is a pre-trained `.keras` file, DATA an `.npz` with `x` and `y`. The worker fine-tunes
MODEL the same way on one device, under `DataParallel` (plain and with the feature cache), under
`ModelParallel` with the Dense kernels split across the devices, and as a LoRA fine-tune under
that `ModelParallel`; it writes the largest weight differences from the one-device runs, how
the kernels were laid out and the errors the wrong arguments raise, as JSON.
"""

from __future__ import annotations

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
# Kept: flags the caller set (`make test` compiles at XLA's lowest optimisation level).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]
).strip()

import json
import warnings
from typing import Any

import jax
import keras
import numpy as np
import tensorflow as tf

from transferkit import ConfigError, FineTuner

BATCH = 16


def fine_tune(
    model: Any, x: Any, y: Any, lora: bool = False, cache: Any = "auto", **kw: Any
) -> tuple[FineTuner, Any]:
    """The same fine-tune for every run; the seed is set right before the head is built."""
    tuner = FineTuner(model, **kw)
    keras.utils.set_random_seed(7)
    tuner.freeze_until("fc1").replace_head(5, at="fc2", hidden=(16,))
    if lora:
        tuner.lora(rank=2, targets=["fc1", "fc2"])
    tuner.compile_sgd(lr=0.05, momentum=0.9)
    result = tuner.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0, cache=cache)
    return tuner, result


def weights(model: Any) -> dict[str, np.ndarray]:
    return {v.path: np.asarray(v.numpy()) for v in model.variables}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def shards(variable: Any) -> list[list[int]]:
    return [list(s.data.shape) for s in variable.value.addressable_shards]


def error(fn: Any) -> str:
    try:
        fn()
    except ConfigError as exc:
        return str(exc)
    return "no error"


def main(model_path: str, data_path: str, out: str) -> None:
    with np.load(data_path) as data:
        x, y = data["x"], data["y"]
    base = keras.models.load_model(model_path)
    devices = keras.distribution.list_devices()
    report: dict[str, Any] = {"devices": len(jax.devices())}

    _, single = fine_tune(base, x, y)
    ref = weights(single.model)
    x_test = x[:32]
    ref_pred = single.model.predict(x_test, verbose=0)

    mesh = keras.distribution.DeviceMesh((2,), ["batch"], devices)
    data_parallel = keras.distribution.DataParallel(device_mesh=mesh)
    for cache in (False, True):
        tuner, got = fine_tune(base, x, y, distribution=data_parallel, cache=cache)
        kernel = tuner.model.get_layer("fc1").kernel
        report[f"data_parallel_cache_{cache}"] = {
            "cached": got.cached,
            "max_diff": max_diff(ref, weights(got.model)),
            "pred_diff": float(np.max(np.abs(got.model.predict(x_test, verbose=0) - ref_pred))),
            "sharding": type(kernel.value.sharding).__name__,
            "fc1_shards": shards(kernel),
        }

    layout = keras.distribution.LayoutMap(
        keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    )
    # Paths carry the model name (`pretrained_cnn/fc1/kernel`) and LayoutMap keys must match
    # a whole path (`re.fullmatch`), hence the leading `.*`.
    layout[".*fc1/kernel"] = (None, "model")
    layout[".*fc2/kernel"] = ("model", None)
    model_parallel = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
    tuner, got = fine_tune(base, x, y, distribution=model_parallel)
    fc1, fc2 = tuner.model.get_layer("fc1"), tuner.model.get_layer("fc2")
    report["model_parallel"] = {
        "max_diff": max_diff(ref, weights(got.model)),
        "fc1_shape": list(fc1.kernel.shape),
        "fc1_shards": shards(fc1.kernel),
        "fc2_shape": list(fc2.kernel.shape),
        "fc2_shards": shards(fc2.kernel),
    }

    _, lora_single = fine_tune(base, x, y, lora=True)
    tuner, got = fine_tune(base, x, y, lora=True, distribution=model_parallel)
    report["lora_model_parallel"] = {
        "max_diff": max_diff(weights(lora_single.model), weights(got.model)),
        # A LoRA layer's `kernel` is the merged array; `_kernel` is the frozen base variable.
        "fc1_shards": shards(tuner.model.get_layer("fc1")._kernel),
        # B starts at zero: a trained adapter has moved it.
        "lora_b_max": float(np.max(np.abs(tuner.model.get_layer("fc1").lora_kernel_b.numpy()))),
    }

    report["errors"] = {
        "copy_false": error(lambda: FineTuner(base, copy=False, distribution=data_parallel)),
        "strategy_on_jax": error(
            lambda: FineTuner(base, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
        ),
        "both": error(
            lambda: FineTuner(
                base,
                distribution=data_parallel,
                strategy=tf.distribute.OneDeviceStrategy("/cpu:0"),
            )
        ),
        "not_a_distribution": error(lambda: FineTuner(base, distribution="data_parallel")),
    }
    # A key without the model name in front matches nothing (keys must match whole paths).
    bare = keras.distribution.LayoutMap(layout.device_mesh)
    bare["fc1/kernel"] = (None, "model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FineTuner(base, distribution=keras.distribution.ModelParallel(layout_map=bare))
    report["unmatched_warnings"] = [str(w.message) for w in caught if "LayoutMap" in str(w.message)]
    with data_parallel.scope():
        inside = keras.models.load_model(model_path)
    report["copy_false_inside_scope"] = error(
        lambda: FineTuner(inside, copy=False, distribution=data_parallel)
    )
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
