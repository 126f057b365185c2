"""A table of bad inputs across the API.

Each must raise the documented `TransferkitError` subclass with a message naming the problem, and
leave the FineTuner (its attributes, its model's weights and trainable flags, its optimizer), the
FitResult's model, and every file under the test directory exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py  # type: ignore[import-untyped]
import keras
import numpy as np
import pytest
from conftest import Digits, Pretrained

import transferkit
from transferkit import (
    CheckpointError,
    ConfigError,
    DataError,
    FineTuner,
    FitResult,
    LayerNotFoundError,
    ModelLoadError,
    NotCompiledError,
    SaveError,
    TransferkitError,
)
from transferkit.model.layers import all_layers

KERAS2 = Path(__file__).resolve().parent / "data" / "keras2"


@dataclass
class Env:
    root: Path
    pretrained: Pretrained
    x: np.ndarray
    y: np.ndarray
    result: FitResult
    foreign_ckpt: Path


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    pretrained: Pretrained,
    bn_model: Pretrained,
    digits: Digits,
) -> Env:
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "notes.txt").write_text("not a model\n")
    (root / "fake.h5").write_text("plain text with an .h5 name\n")
    good_h5 = pretrained.h5.read_bytes()
    (root / "truncated.h5").write_bytes(good_h5[: len(good_h5) // 2])
    good_keras = pretrained.keras_path.read_bytes()
    (root / "truncated.keras").write_bytes(good_keras[: len(good_keras) // 2])
    _crafted_files(root, pretrained)
    (root / "a_dir").mkdir()
    (root / "a_dir" / "inside.txt").write_text("keep me")
    (root / "taken.keras").mkdir()
    x, y = digits.x_new[:40], digits.y_new[:40]
    result = FineTuner(pretrained.model).compile_sgd(lr=0.01).fit(x, y, epochs=1, verbose=0)
    result.save(root / "saved.keras")
    foreign = root / "foreign_ckpt"
    FineTuner(bn_model.model).replace_head(num_classes=5).compile_sgd(lr=0.01).fit(
        x, y, epochs=1, verbose=0, checkpoint_dir=foreign
    )
    return Env(root, pretrained, x, y, result, foreign)


def _op_file(root: Path, name: str, function: str) -> None:
    # A Keras 2 op-layer file whose `tf.nn.relu` layer names another function.
    target = root / name
    shutil.copy(KERAS2 / "tf_ops.h5", target)
    with h5py.File(target, "r+") as f:
        raw = f.attrs["model_config"]
        text = raw.decode() if hasattr(raw, "decode") else str(raw)
        f.attrs["model_config"] = text.replace('"function": "nn.relu"', f'"function": "{function}"')


def _crafted_files(root: Path, pretrained: Pretrained) -> None:
    """Files nobody should trust (see tests/test_security.py for the full set)."""
    _op_file(root, "writes_a_file.h5", "io.write_file")
    _op_file(root, "private_op.h5", "_os.getpid")
    lam = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2.0)])
    lam.save(root / "lambda.keras")
    objects = np.empty(1, dtype=object)
    objects[0] = {"pickled": True}
    np.savez(root / "pickled_adapters.npz", weights=objects)
    shutil.copy(pretrained.keras_path, root / "bad_record.keras")
    (root / "bad_record.keras.transferkit.json").write_text('{"model_file": ["rm -rf"]}')


def raw(env: Env) -> FineTuner:
    return FineTuner(env.pretrained.model)


def ready(env: Env) -> FineTuner:
    return raw(env).replace_head(num_classes=5, hidden=(8,)).compile_sgd(lr=0.01)


def ambiguous(env: Env) -> FineTuner:
    def base(name: str) -> keras.Model:
        inp = keras.Input((4,))
        return keras.Model(inp, keras.layers.Dense(4, name="inner")(inp), name=name)

    inp = keras.Input((4,))
    out = keras.layers.Dense(2, name="top")(base("left")(base("right")(inp)))
    return FineTuner(keras.Model(inp, out))


def result(env: Env) -> FitResult:
    return env.result


def nothing(env: Env) -> None:
    return None


def nan_x(env: Env) -> np.ndarray:
    x = env.x.copy()
    x[3, 2, 2, 0] = np.nan
    return x


def _signed(manifest: dict[str, Any]) -> bytes:
    # What a crafted manifest carries: a correct checksum, so the checks behind it must hold.
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({**body, "checksum": hashlib.sha256(text.encode()).hexdigest()}).encode()


def _crafted_checkpoint(env: Env, name: str, craft: Callable[[Path], None]) -> FineTuner:
    """A copy of the foreign checkpoint, changed by `craft` (made once), and a ready tuner."""
    ckpt = env.root / name
    if not ckpt.exists():
        for src in sorted(env.foreign_ckpt.rglob("*")):
            dst = ckpt / src.relative_to(env.foreign_ckpt)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_file():
                dst.write_bytes(src.read_bytes())
        craft(ckpt)
    return ready(env)


def _edit_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None], *, sign: bool) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_bytes(
        _signed(manifest) if sign else json.dumps(manifest).encode()
    )


def manifest_edited(env: Env) -> FineTuner:
    return _crafted_checkpoint(
        env,
        "edited_ckpt",
        lambda c: _edit_manifest(c, lambda m: m["phases"][0].update(serial=7), sign=False),
    )


def manifest_escapes(env: Env) -> FineTuner:
    def escape(manifest: dict[str, Any]) -> None:
        manifest["phases"][0]["generations"][0]["state"]["file"] = "../../notes.txt"

    return _crafted_checkpoint(env, "escaping_ckpt", lambda c: _edit_manifest(c, escape, sign=True))


def all_states_damaged(env: Env) -> FineTuner:
    ckpt = env.root / "damaged_ckpt"
    if not ckpt.exists():
        ready(env).fit(env.x, env.y, epochs=1, verbose=0, checkpoint_dir=ckpt)
        for state in (ckpt / "fit").glob("*.state.npz"):
            state.write_bytes(state.read_bytes()[:100])
    return ready(env)


Case = tuple[str, Callable[[Env], Any], Callable[[Any, Env], Any], type[Exception], str]

CASES: list[Case] = [
    # --- layer references and selectors
    (
        "unknown name",
        raw,
        lambda t, e: t.freeze_until("fc9"),
        LayerNotFoundError,
        "no layer named 'fc9'.*closest.*'fc1'",
    ),
    (
        "index too high",
        raw,
        lambda t, e: t.freeze_until(12),
        LayerNotFoundError,
        "index 12 is out of range.*-8..7",
    ),
    (
        "index too low",
        raw,
        lambda t, e: t.freeze_until(-20),
        LayerNotFoundError,
        "index -20 is out of range",
    ),
    (
        "ambiguous nested name",
        ambiguous,
        lambda t, e: t.freeze_until("inner"),
        LayerNotFoundError,
        "'inner' is ambiguous",
    ),
    (
        "empty glob",
        raw,
        lambda t, e: t.freeze("block9_*"),
        LayerNotFoundError,
        "pattern 'block9_\\*' matches no layer",
    ),
    (
        "class not in model",
        raw,
        lambda t, e: t.unfreeze(keras.layers.LSTM),
        LayerNotFoundError,
        "LSTM matches no layer",
    ),
    (
        "unknown unfreeze name",
        raw,
        lambda t, e: t.unfreeze("conv9"),
        LayerNotFoundError,
        "no layer named 'conv9'",
    ),
    (
        "float reference",
        raw,
        lambda t, e: t.freeze_until(2.5),
        ConfigError,
        "layer reference must be a name.*float",
    ),
    # --- head
    (
        "head without kind",
        raw,
        lambda t, e: t.replace_head(),
        ConfigError,
        "needs num_classes=N.*or regression=True",
    ),
    (
        "head with both kinds",
        raw,
        lambda t, e: t.replace_head(5, regression=True),
        ConfigError,
        "both regression=True and num_classes",
    ),
    (
        "one class",
        raw,
        lambda t, e: t.replace_head(num_classes=1),
        ConfigError,
        "num_classes must be an int >= 2, got 1",
    ),
    (
        "negative classes",
        raw,
        lambda t, e: t.replace_head(num_classes=-3),
        ConfigError,
        "num_classes must be an int >= 2, got -3",
    ),
    (
        "zero outputs",
        raw,
        lambda t, e: t.replace_head(regression=True, outputs=0),
        ConfigError,
        "outputs must be an int >= 1, got 0",
    ),
    (
        "zero hidden size",
        raw,
        lambda t, e: t.replace_head(5, hidden=(0,)),
        ConfigError,
        "hidden layer sizes must be ints >= 1",
    ),
    (
        "negative hidden size",
        raw,
        lambda t, e: t.replace_head(5, hidden=(16, -4)),
        ConfigError,
        "hidden layer sizes.*\\(16, -4\\)",
    ),
    (
        "dropout above 1",
        raw,
        lambda t, e: t.replace_head(5, dropout=1.5),
        ConfigError,
        "dropout must be a number in \\[0, 1\\), got 1.5",
    ),
    (
        "head at unknown layer",
        raw,
        lambda t, e: t.replace_head(5, at="nope"),
        LayerNotFoundError,
        "no layer named 'nope'",
    ),
    (
        "unknown pool",
        raw,
        lambda t, e: t.replace_head(5, pool="median"),
        ConfigError,
        "pool must be one of .*'median'",
    ),
    (
        "unknown activation",
        raw,
        lambda t, e: t.replace_head(5, activation="wiggle"),
        ConfigError,
        "unknown activation 'wiggle'",
    ),
    # --- compiling
    (
        "zero learning rate",
        raw,
        lambda t, e: t.compile_sgd(lr=0),
        ConfigError,
        "lr must be a finite number > 0, got 0",
    ),
    (
        "negative learning rate",
        raw,
        lambda t, e: t.compile_sgd(lr=-1e-3),
        ConfigError,
        "lr must be a finite number > 0",
    ),
    ("momentum of 1", raw, lambda t, e: t.compile_sgd(momentum=1.0), ConfigError, "momentum"),
    (
        "logits loss on softmax",
        raw,
        lambda t, e: t.compile(
            "sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        ),
        ConfigError,
        "already applies softmax.*from_logits=True",
    ),
    (
        "fit before compile",
        raw,
        lambda t, e: t.fit(e.x, e.y),
        NotCompiledError,
        "not compiled.*compile_sgd",
    ),
    # --- data
    (
        "missing channel axis",
        ready,
        lambda t, e: t.fit(e.x[..., 0], e.y, verbose=0),
        DataError,
        "input shape does not match.*channel axis",
    ),
    (
        "wrong image size",
        ready,
        lambda t, e: t.fit(np.zeros((40, 9, 9, 1), "float32"), e.y, verbose=0),
        DataError,
        "expected \\(None, 8, 8, 1\\), got \\(None, 9, 9, 1\\)",
    ),
    (
        "labels above range",
        ready,
        lambda t, e: t.fit(e.x, e.y + 5, verbose=0),
        DataError,
        "labels must lie in 0..4",
    ),
    (
        "negative labels",
        ready,
        lambda t, e: t.fit(e.x, -e.y - 1, verbose=0),
        DataError,
        "labels must lie in 0..4",
    ),
    (
        "one-hot of wrong width",
        ready,
        lambda t, e: t.fit(e.x, np.eye(7)[e.y], verbose=0),
        DataError,
        "1-D array of class ids, got shape \\(40, 7\\)",
    ),
    (
        "NaN in inputs",
        ready,
        lambda t, e: t.fit(nan_x(e), e.y, verbose=0),
        DataError,
        "1 NaN or infinite",
    ),
    (
        "x/y length mismatch",
        ready,
        lambda t, e: t.fit(e.x, e.y[:-3], verbose=0),
        DataError,
        "x has 40 samples but y has 37",
    ),
    (
        "empty data",
        ready,
        lambda t, e: t.fit(e.x[:0], e.y[:0], verbose=0),
        DataError,
        "data is empty",
    ),
    ("no data", ready, lambda t, e: t.fit(None, verbose=0), DataError, "no data given"),
    (
        "bad validation data",
        ready,
        lambda t, e: t.fit(e.x, e.y, validation_data=(e.x[..., 0], e.y), verbose=0),
        DataError,
        "validation data: input shape",
    ),
    (
        "zero batch size",
        ready,
        lambda t, e: t.fit(e.x, e.y, batch_size=0, verbose=0),
        ConfigError,
        "batch_size must be an int >= 1, got 0",
    ),
    (
        "zero epochs",
        ready,
        lambda t, e: t.fit(e.x, e.y, epochs=0, verbose=0),
        ConfigError,
        "epochs must be an int >= 1, got 0",
    ),
    (
        "negative epochs",
        ready,
        lambda t, e: t.fit(e.x, e.y, epochs=-2, verbose=0),
        ConfigError,
        "epochs must be an int >= 1, got -2",
    ),
    # --- checkpoints
    (
        "checkpoint of another model",
        ready,
        lambda t, e: t.fit(e.x, e.y, epochs=1, verbose=0, checkpoint_dir=e.foreign_ckpt),
        CheckpointError,
        "different model.*architecture",
    ),
    (
        "checkpoint_dir is a file",
        ready,
        lambda t, e: t.fit(e.x, e.y, verbose=0, checkpoint_dir=e.root / "notes.txt"),
        CheckpointError,
        "is a file",
    ),
    (
        "checkpoint_dir is someone's folder",
        ready,
        lambda t, e: t.fit(e.x, e.y, verbose=0, checkpoint_dir=e.root / "a_dir"),
        CheckpointError,
        "not a transferkit checkpoint",
    ),
    (
        "checkpoint manifest edited",
        manifest_edited,
        lambda t, e: t.fit(e.x, e.y, epochs=1, verbose=0, checkpoint_dir=e.root / "edited_ckpt"),
        CheckpointError,
        "manifest.json.*damaged.*checksum does not match",
    ),
    (
        "checkpoint manifest names a file outside",
        manifest_escapes,
        lambda t, e: t.fit(e.x, e.y, epochs=1, verbose=0, checkpoint_dir=e.root / "escaping_ckpt"),
        CheckpointError,
        "'../../notes.txt'.*is not allowed",
    ),
    (
        "checkpoint with every state damaged",
        all_states_damaged,
        lambda t, e: t.fit(e.x, e.y, epochs=1, verbose=0, checkpoint_dir=e.root / "damaged_ckpt"),
        CheckpointError,
        "no intact checkpoint.*state.npz.*bytes where",
    ),
    # --- model files
    (
        "missing model file",
        nothing,
        lambda t, e: FineTuner(e.root / "missing.h5"),
        ModelLoadError,
        "not found.*missing.h5",
    ),
    (
        "text file as model",
        nothing,
        lambda t, e: FineTuner(e.root / "notes.txt"),
        ModelLoadError,
        "unsupported model file.*'.txt'",
    ),
    (
        "text file named .h5",
        nothing,
        lambda t, e: FineTuner(e.root / "fake.h5"),
        ModelLoadError,
        "not an HDF5 file",
    ),
    (
        "truncated .h5",
        nothing,
        lambda t, e: FineTuner(e.root / "truncated.h5"),
        ModelLoadError,
        "could not load model from .*truncated.h5",
    ),
    (
        "truncated .keras",
        nothing,
        lambda t, e: FineTuner(e.root / "truncated.keras"),
        ModelLoadError,
        "truncated.keras.*not a valid `.keras` archive",
    ),
    (
        "directory as model",
        nothing,
        lambda t, e: FineTuner(e.root / "a_dir"),
        ModelLoadError,
        "is a directory",
    ),
    # --- files nobody should trust
    (
        "op layer with a side effect",
        nothing,
        lambda t, e: FineTuner(e.root / "writes_a_file.h5"),
        ModelLoadError,
        r"'tf.nn.relu' calls tf.io.write_file, which is not allowed in safe_mode.*safe_mode=False",
    ),
    (
        "op layer naming a private name",
        nothing,
        lambda t, e: FineTuner(e.root / "private_op.h5", safe_mode=False),
        ModelLoadError,
        "tf._os.getpid, which is not a public TensorFlow API name",
    ),
    (
        "Lambda code in safe mode",
        nothing,
        lambda t, e: FineTuner(e.root / "lambda.keras"),
        ModelLoadError,
        "Lambda.*safe_mode=False if you trust it",
    ),
    (
        "pickled adapter file",
        raw,
        lambda t, e: t.load_adapters(e.root / "pickled_adapters.npz"),
        ModelLoadError,
        "cannot read adapter file .*Object arrays cannot be loaded",
    ),
    (
        "damaged provenance record",
        nothing,
        lambda t, e: transferkit.load(e.root / "bad_record.keras"),
        ModelLoadError,
        "bad_record.keras.transferkit.json.* is damaged",
    ),
    (
        "number as model",
        nothing,
        lambda t, e: FineTuner(42),
        ConfigError,
        "keras.Model or the path.*int",
    ),
    (
        "unknown batchnorm policy",
        nothing,
        lambda t, e: FineTuner(e.pretrained.model, batchnorm="sometimes"),
        ConfigError,
        "unknown batchnorm policy 'sometimes'",
    ),
    (
        "load a text file",
        nothing,
        lambda t, e: transferkit.load(e.root / "notes.txt"),
        ModelLoadError,
        "unsupported model file",
    ),
    # --- saving
    (
        "save into missing directory",
        result,
        lambda r, e: r.save(e.root / "missing" / "m.keras"),
        SaveError,
        "directory .*missing.* does not exist",
    ),
    (
        "save onto a directory",
        result,
        lambda r, e: r.save(e.root / "taken.keras"),
        SaveError,
        "is a directory",
    ),
    (
        "save below a file",
        result,
        lambda r, e: r.save(e.root / "notes.txt" / "m.keras"),
        SaveError,
        "does not exist",
    ),
    (
        "save to unwritable place",
        result,
        lambda r, e: r.save("/proc/transferkit_model.keras"),
        SaveError,
        "cannot save to '/proc/transferkit_model.keras'",
    ),
    (
        "save with wrong suffix",
        result,
        lambda r, e: r.save(e.root / "saved.txt"),
        ConfigError,
        "must end in .keras or .h5",
    ),
]


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


def _snapshot(subject: Any, env: Env) -> dict[str, Any]:
    snap: dict[str, Any] = {"files": _files(env.root)}
    model = getattr(subject, "model", None)
    if isinstance(subject, FineTuner):
        snap["attrs"] = {
            k: v if isinstance(v, (str, bool, int, tuple, frozenset, Path, type(None))) else id(v)
            for k, v in vars(subject).items()
        }
        snap["optimizer"] = id(getattr(model, "optimizer", None))
    if model is not None:
        snap["weights"] = [v.numpy().tobytes() for v in model.variables]
        snap["flags"] = [(layer.name, layer.trainable) for layer in all_layers(model)]
    return snap


@pytest.mark.parametrize(
    ("name", "setup", "action", "error", "match"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input(
    env: Env,
    name: str,
    setup: Callable[[Env], Any],
    action: Callable[[Any, Env], Any],
    error: type[Exception],
    match: str,
) -> None:
    subject = setup(env)
    before = _snapshot(subject, env)
    with pytest.raises(error, match=match) as info:
        action(subject, env)
    assert isinstance(info.value, TransferkitError)
    assert _snapshot(subject, env) == before


def test_the_table_is_wide() -> None:
    assert len(CASES) >= 25
    assert {c[3] for c in CASES} >= {
        LayerNotFoundError,
        ConfigError,
        DataError,
        ModelLoadError,
        NotCompiledError,
        SaveError,
        CheckpointError,
    }
