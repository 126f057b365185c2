"""Files cross backends: what one backend writes, the other loads with the same predictions.

The suite runs on one backend (TensorFlow or JAX); each test writes its files here and a fresh
interpreter on the other backend (`KERAS_BACKEND` is fixed when Keras is first imported) loads
them and compares predictions: a fine-tuned `.keras` result (LoRA merged), an adapter file
loaded into a fresh FineTuner with the same head, and a fine-tuned Keras 2 model whose op
layers (`transferkit>TFOpLambda`) run through `keras.ops` on JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import Digits, Pretrained

from transferkit import FineTuner

SRC = Path(__file__).resolve().parents[1] / "src"
KERAS2 = Path(__file__).parent / "data" / "keras2"
OTHER = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import keras
    import numpy as np

    from transferkit import FineTuner

    d = Path(sys.argv[1])
    assert keras.backend.backend() == sys.argv[2], keras.backend.backend()
    x = np.load(d / "x.npy")
    for name in sys.argv[3:]:
        if name.endswith(".npz"):  # an adapter file: a fresh FineTuner with the same head
            tuner = FineTuner(d / "base.keras").freeze_until("fc1")
            keras.utils.set_random_seed(3)
            tuner.replace_head(num_classes=5, hidden=(8,)).lora(rank=2, targets=["fc1"])
            got = tuner.load_adapters(d / name).model.predict(x, verbose=0)
        else:
            got = keras.models.load_model(d / name).predict(x, verbose=0)
        want = np.load(d / (name + ".want.npy"))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        print("ok", name)
    """
)


def _on_the_other_backend(workdir: Path, *names: str) -> str:
    pytest.importorskip(OTHER, reason=f"the {OTHER} backend is part of the dev install")
    (workdir / "child.py").write_text(CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.update(KERAS_BACKEND=OTHER, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(workdir / "child.py"), str(workdir), OTHER, *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_a_lora_result_and_its_adapters_load_on_the_other_backend(
    pretrained: Pretrained, digits: Digits, tmp_path: Path
) -> None:
    x, y = digits.x_new[:40], digits.y_new[:40]
    keras.models.load_model(pretrained.keras_path).save(tmp_path / "base.keras")
    tuner = FineTuner(tmp_path / "base.keras").freeze_until("fc1")
    keras.utils.set_random_seed(3)
    tuner.replace_head(num_classes=5, hidden=(8,)).lora(rank=2, targets=["fc1"])
    result = tuner.compile_sgd(lr=0.1).fit(x, y, epochs=2, batch_size=10, verbose=0)
    np.save(tmp_path / "x.npy", x[:8])
    want = result.model.predict(x[:8], verbose=0)
    # The adapters trained: the tuned model predicts differently from its starting point.
    assert result.model.get_layer("fc1").lora_kernel_b.numpy().any()
    result.save(tmp_path / "tuned.keras")
    result.save_adapters(tmp_path / "adapters.npz")
    for name in ("tuned.keras", "adapters.npz"):
        np.save(tmp_path / f"{name}.want.npy", want)
    out = _on_the_other_backend(tmp_path, "tuned.keras", "adapters.npz")
    assert out.split() == ["ok", "tuned.keras", "ok", "adapters.npz"]


def test_a_fine_tuned_keras2_op_layer_model_loads_on_the_other_backend(tmp_path: Path) -> None:
    io = np.load(KERAS2 / "tf_ops_io.npz")
    tuner = FineTuner(KERAS2 / "tf_ops.h5").replace_head(num_classes=2, hidden=())
    result = tuner.compile_sgd(lr=0.05).fit(io["x"], np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    assert {"TFOpLambda", "SlicingOpLambda"} <= {type(la).__name__ for la in result.model.layers}
    result.save(tmp_path / "ops.keras")
    np.save(tmp_path / "x.npy", io["x"])
    np.save(tmp_path / "ops.keras.want.npy", result.model.predict(io["x"], verbose=0))
    assert _on_the_other_backend(tmp_path, "ops.keras").split() == ["ok", "ops.keras"]
