"""Benchmark cases of the feature cache beyond the basic table (issue #15), small enough for 2 cores.

Each row trains once in a fresh Python process; rows of one case are interleaved over the
repeats (the order reverses every repeat), and ratios are against the case's first row of the
same run:

- ``folder``: the keras.io flow: PNG files in class folders read by
  ``keras.utils.image_dataset_from_directory`` (reshuffled every epoch, its default), a frozen
  ``MobileNetV2(weights=None, alpha=0.35)`` base on 64x64 images, a new head; plain fit
  (``cache=False``) against ``cache="auto"`` (which reshuffles the cached features as the folder
  would: equal in distribution, not in order).
- ``bert``: a frozen keras-hub BERT encoder (2 layers, hidden 64, sequences of 32 tokens) with a
  new head on ``pooled_output``, ``dropout="frozen"``, dict inputs; plain fit against
  ``cache="auto"``.
- ``augment``: the tutorial-style model: RandomFlip + RandomRotation -> a frozen convolutional
  base (pre-trained for 3 epochs on other samples of the task before the timer starts) ->
  GlobalAveragePooling -> Dropout -> Dense, on generated 32x32 images of 5 classes (class
  patterns plus noise). Plain augmented fit (``cache=False``) against
  ``augment_views=2`` and ``4``; time and held-out accuracy (mean over the repeats, each repeat
  a different seed).
- ``effnet``: a frozen ``EfficientNetB0(weights=None)`` base on 64x64 inputs with a new head,
  ``FineTuner(dropout="frozen")``: plain fit against ``cache="auto"`` (the cut moves to the end
  of the base).
- ``spill``: features 4x ``cache_memory`` (spilled to a memory-mapped file) against the same fit
  in memory: peak resident memory and the mean time of the head's epochs.

Run: ``python -m benchmarks.cases`` (``--repeats``, ``--cases``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES: dict[str, tuple[str, ...]] = {
    "folder": ("plain", "cached"),
    "bert": ("plain", "cached"),
    "augment": ("plain", "views2", "views4"),
    "effnet": ("plain", "cached"),
    "spill": ("memory", "spilled"),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(n: int, size: int, classes: int, seed: int) -> tuple[Any, Any]:
    """Stripes whose frequency is the class, at a random phase and orientation, plus noise: a
    task that flips and small rotations keep, and that pooled conv features can tell apart."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    u = np.arange(size, dtype="float32")[None, :, None]
    v = np.arange(size, dtype="float32")[None, None, :]
    angle = rng.uniform(0, np.pi, (n, 1, 1)).astype("float32")
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype("float32")
    freq = (1.5 + y[:, None, None]).astype("float32") * 2 * np.pi / size
    stripes = np.sin(freq * (np.cos(angle) * u + np.sin(angle) * v) + phase)
    x = 0.5 + 0.25 * stripes[..., None] + 0.3 * rng.standard_normal((n, size, size, 3))
    return x.astype("float32"), y


def _write_folder(root: Path, n: int, size: int, classes: int, seed: int) -> None:
    """`n` PNG images of `_images` in one folder per class, as `image_dataset_from_directory`
    reads them."""
    if root.is_dir():
        return
    import numpy as np
    import tensorflow as tf

    x, y = _images(n, size, classes, seed)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (np.clip(image, 0, 1) * 255).astype("uint8")
        tf.io.write_file(str(folder / f"{i:04d}.png"), tf.io.encode_png(pixels))


def _conv_base(size: int) -> Any:
    import keras

    layers = keras.layers
    inp = keras.Input((size, size, 3))
    x = inp
    for i, filters in enumerate((32, 32, 64, 64)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        if i % 2 == 1:
            x = layers.MaxPooling2D(name=f"pool{i // 2 + 1}")(x)
    return keras.Model(inp, x, name="base")


class _EpochTimer:
    """Seconds of each epoch of the head (the cached epochs, without the extraction)."""

    def __new__(cls) -> Any:
        import keras

        class Timer(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.seconds: list[float] = []
                self._start = 0.0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.seconds.append(time.perf_counter() - self._start)

        return Timer()


def run_one(case: str, method: str, seed: int) -> dict[str, float]:
    """Trains one row in this process; returns its measurements."""
    import keras

    from transferkit import FineTuner

    keras.utils.set_random_seed(seed)
    report: dict[str, float] = {}
    if case == "folder":
        folder = Path(os.environ["TK_BENCH_TMP"]) / f"images_{seed}"
        _write_folder(folder, 320, 64, 4, seed)
        ds = keras.utils.image_dataset_from_directory(
            folder, image_size=(64, 64), batch_size=32, seed=seed, verbose=False
        )
        base = keras.applications.MobileNetV2(
            weights=None, include_top=False, input_shape=(64, 64, 3), alpha=0.35, pooling="avg"
        )
        inp = keras.Input((64, 64, 3))
        h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
        out = keras.layers.Dense(4, activation="softmax")(base(h))
        tuner = FineTuner(keras.Model(inp, out), copy=False).freeze_until(-1)
        tuner.compile_sgd(lr=0.05, momentum=0.9)
        cache = "auto" if method == "cached" else False
        start, cpu = time.perf_counter(), _cpu()
        result = tuner.fit(ds, epochs=8, verbose=0, cache=cache)
        report["seconds"], report["cpu"] = time.perf_counter() - start, _cpu() - cpu
        if (method == "cached") != result.cached:
            raise SystemExit(f"folder/{method}: cached={result.cached}, the benchmark is broken")
    elif case == "bert":
        import keras_hub  # type: ignore[import-untyped]
        import numpy as np

        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=1000,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            intermediate_dim=128,
            max_sequence_length=32,
        )
        backbone.trainable = False
        names = ("token_ids", "segment_ids", "padding_mask")
        inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in names}
        out = keras.layers.Dense(2, activation="softmax")(backbone(inputs)["pooled_output"])
        rng = np.random.default_rng(seed)
        x = {
            "token_ids": rng.integers(1, 1000, (1024, 32)).astype("int32"),
            "segment_ids": np.zeros((1024, 32), "int32"),
            "padding_mask": np.ones((1024, 32), "int32"),
        }
        y = (x["token_ids"][:, 0] % 2).astype("int32")
        tuner = FineTuner(keras.Model(inputs, out), copy=False, dropout="frozen")
        tuner.compile_sgd(lr=0.05, momentum=0.9)
        cache = "auto" if method == "cached" else False
        start, cpu = time.perf_counter(), _cpu()
        result = tuner.fit(x, y, epochs=8, batch_size=32, verbose=0, cache=cache)
        report["seconds"], report["cpu"] = time.perf_counter() - start, _cpu() - cpu
        if (method == "cached") != result.cached:
            raise SystemExit(f"bert/{method}: cached={result.cached}, the benchmark is broken")
    elif case == "augment":
        x, y = _images(1536, 32, 5, seed)
        xt, yt = _images(512, 32, 5, seed + 100)
        # A pre-trained base, as in the tutorial: trained briefly on other samples of the task
        # (before the timer starts), then frozen; otherwise the frozen features are random and
        # every method stays at chance.
        base = _conv_base(32)
        xp, yp = _images(1024, 32, 5, seed + 200)
        probe = keras.Sequential(
            [
                base,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(5, activation="softmax"),
            ]
        )
        probe.compile("adam", "sparse_categorical_crossentropy")
        probe.fit(xp, yp, epochs=3, batch_size=64, verbose=0)
        inp = keras.Input((32, 32, 3))
        h = keras.layers.RandomFlip("horizontal")(inp)
        h = keras.layers.RandomRotation(0.1)(h)
        h = base(h)
        h = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(h))
        out = keras.layers.Dense(5, activation="softmax")(h)
        tuner = FineTuner(keras.Model(inp, out), copy=False).freeze_until(-2)
        tuner.compile_sgd(lr=0.05, momentum=0.9)
        views = {"plain": None, "views2": 2, "views4": 4}[method]
        start, cpu = time.perf_counter(), _cpu()
        result = tuner.fit(
            x, y, epochs=12, batch_size=64, verbose=0, augment_views=views, cache="auto"
        )
        report["seconds"], report["cpu"] = time.perf_counter() - start, _cpu() - cpu
        if (views is not None) != result.cached:
            raise SystemExit(f"augment/{method}: cached={result.cached}, the benchmark is broken")
        report["accuracy"] = float(result.evaluate(xt, yt)["accuracy"])
    elif case == "effnet":
        x, y = _images(384, 64, 5, seed)
        base = keras.applications.EfficientNetB0(
            weights=None, include_top=False, input_shape=(64, 64, 3), pooling="avg"
        )
        out = keras.layers.Dense(5, activation="softmax")(base.output)
        tuner = FineTuner(keras.Model(base.input, out), copy=False, dropout="frozen")
        tuner.freeze_until(-1).compile_sgd(lr=0.05, momentum=0.9)
        start, cpu = time.perf_counter(), _cpu()
        result = tuner.fit(
            x, y, epochs=5, batch_size=32, verbose=0, cache="auto" if method == "cached" else False
        )
        report["seconds"], report["cpu"] = time.perf_counter() - start, _cpu() - cpu
        if (method == "cached") != result.cached:
            raise SystemExit(f"effnet/{method}: cached={result.cached}, the benchmark is broken")
    else:
        x, y = _images(2048, 32, 5, seed)
        inp = keras.Input((32, 32, 3))
        h = keras.layers.Flatten()(_conv_base(32)(inp))  # 8x8x64: 16 KiB per image
        out = keras.layers.Dense(5, activation="softmax")(h)
        tuner = FineTuner(keras.Model(inp, out), copy=False).freeze_until(-1)
        tuner.compile_sgd(lr=0.01, momentum=0.9)
        features = 2048 * 8 * 8 * 64 * 4  # 32 MiB
        memory = features // 4 if method == "spilled" else 1 << 30
        timer = _EpochTimer()
        start, cpu = time.perf_counter(), _cpu()
        result = tuner.fit(
            x, y, epochs=6, batch_size=64, verbose=0, cache=True, cache_memory=memory,
            callbacks=[timer],
        )  # fmt: skip
        report["seconds"], report["cpu"] = time.perf_counter() - start, _cpu() - cpu
        report["epoch"] = statistics.mean(timer.seconds[1:])  # the first also traces
        report["features_mib"] = features / 2**20
        report["budget_mib"] = memory / 2**20
        assert result.cached
    report["peak_rss"] = _rss_mib()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {', '.join(CASES)}")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, method, out = args.child
        seed = int(os.environ.get("TK_BENCH_SEED", "0"))
        Path(out).write_text(json.dumps(run_one(case, method, seed)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    env = dict(os.environ)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    with tempfile.TemporaryDirectory(prefix="tk-cases-") as tmp:
        for rep in range(args.repeats):
            for case in cases:
                methods = CASES[case] if rep % 2 == 0 else tuple(reversed(CASES[case]))
                for method in methods:
                    out = Path(tmp) / f"{case}_{method}_{rep}.json"
                    cmd = [sys.executable, "-m", "benchmarks.cases", "--child", case, method]
                    env["TK_BENCH_SEED"] = str(rep)
                    env["TK_BENCH_TMP"] = tmp
                    subprocess.run([*cmd, str(out)], check=True, env=env, cwd=ROOT)
                    row = json.loads(out.read_text())
                    got.setdefault((case, method), []).append(row)
                    print(f"repeat {rep + 1} {case}/{method}: {row}", flush=True)
    print()
    print(
        f"{args.repeats} repeat(s); seconds and cpu: medians; ratios against the case's first row"
    )
    print(
        f"{'case':8s} {'method':8s} {'seconds':>8s} {'ratio':>6s} {'cpu s':>7s} {'cpu ratio':>9s}"
        f" {'peak RSS':>9s} {'accuracy':>8s} {'epoch s':>8s}"
    )
    for case in cases:
        ref = got[(case, CASES[case][0])]
        ref_s = statistics.median(r["seconds"] for r in ref)
        ref_cpu = statistics.median(r["cpu"] for r in ref)
        for method in CASES[case]:
            rows = got[(case, method)]
            sec = statistics.median(r["seconds"] for r in rows)
            cpu = statistics.median(r["cpu"] for r in rows)
            rss = max(r["peak_rss"] for r in rows)
            acc = (
                f"{statistics.mean(r['accuracy'] for r in rows):8.3f}"
                if "accuracy" in rows[0]
                else ""
            )
            epoch = (
                f"{statistics.median(r['epoch'] for r in rows):8.3f}" if "epoch" in rows[0] else ""
            )
            print(
                f"{case:8s} {method:8s} {sec:8.2f} {sec / ref_s:6.3f} {cpu:7.2f} {cpu / ref_cpu:9.3f}"
                f" {rss:5.0f} MiB {acc:>8s} {epoch:>8s}"
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    sys.exit(main())
