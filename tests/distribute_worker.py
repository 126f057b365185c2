"""The programs `tests/test_distribute.py` runs in subprocesses (docs/scaling-out.md shows them).

Device configuration and `TF_CONFIG` are process-wide and must be set before TensorFlow starts,
so each run is a fresh interpreter:

    python tests/distribute_worker.py mirrored    MODEL DATA OUT_DIR
    python tests/distribute_worker.py multiworker MODEL DATA OUT_DIR   (TF_CONFIG set)
    python tests/distribute_worker.py recipes     MODEL DATA OUT_DIR

MODEL is a pre-trained `.keras` file, DATA an `.npz` with `x` and `y`. Each run writes `.npz`
files of final weights to OUT_DIR; the test compares them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

EPOCHS = 2
GLOBAL_BATCH = 64


def split_cpu(n: int) -> None:
    """Makes the one CPU look like `n` devices; must run before TensorFlow initialises."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def fine_tune(source: Any, x: np.ndarray, y: np.ndarray, strategy: Any) -> Any:
    """The fine-tune every run does: a new head on `fc2`, training `fc1` onwards.

    `source` is a `keras.Model` or a model file. The seed is set right before the head is
    built, so every run starts from the same head whatever loading drew from the generator.
    """
    import keras

    from transferkit import FineTuner

    if isinstance(source, str):
        tuner = FineTuner.load(source, strategy=strategy)
    else:
        tuner = FineTuner(source, strategy=strategy)  # copied into the scope (copy=True)
    tuner.freeze_until("fc1")
    keras.utils.set_random_seed(7)
    tuner.replace_head(5, at="fc2", hidden=(16,)).compile_sgd(lr=0.05, momentum=0.9)
    start = weights(tuner.model)
    result = tuner.fit(
        x,
        y,
        epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        shuffle=False,
        validation_data=(x[:128], y[:128]),
        verbose=0,
    )
    return tuner, result, start


def weights(model: Any) -> dict[str, np.ndarray]:
    """The trainable weights by position (paths differ between loaded and copied models)."""
    return {f"w{i:02d}": v.numpy() for i, v in enumerate(model.trainable_variables)}


def mirrored(model_path: str, x: np.ndarray, y: np.ndarray, out: Path) -> None:
    split_cpu(2)
    import keras

    # Loaded outside any scope on purpose: FineTuner copies it into the strategy's scope.
    pretrained = keras.models.load_model(model_path, compile=False)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    tuner, result, _ = fine_tune(pretrained, x, y, strategy)
    np.savez(out / "mirrored.npz", **weights(tuner.model))
    single, single_result, start = fine_tune(pretrained, x, y, None)
    # Both runs train the head on cached features of the frozen prefix.
    print(f"cached={result.cached},{single_result.cached} layer={result.cache_layer}")
    np.savez(out / "single.npz", **weights(single.model))
    np.savez(out / "start.npz", **start)
    kinds = sorted({type(v.value).__name__ for v in tuner.model.variables})
    print(f"replicas={strategy.num_replicas_in_sync} variables={','.join(kinds)}")


def multiworker(model_path: str, x: np.ndarray, y: np.ndarray, out: Path) -> None:
    from transferkit.train.distribution import is_chief, worker_path

    # Reads TF_CONFIG; create it before any other TensorFlow op of the process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    tuner, result, _ = fine_tune(model_path, x, y, strategy)
    # Every worker runs the same program and saves; only the chief's file is the result.
    saved = result.save(worker_path(out / "model.keras", strategy))
    task = strategy.cluster_resolver.task_id
    np.savez(out / f"worker{task}.npz", **weights(tuner.model))
    print(f"task={task} chief={is_chief(strategy)} replicas={strategy.num_replicas_in_sync}")
    print(f"cached={result.cached}")
    print(f"saved={saved}")
    print(f"val_loss={result.history['val_loss']}")


def _bn_model(path: Path) -> None:
    """A small convolutional model with BatchNormalization, saved for both runs to load."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(6, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(5, activation="softmax", name="out"),
        ]
    )
    model.save(path)


def recipes(model_path: str, x: np.ndarray, y: np.ndarray, out: Path) -> None:
    """fine_tune, find_lr, LoRA, checkpoint_dir, adapt_batchnorm and GradualUnfreezing under a
    2-replica MirroredStrategy, each against the same recipe without a strategy (final weights
    saved for the test to compare)."""
    split_cpu(2)
    import keras

    from transferkit import FineTuner, GradualUnfreezing

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    bn_path = out / "bn_model.keras"
    _bn_model(bn_path)

    def tuner(strat: Any) -> Any:
        t = FineTuner.load(model_path, strategy=strat)
        keras.utils.set_random_seed(7)
        return t.replace_head(5, at="flatten", hidden=(16,))

    fit = {"batch_size": GLOBAL_BATCH, "shuffle": False, "verbose": 0}
    for name, strat in (("mirrored", strategy), ("single", None)):
        ft = tuner(strat).compile_sgd(lr=0.05, momentum=0.9)
        result = ft.fine_tune(x, y, head_epochs=1, epochs=1, **fit)
        np.savez(out / f"fine_tune_{name}.npz", **weights(ft.model))
        print(f"{name} fine_tune phases={result.phases}")

        lt = tuner(strat).lora(rank=2).compile_sgd(lr=0.05, momentum=0.9)
        result = lt.fit(x, y, epochs=EPOCHS, **fit)
        np.savez(out / f"lora_{name}.npz", **weights(lt.model))
        print(f"{name} lora cached={result.cached}")

        # The body frozen: the head trains on cached features, checkpointed every epoch.
        ct = tuner(strat).freeze_until("head_dense_1").compile_sgd(lr=0.05, momentum=0.9)
        result = ct.fit(x, y, epochs=EPOCHS, checkpoint_dir=out / f"ckpt_{name}", **fit)
        np.savez(out / f"checkpoint_{name}.npz", **weights(ct.model))
        print(f"{name} checkpoint epochs={result.epochs} cached={result.cached}")

        before = [v.numpy().copy() for v in ct.model.variables]
        finder = ct.find_lr(x, y, steps=20, batch_size=GLOBAL_BATCH)
        after = [v.numpy() for v in ct.model.variables]
        same = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        # The sweep may stop early once the loss diverges at the highest rates.
        print(f"{name} find_lr swept={len(finder.lrs) >= 5} unchanged={same}")

        bt = FineTuner.load(bn_path, strategy=strat)
        start = bt.model.get_layer("bn").moving_variance.numpy().copy()
        bt.adapt_batchnorm(x, batch_size=GLOBAL_BATCH)
        moved = not np.allclose(bt.model.get_layer("bn").moving_variance.numpy(), start)
        np.savez(out / f"adapt_batchnorm_{name}.npz", **weights(bt.model))
        print(f"{name} adapt_batchnorm moved={moved}")

        # The head first, then one more layer every epoch; the body trains at a low rate.
        gt = tuner(strat).freeze_until("head_dense_1").compile_sgd(lr=0.005, momentum=0.9)
        unfreeze = GradualUnfreezing(every=1, step=2)
        result = gt.fit(x, y, epochs=EPOCHS, callbacks=[unfreeze], **fit)
        np.savez(out / f"gradual_unfreezing_{name}.npz", **weights(gt.model))
        print(f"{name} gradual_unfreezing unfrozen={unfreeze.unfrozen}")


def main(argv: list[str]) -> None:
    mode, model_path, data_path, out_dir = argv
    data = np.load(data_path)
    x, y = data["x"], data["y"]
    modes = {"mirrored": mirrored, "multiworker": multiworker, "recipes": recipes}
    modes[mode](model_path, x, y, Path(out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
