"""Benchmark of the frozen-prefix feature cache against plain Keras and the hand-written baseline.

The model of issue #3: six 3x3 convolutions (32-32, 64-64, 128-128) with max-pooling, Flatten,
Dense(256), Dense(10); 4096 random 32x32x3 images with 10 random classes; only the last two
Dense layers train; SGD; batch 128; 20 epochs. Four ways to train, interleaved, each in a fresh
Python process (so that every row pays its own tracing and reports its own peak memory):

- ``keras``: plain ``model.fit`` on the full model;
- ``by-hand``: the Keras transfer-learning guide's feature extraction: ``base.predict`` once,
  then ``fit`` of a separate head model made of the two Dense layers;
- ``tk-nocache``: ``FineTuner.fit(cache=False)``;
- ``tk-cache``: ``FineTuner.fit(cache="auto")``.

Each row times the training call only (the by-hand row: building the two models, predict and
fit). All runs start from the same weights with ``shuffle=False``, so the final weights must
agree with plain Keras within ``numpy.allclose(rtol=1e-4, atol=1e-5)``; the script checks it.

Wall time on a small shared machine varies by 10 % or more between identical runs, more than the
3 % the ``cache=False`` row is held to. So besides the median seconds of each method the script
prints, for each method, the median of its per-repeat ratio to the plain Keras run of the same
repeat (adjacent in time, so slow drifts of the machine cancel), a bootstrap 90 % interval of the
ratio of medians, and the ratio of CPU seconds. ``--methods keras,tk-nocache --repeats 30``
measures the wrapper's overhead alone.

Run: ``python -m benchmarks.cache`` or ``python benchmarks/cache.py`` (``--epochs``,
``--repeats``, ``--samples``, ``--methods``, ``--backends tensorflow,jax``: every method on each
backend in one run, with a side-by-side table at the end; ``make bench`` does that).
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

METHODS = ("keras", "by-hand", "tk-nocache", "tk-cache")
ROOT = Path(__file__).resolve().parent.parent


def build_model(seed: int = 0):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input((32, 32, 3), name="image")
    x = inp
    for i, filters in enumerate((32, 32, 64, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        if i % 2 == 1:
            x = layers.MaxPooling2D(name=f"pool{i // 2 + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    out = layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="vgg_like")


def data(samples: int):  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((samples, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, samples)
    return x, y


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(method: str, epochs: int, samples: int, out: Path) -> None:
    """Trains once with `method` in this process and writes seconds, memory and weights."""
    import keras
    import numpy as np

    x, y = data(samples)
    model = build_model()
    for layer in model.layers[:-2]:
        layer.trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lr, momentum, batch = 0.01, 0.9, 128
    rss_start = _rss_mib()
    cpu_start = _cpu()
    if method == "keras":
        model.compile(keras.optimizers.SGD(lr, momentum=momentum), loss, metrics=["accuracy"])
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        trained = model
    elif method == "by-hand":
        start = time.perf_counter()
        base = keras.Model(model.inputs, model.get_layer("flatten").output)
        head = keras.Sequential(
            [
                keras.Input((base.output.shape[-1],)),
                model.get_layer("fc1"),
                model.get_layer("logits"),
            ]
        )
        head.compile(keras.optimizers.SGD(lr, momentum=momentum), loss, metrics=["accuracy"])
        features = base.predict(x, batch_size=batch, verbose=0)
        head.fit(features, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        trained = model
    else:
        from transferkit import FineTuner

        tuner = FineTuner(model, copy=False).freeze_until("fc1")
        tuner.compile_sgd(lr=lr, momentum=momentum, loss=loss, metrics=["accuracy"])
        cache = "auto" if method == "tk-cache" else False
        start = time.perf_counter()
        result = tuner.fit(
            x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, cache=cache
        )
        seconds = time.perf_counter() - start
        trained = result.model
        if cache == "auto" and not result.cached:
            raise SystemExit("cache='auto' did not cache: the benchmark is broken")
    np.savez(out, *[w.numpy() for w in trained.weights])
    cpu = _cpu() - cpu_start
    report = {"seconds": seconds, "cpu": cpu, "peak_rss": _rss_mib(), "rss_start": rss_start}
    out.with_suffix(".json").write_text(json.dumps(report))


def _child(
    method: str, epochs: int, samples: int, out: Path, backend: str | None = None
) -> dict[str, float]:
    env = dict(os.environ)
    if backend:
        env["KERAS_BACKEND"] = backend
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", "benchmarks.cache", "--child", method]
    cmd += ["--epochs", str(epochs), "--samples", str(samples), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    result: dict[str, float] = json.loads(out.with_suffix(".json").read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}; ratios and the weight check are "
        "against keras when it is listed, else against the first listed in this order",
    )
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated Keras backends to run every method on (tensorflow,jax), side by "
        "side; default: the backend of the environment",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_one(args.child, args.epochs, args.samples, args.out)
        return 0

    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown = wanted - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    methods = tuple(m for m in METHODS if m in wanted)
    if not methods:
        parser.error("--methods names no method")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] or [None]
    ok = True
    summary: dict[str, dict[str, float]] = {}
    for backend in backends:
        if backend is not None:
            print(f"=== KERAS_BACKEND={backend}", flush=True)
        agreed, medians = _run_backend(args, methods, backend)
        ok &= agreed
        summary[backend or os.environ.get("KERAS_BACKEND", "tensorflow")] = medians
    if len(summary) > 1:
        names = list(summary)
        print("Side by side: median seconds (speed-up against plain Keras on that backend)")
        print(f"{'method':12s}" + "".join(f" {n:>22s}" for n in names))
        for method in methods:
            cells = []
            for n in names:
                med, ref = summary[n][method], summary[n][methods[0]]
                cells.append(f"{med:8.2f} s ({ref / med:5.2f}x)")
            print(f"{method:12s}" + "".join(f" {c:>22s}" for c in cells))
    return 0 if ok else 1


def _run_backend(
    args: argparse.Namespace, methods: tuple[str, ...], backend: str | None
) -> tuple[bool, dict[str, float]]:
    """Runs every method `args.repeats` times on `backend`; prints its table."""
    import numpy as np

    ref_name = methods[0]  # keras whenever it runs
    times: dict[str, list[float]] = {m: [] for m in methods}
    rss: dict[str, list[float]] = {m: [] for m in methods}
    cpus: dict[str, list[float]] = {m: [] for m in methods}
    agree: dict[str, bool] = {m: True for m in methods}
    with tempfile.TemporaryDirectory(prefix="tk-bench-") as tmp:
        for rep in range(args.repeats):
            order = methods if rep % 2 == 0 else tuple(reversed(methods))
            for method in order:
                out = Path(tmp) / f"{method}_{rep}.npz"
                got = _child(method, args.epochs, args.samples, out, backend)
                times[method].append(got["seconds"])
                rss[method].append(got["peak_rss"])
                cpus[method].append(got["cpu"])
                print(
                    f"repeat {rep + 1} {method:11s} {got['seconds']:7.2f} s "
                    f"(cpu {got['cpu']:.2f} s)",
                    flush=True,
                )
            ref = np.load(Path(tmp) / f"{ref_name}_{rep}.npz")
            for method in methods:
                mine = np.load(Path(tmp) / f"{method}_{rep}.npz")
                agree[method] &= all(
                    np.allclose(mine[k], ref[k], rtol=1e-4, atol=1e-5) for k in ref.files
                )
    base = statistics.median(times[ref_name])
    cpu_base = statistics.median(cpus[ref_name])
    print()
    print(f"{args.samples} images, {args.epochs} epochs, {args.repeats} repeat(s), median seconds")
    print(f"paired: median over repeats of seconds / {ref_name} seconds of the same repeat")
    print("90% interval: bootstrap of the ratio of median seconds; cpu: user+sys seconds")
    head = f"{'method':12s} {'seconds':>8s} {'vs ' + ref_name:>9s} {'paired':>7s}"
    head += f" {'90% interval':>14s}"
    print(f"{head} {'speed-up':>9s} {'cpu s':>7s} {'cpu vs':>7s} {'peak RSS':>10s}  weights")
    for method in methods:
        med = statistics.median(times[method])
        paired = statistics.median(
            t / k for t, k in zip(times[method], times[ref_name], strict=True)
        )
        low, high = _ratio_interval(times[method], times[ref_name])
        cpu = statistics.median(cpus[method])
        print(
            f"{method:12s} {med:8.2f} {med / base:9.3f} {paired:7.3f} "
            f"{f'{low:.3f}-{high:.3f}':>14s} {base / med:8.2f}x {cpu:7.2f} {cpu / cpu_base:7.3f} "
            f"{max(rss[method]):6.0f} MiB  {'agree' if agree[method] else 'DIFFER'}"
        )
    print()
    if "tk-nocache" in times and ref_name == "keras":
        nocache = statistics.median(times["tk-nocache"])
        print(f"tk-nocache / keras   = {nocache / base:.3f} (target <= 1.03)")
    if "tk-cache" in times:
        cached = statistics.median(times["tk-cache"])
        if ref_name == "keras":
            print(f"keras / tk-cache     = {base / cached:.2f}x (target >= 7x at 20 epochs)")
        if "by-hand" in times:
            hand = statistics.median(times["by-hand"])
            cpu_ratio = statistics.median(cpus["tk-cache"]) / statistics.median(cpus["by-hand"])
            print(
                f"tk-cache / by-hand   = {cached / hand:.3f} (target <= 0.85; "
                f"cpu seconds {cpu_ratio:.3f})"
            )
    return all(agree.values()), {m: statistics.median(times[m]) for m in methods}


def _ratio_interval(mine: list[float], ref: list[float], draws: int = 2000) -> tuple[float, float]:
    """A bootstrap 90 % interval of median(mine) / median(ref), resampling repeats as pairs."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = np.asarray(mine), np.asarray(ref)
    picks = rng.integers(0, len(a), size=(draws, len(a)))
    ratios = np.median(a[picks], axis=1) / np.median(b[picks], axis=1)
    low, high = np.quantile(ratios, [0.05, 0.95])
    return float(low), float(high)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    sys.exit(main())
