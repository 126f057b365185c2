"""The transferkit demo: few-shot transfer on scikit-learn's bundled digits, no downloads.

A small CNN is pre-trained on the digits 0-4 and saved as a legacy `.h5` file (the classic
format). It is then adapted to the digits 5-9 from only a few labelled images per class, in
several ways ("arms"), each evaluated on the same held-out test images:

- training the same network from scratch,
- fine-tuning all layers (SGD with momentum),
- fine-tuning only the last layers,
- turning the classifier into a regressor of the digit's value (MAE).

Run it with `make demo` or `python -m transferkit.demo [--quick]`. More arms are added by
appending an `Arm` to `ARMS`.
"""

from __future__ import annotations

import os

# oneDNN crashes on some convolutions on AVX-512 CPUs; it can only be switched off before
# TensorFlow is first imported (see the README's troubleshooting section).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np

from transferkit.errors import MissingExtraError
from transferkit.tuner import FineTuner

__all__ = [
    "ARMS",
    "Arm",
    "DemoConfig",
    "DemoContext",
    "DemoData",
    "Row",
    "build_cnn",
    "format_table",
    "load_data",
    "main",
    "pretrain",
    "run_demo",
]

OLD_DIGITS = (0, 1, 2, 3, 4)
NEW_DIGITS = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's budget and hyper-parameters.

    Attributes:
        shots: labelled training images per new class.
        pretrain_epochs: epochs of pre-training on the old digits.
        epochs: epochs of every adaptation arm.
        batch_size: batch size of the adaptation arms.
        seed: random seed (data split and weight initialisation).
    """

    shots: int = 10
    pretrain_epochs: int = 12
    epochs: int = 20
    batch_size: int = 10
    seed: int = 0

    def quick(self) -> DemoConfig:
        """A much smaller budget, for tests and smoke runs."""
        return replace(self, pretrain_epochs=1, epochs=2)


@dataclass(frozen=True)
class DemoData:
    """Digits images (8x8x1 in [0, 1]) split into the old task and the new few-shot task.

    New-task labels are class ids 0-4 (digit - 5); `*_value` holds the digit itself (5-9).
    """

    x_old: np.ndarray
    y_old: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def value_train(self) -> np.ndarray:
        """The digit values (5-9) of the training images, as float32."""
        return (self.y_train + NEW_DIGITS[0]).astype("float32")

    @property
    def value_test(self) -> np.ndarray:
        """The digit values (5-9) of the test images, as float32."""
        return (self.y_test + NEW_DIGITS[0]).astype("float32")


@dataclass(frozen=True)
class DemoContext:
    """What every arm gets: the data, the budget and the pre-trained `.h5` file."""

    data: DemoData
    config: DemoConfig
    pretrained: Path


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    arm: str
    metric: str
    value: float
    trainable_params: int
    seconds: float


@dataclass(frozen=True)
class Arm:
    """A named way of adapting the model; `run` trains it and returns its row."""

    name: str
    run: Callable[[DemoContext], Row]


def load_data(config: DemoConfig) -> DemoData:
    """Loads scikit-learn's digits and makes the few-shot split.

    Raises:
        MissingExtraError: scikit-learn is not installed (the `demo` extra).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingExtraError(
            "the demo needs scikit-learn: pip install 'transferkit[demo]'"
        ) from exc
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    old = y <= OLD_DIGITS[-1]
    x_new, y_new = x[~old], y[~old] - NEW_DIGITS[0]
    rng = np.random.default_rng(config.seed)
    train = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_new == c), config.shots, replace=False)
            for c in range(len(NEW_DIGITS))
        ]
    )
    rng.shuffle(train)
    mask = np.zeros(len(y_new), bool)
    mask[train] = True
    return DemoData(x[old], y[old], x_new[train], y_new[train], x_new[~mask], y_new[~mask])


def build_cnn(num_classes: int = len(OLD_DIGITS)) -> keras.Model:
    """The small CNN of the demo (a softmax classifier), freshly initialised."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(32, activation="relu", name="fc2"),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Dense(num_classes, activation="softmax", name="out"),
        ],
        name="digits_cnn",
    )


def pretrain(data: DemoData, config: DemoConfig, path: Path) -> Path:
    """Trains `build_cnn()` on the old digits and saves it as a classic `.h5` file.

    The file is written the Keras 2 way, compiled with a string loss: exactly what plain Keras 3
    cannot reload with `load_model(path)`, and what `FineTuner(path)` loads.
    """
    keras.utils.set_random_seed(config.seed)
    model = build_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.x_old, data.y_old, epochs=config.pretrain_epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


def _accuracy(model: keras.Model, data: DemoData) -> float:
    scores = model.predict(data.x_test, verbose=0)
    return float(np.mean(np.argmax(scores, axis=-1) == data.y_test))


def _mae(model: keras.Model, data: DemoData) -> float:
    pred = model.predict(data.x_test, verbose=0).reshape(-1)
    return float(np.mean(np.abs(pred - data.value_test)))


def _fit(tuner: FineTuner, ctx: DemoContext, y: np.ndarray) -> tuple[keras.Model, float, int]:
    start = time.perf_counter()
    result = tuner.fit(
        ctx.data.x_train, y, epochs=ctx.config.epochs, batch_size=ctx.config.batch_size, verbose=0
    )
    return result.model, time.perf_counter() - start, result.trainable_params


def arm_scratch(ctx: DemoContext) -> Row:
    """The same network, randomly initialised, trained on the few new images only."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(build_cnn(len(NEW_DIGITS)), copy=False).compile("adam")
    model, seconds, params = _fit(tuner, ctx, ctx.data.y_train)
    return Row("from scratch", "accuracy", _accuracy(model, ctx.data), params, seconds)


# The dense layers pre-trained on 0-4 are too specialised to help with 5-9 (training only a new
# output on them reached about 50 % here); the convolutional features transfer. So the new
# classifier head sits on the flattened convolution output.
_CUT = "flatten"


def arm_fine_tune_all(ctx: DemoContext) -> Row:
    """Recipe 1: a new head on the convolutions, every layer trained with SGD and momentum."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(ctx.pretrained).replace_head(len(NEW_DIGITS), at=_CUT)
    tuner.compile_sgd(lr=1e-2, momentum=0.9)
    model, seconds, params = _fit(tuner, ctx, ctx.data.y_train)
    return Row("fine-tune all layers", "accuracy", _accuracy(model, ctx.data), params, seconds)


def arm_fine_tune_last(ctx: DemoContext) -> Row:
    """Recipe 2: the same head; the convolutions stay frozen, only the last layers train."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(ctx.pretrained).replace_head(len(NEW_DIGITS), at=_CUT)
    tuner.freeze_until(_CUT).compile_sgd(lr=1e-2, momentum=0.9)
    model, seconds, params = _fit(tuner, ctx, ctx.data.y_train)
    return Row("fine-tune last layers", "accuracy", _accuracy(model, ctx.data), params, seconds)


def arm_two_phase(ctx: DemoContext) -> Row:
    """`fine_tune`: the new head alone for half the epochs, then every layer at a tenth of the
    learning rate (fresh optimizer per phase)."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(ctx.pretrained).replace_head(len(NEW_DIGITS), at=_CUT).compile("adam")
    head_epochs = ctx.config.epochs // 2
    start = time.perf_counter()
    result = tuner.fine_tune(
        ctx.data.x_train,
        ctx.data.y_train,
        head_epochs=head_epochs,
        epochs=ctx.config.epochs - head_epochs,
        lr_factor=0.1,
        batch_size=ctx.config.batch_size,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    accuracy = _accuracy(result.model, ctx.data)
    return Row("two-phase fine_tune", "accuracy", accuracy, result.trainable_params, seconds)


def arm_lora(ctx: DemoContext) -> Row:
    """LoRA: the pre-trained layers frozen under rank-4 adapters, the new head trained with them."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(ctx.pretrained).replace_head(len(NEW_DIGITS), at=_CUT).lora(rank=4)
    tuner.compile("adam")
    model, seconds, params = _fit(tuner, ctx, ctx.data.y_train)
    return Row("LoRA r=4 + new head", "accuracy", _accuracy(model, ctx.data), params, seconds)


def arm_regression(ctx: DemoContext) -> Row:
    """Recipe 3: cut at layer -6 and predict the digit's value with a Dense(64)-Dense(1) head."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(ctx.pretrained).freeze_until("flatten")
    tuner.replace_head(regression=True, at=-6).compile("adam")
    model, seconds, params = _fit(tuner, ctx, ctx.data.value_train)
    return Row("classifier -> regressor", "MAE", _mae(model, ctx.data), params, seconds)


def arm_regression_scratch(ctx: DemoContext) -> Row:
    """The regressor's reference: the same network trained from scratch on the digit values."""
    keras.utils.set_random_seed(ctx.config.seed)
    tuner = FineTuner(build_cnn(), copy=False).replace_head(regression=True, at=-6)
    tuner.compile("adam")
    model, seconds, params = _fit(tuner, ctx, ctx.data.value_train)
    return Row("regressor from scratch", "MAE", _mae(model, ctx.data), params, seconds)


ARMS: list[Arm] = [
    Arm("scratch", arm_scratch),
    Arm("fine-tune-all", arm_fine_tune_all),
    Arm("fine-tune-last", arm_fine_tune_last),
    Arm("two-phase", arm_two_phase),
    Arm("lora", arm_lora),
    Arm("regression", arm_regression),
    Arm("regression-scratch", arm_regression_scratch),
]


def run_demo(
    config: DemoConfig,
    *,
    arms: Sequence[Arm] | None = None,
    workdir: Path | None = None,
) -> list[Row]:
    """Pre-trains the model, runs every arm and returns their rows.

    Args:
        config: budget and hyper-parameters.
        arms: the arms to run (default: `ARMS`).
        workdir: where the pre-trained `.h5` is written (default: a temporary directory).

    Returns:
        One `Row` per arm, in order.
    """
    data = load_data(config)
    with tempfile.TemporaryDirectory(prefix="transferkit-demo-") as tmp:
        directory = workdir or Path(tmp)
        path = pretrain(data, config, directory / "digits_0_4.h5")
        ctx = DemoContext(data=data, config=config, pretrained=path)
        return [arm.run(ctx) for arm in (ARMS if arms is None else arms)]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (accuracy as a percentage, MAE in digit units)."""
    lines = [
        "| arm | metric | value | trainable params | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        value = f"{100 * row.value:.1f} %" if row.metric == "accuracy" else f"{row.value:.3f}"
        lines.append(
            f"| {row.arm} | {row.metric} | {value} | {row.trainable_params:,} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo and prints its table.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m transferkit.demo",
        description="Few-shot transfer on scikit-learn's digits: pre-train on 0-4, adapt to 5-9.",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny budget (a smoke run)")
    parser.add_argument("--shots", type=int, default=DemoConfig.shots, help="images per class")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every arm")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = parser.parse_args(argv)
    config = DemoConfig(shots=args.shots, seed=args.seed)
    if args.quick:
        config = config.quick()
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    start = time.perf_counter()
    data = load_data(config)
    print(
        f"Pre-training a CNN on digits 0-4 ({len(data.y_old)} images), then adapting it to "
        f"digits 5-9 from {config.shots} images per class; testing on {len(data.y_test)} "
        "held-out images.",
        flush=True,
    )
    rows = run_demo(config)
    print(format_table(rows))
    print(f"Total: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
