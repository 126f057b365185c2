"""Real faults in real processes: SIGKILL mid-epoch and mid-save, and the oneDNN crash.

Each child is a fresh Python process fine-tuning a tiny model, so these tests cost a TensorFlow
import per process (a few seconds each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import keras
import numpy as np
from conftest import Digits, Pretrained

from transferkit import FineTuner

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import keras
    from transferkit import FineTuner

    model_path, data_path, ckpt, kill_after, kill_in_save, out = sys.argv[1:7]
    kill_after, kill_in_save = int(kill_after), int(kill_in_save)

    if kill_in_save >= 0:
        # Die after the new state file is fully written to its temporary name but before the
        # rename: the previous state must survive.
        real_replace, saves = os.replace, [0]

        def dying_replace(src, dst):
            if str(dst).endswith("state.npz"):
                if saves[0] == kill_in_save:
                    os.kill(os.getpid(), signal.SIGKILL)
                saves[0] += 1
            real_replace(src, dst)

        os.replace = dying_replace

    class Killer(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_begin(self, batch, logs=None):
            if self.batches == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            self.batches += 1

    data = np.load(data_path)
    keras.utils.set_random_seed(7)
    tuner = (FineTuner(model_path).freeze_until("fc1").replace_head(num_classes=5, hidden=(8,))
             .compile_sgd(lr=0.05))
    result = tuner.fit(data["x"], data["y"], epochs=4, batch_size=10, shuffle=False, verbose=0,
                       checkpoint_dir=ckpt, callbacks=[Killer()])
    np.savez(out, *[v.numpy() for v in result.model.variables])
    with open(out + ".json", "w") as fh:
        json.dump({"history": result.history, "epochs": result.epochs}, fh)
    """
)


def child_env() -> dict[str, str]:
    """The environment transferkit's own entry points run with (Makefile, conftest, CLI)."""
    env = dict(os.environ)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def run_child(script: Path, *args: Any, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def few_shot(digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(digits.y_new == c), 10, replace=False) for c in range(5)]
    )
    mask = np.zeros(len(digits.y_new), bool)
    mask[idx] = True
    return digits.x_new[mask], digits.y_new[mask]


def test_sigkill_at_random_batches_then_finish_matches_uninterrupted(
    pretrained: Pretrained, digits: Digits, tmp_path: Path
) -> None:
    x, y = few_shot(digits)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    # The uninterrupted reference, in this process, without a checkpoint_dir.
    keras.utils.set_random_seed(7)
    tuner = (
        FineTuner(pretrained.h5)
        .freeze_until("fc1")
        .replace_head(num_classes=5, hidden=(8,))
        .compile_sgd(lr=0.05)
    )
    ref = tuner.fit(x, y, epochs=4, batch_size=10, shuffle=False, verbose=0)
    ref_values = [v.numpy() for v in ref.model.variables]

    ckpt, out = tmp_path / "ckpt", str(tmp_path / "out.npz")
    rng = np.random.default_rng(2024)
    # 4 epochs x 5 batches. A kill at a random batch (mid-epoch), a kill between writing a
    # state file and renaming it into place, then a run that finishes. (Each child imports
    # TensorFlow: a second random kill adds ~20 s and no new path.)
    plan = [(int(rng.integers(1, 9)), -1), (-1, 0), (-1, -1)]
    for kill_after, kill_in_save in plan:
        proc = run_child(script, pretrained.h5, data, ckpt, kill_after, kill_in_save, out)
        if kill_after >= 0 or kill_in_save >= 0:
            assert proc.returncode == -9, proc.stderr[-3000:]
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((ckpt / "fit").glob(".*.tmp"))

    with np.load(out) as got:
        values = [got[f"arr_{i}"] for i in range(len(got.files))]
    assert len(values) == len(ref_values)
    for a, b in zip(values, ref_values, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    meta = json.loads(Path(out + ".json").read_text())
    assert meta["epochs"] == 4
    assert meta["history"].keys() == ref.history.keys()
    for key, vals in ref.history.items():
        np.testing.assert_allclose(meta["history"][key], vals, rtol=1e-5)


ONEDNN_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import keras
    if keras.backend.backend() == "torch":  # the same crash in PyTorch's oneDNN: README
        import torch
        torch.backends.mkldnn.enabled = False
    from transferkit import FineTuner

    path = sys.argv[1]
    keras.utils.set_random_seed(0)
    inp = keras.Input((60, 60, 8))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    x = keras.layers.Conv2D(16, 1, strides=2, padding="same", use_bias=False, name="shortcut")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(4, activation="softmax", name="out")(x)
    keras.Model(inp, out).save(path)

    rng = np.random.default_rng(0)
    xs = rng.normal(size=(32, 60, 60, 8)).astype("float32")
    ys = rng.integers(0, 3, 32)
    result = (FineTuner(path).freeze_until("shortcut").replace_head(num_classes=3, pool="avg")
              .compile_sgd(lr=0.01).fit(xs, ys, epochs=2, batch_size=8, verbose=0))
    assert "shortcut" not in result.provenance["frozen_layers"]
    print("finished", result.epochs, os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    """
)


def test_trainable_1x1_stride2_conv_finishes_in_a_cli_like_process(tmp_path: Path) -> None:
    # oneDNN (TensorFlow 2.20/2.21, AVX-512 CPUs) crashes training exactly this layer unless
    # TF_ENABLE_ONEDNN_OPTS=0 is set before TensorFlow is imported, as transferkit's own entry
    # points do (see the README's troubleshooting section).
    script = tmp_path / "onednn.py"
    script.write_text(ONEDNN_CHILD)
    proc = run_child(script, tmp_path / "shortcut.keras")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    expected = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0")
    assert proc.stdout.split()[-3:] == ["finished", "2", expected]
