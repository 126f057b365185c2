"""Files nobody should trust: every way file content reaches a call, tried with a crafted file.

Each crafted file is built here from a harmless one (a genuine Keras 2 fixture or a model saved
by this Keras) by editing its config, and would do something if its content were called: touch a
sentinel file, or end the process. Loading it must raise a `TransferkitError` subclass, create no
file and leave the process alive. Where the payload could end the process, the load runs in a
subprocess. Controls with `safe_mode=False` show that the crafted lambdas are live.
"""

from __future__ import annotations

import codecs
import json
import marshal
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py  # type: ignore[import-untyped]
import keras
import numpy as np
import pytest
from conftest import Digits, Pretrained

import transferkit
import transferkit.model.keras2.safety as k2
from transferkit import FineTuner, ModelLoadError, TransferkitError
from transferkit.cli import main
from transferkit.keras2 import TFOpLambda, check_op_name

KERAS2 = Path(__file__).resolve().parent / "data" / "keras2"
SRC = Path(__file__).resolve().parents[1] / "src"

Edit = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------- crafting files


def _h5_edited(src: Path, dst: Path, edit: Edit, keras_version: str | None = None) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        raw = f.attrs["model_config"]
        config = json.loads(raw.decode() if hasattr(raw, "decode") else raw)
        edit(config)
        f.attrs["model_config"] = json.dumps(config)
        if keras_version is not None:
            f.attrs["keras_version"] = keras_version
    return dst


def _keras_edited(src: Path, dst: Path, edit: Edit, keras_version: str | None = None) -> Path:
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    if keras_version is not None:
        meta = json.loads(members["metadata.json"])
        meta["keras_version"] = keras_version
        members["metadata.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return dst


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _set_op(function: str, *, only: str | None = None) -> Edit:
    """Every op layer (or the first one calling `only`) calls `tf.<function>` instead."""

    def edit(config: dict[str, Any]) -> None:
        for node in _walk(config):
            if str(node.get("class_name", "")).endswith(("TFOpLambda", "SlicingOpLambda")):
                inner = node["config"]
                if only is None or inner["function"] == only:
                    inner["function"] = function
                    if only is not None:
                        return

    return edit


def _hostile_code(sentinel: Path) -> str:
    # What Keras writes for a lambda (base64 of its marshalled code): this one touches a file.
    fn = eval(f"lambda x: (__import__('pathlib').Path({str(sentinel)!r}).touch(), x)[1]")
    return codecs.encode(marshal.dumps(fn.__code__), "base64").decode("ascii")


def _set_lambda_code(code: str, class_name: str | None = None, *, as_dict: bool = False) -> Edit:
    """Every Lambda's function becomes `code` (in the form the file uses, or Keras 3's dict
    form); optionally renamed to another class, with the Keras 2-only arguments dropped."""

    def edit(config: dict[str, Any]) -> None:
        for node in _walk(config):
            if node.get("class_name") not in ("Lambda", "transferkit>Keras2Lambda"):
                continue
            function = node["config"]["function"]
            if as_dict or not isinstance(function, list):
                node["config"]["function"] = {
                    "class_name": "__lambda__",
                    "config": {"code": code, "defaults": None, "closure": None},
                }
            else:
                node["config"]["function"] = [code, None, None]
            if class_name is not None:
                node["class_name"] = class_name
                node.pop("module", None)
                node["registered_name"] = class_name
                for arg in ("function_type", "module", "output_shape_type", "output_shape_module"):
                    node["config"].pop(arg, None)

    return edit


@pytest.fixture
def jail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory; the tests check that nothing appears in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(
    path: Path, jail: Path, match: str, *, safe_mode: bool = True, error: type = ModelLoadError
) -> str:
    before = _listing(jail)
    with pytest.raises(error, match=match) as info:
        FineTuner(path, safe_mode=safe_mode)
    assert isinstance(info.value, TransferkitError)
    assert _listing(jail) == before, "loading a refused file created files"
    return str(info.value)


def _keras3_model_with(layer: keras.layers.Layer) -> keras.Model:
    inp = keras.Input((4,), name="x")
    return keras.Model(inp, keras.layers.Dense(2, name="out")(layer(inp)), name="crafted")


# ---------------------------------------------------------------------------- op layers


# Side effects (files, printing, global state, arbitrary Python), each an exported TF name.
SIDE_EFFECT_OPS = [
    "io.write_file",
    "io.gfile.makedirs",
    "print",
    "py_function",
    "numpy_function",
    "summary.create_file_writer",
    "debugging.enable_check_numerics",
    "saved_model.save",
    "data.experimental.save",
    "config.set_visible_devices",
    "random.set_seed",
    "distribute.MirroredStrategy",
    "compat.v1.io.write_file",
    "raw_ops.WriteFile",
    "load_library",
]


@pytest.mark.parametrize("op", SIDE_EFFECT_OPS)
def test_safe_mode_refuses_an_op_layer_with_side_effects(
    op: str, jail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    real = k2._tf_symbol

    def spy(name: str) -> Any:
        resolved.append(name)
        return real(name)

    monkeypatch.setattr(k2, "_tf_symbol", spy)
    assert real(op) is not None, f"tf.{op} is not an exported name: the case tests nothing"
    path = _h5_edited(KERAS2 / "tf_ops.h5", jail / "ops.h5", _set_op(op, only="nn.relu"))
    message = _refused(path, jail, "not allowed in safe_mode")
    assert f"tf.{op}" in message and "'tf.nn.relu'" in message  # the op and the layer
    assert "safe_mode=False" in message and "ops.h5" in message
    # Refused before anything from the file was resolved, let alone called.
    assert op not in resolved


def test_safe_mode_refuses_ops_in_every_file_kind(jail: Path) -> None:
    # Keras 2 `.keras` archive (its own reader) and a Keras 3 `.keras` holding the stand-in
    # (read by Keras itself, which calls TFOpLambda.from_config).
    k2_keras = _keras_edited(
        KERAS2 / "tutorial_mobilenet.keras", jail / "k2.keras", _set_op("io.write_file")
    )
    _refused(k2_keras, jail, r"calls tf\.io\.write_file, which is not allowed in safe_mode")
    saved = jail / "k3_src.keras"
    _keras3_model_with(TFOpLambda("nn.relu", name="op")).save(saved)
    for op in ("io.write_file", "print"):
        k3 = _keras_edited(saved, jail / "k3.keras", _set_op(op))
        _refused(k3, jail, rf"'op' calls tf\.{op}, which is not allowed in safe_mode")
        # Also when a user calls Keras directly, and when the file claims to be from Keras 2.
        with pytest.raises(ModelLoadError, match="not allowed in safe_mode"):
            keras.models.load_model(k3)
        _keras_edited(saved, jail / "k3_as_k2.keras", _set_op(op), keras_version="2.15.0")
        _refused(jail / "k3_as_k2.keras", jail, "not allowed in safe_mode")
    # A Keras 3 `.h5` holding the stand-in.
    saved_h5 = jail / "k3_src.h5"
    _keras3_model_with(TFOpLambda("nn.relu", name="op")).save(saved_h5)
    _h5_edited(saved_h5, jail / "k3.h5", _set_op("summary.scalar"))
    _refused(jail / "k3.h5", jail, r"tf\.summary\.scalar, which is not allowed in safe_mode")


def test_safe_mode_false_runs_other_public_ops(jail: Path) -> None:
    # `tf.guarantee_const` (identity, but no tensor op a tutorial model holds) is outside the
    # allowlist: refused in safe mode, run when the user vouches for the file.
    path = _h5_edited(
        KERAS2 / "tf_ops.h5", jail / "ops.h5", _set_op("guarantee_const", only="nn.relu")
    )
    _refused(path, jail, r"tf\.guarantee_const, which is not allowed in safe_mode")
    io = np.load(KERAS2 / "tf_ops_io.npz")
    if keras.backend.backend() != "tensorflow":
        # Trusted or not, a TensorFlow op without a keras.ops equivalent needs TensorFlow.
        with pytest.raises(ModelLoadError, match=r"guarantee_const.*KERAS_BACKEND=tensorflow"):
            FineTuner(path, safe_mode=False)
        return
    # relu -> identity changes the output only where relu clipped; the model builds and runs.
    got = FineTuner(path, safe_mode=False).model.predict(io["x"], verbose=0)
    assert got.shape == io["y"].shape and np.isfinite(got).all()


def test_private_names_are_refused_in_any_mode_and_the_process_survives(tmp_path: Path) -> None:
    # `tf._sys.exit` ended the process inside FineTuner("file.h5"), safe_mode or not. Run in a
    # subprocess so that a regression ends it, not pytest.
    names = ["_sys.exit", "math._sys.exit", "_os._exit", "__internal__.tf2.enabled"]
    files = []
    for i, name in enumerate(names):
        files.append(_h5_edited(KERAS2 / "tf_ops.h5", tmp_path / f"h5_{i}.h5", _set_op(name)))
        files.append(
            _keras_edited(
                KERAS2 / "tutorial_mobilenet.keras", tmp_path / f"k2_{i}.keras", _set_op(name)
            )
        )
    saved = tmp_path / "k3_src.keras"
    _keras3_model_with(TFOpLambda("nn.relu", name="op")).save(saved)
    files.append(_keras_edited(saved, tmp_path / "k3.keras", _set_op("_sys.exit")))
    script = (
        "import sys, json\n"
        "from transferkit import FineTuner, ModelLoadError\n"
        "out = []\n"
        "for path in json.loads(sys.argv[1]):\n"
        "    for safe in (True, False):\n"
        "        try:\n"
        "            FineTuner(path, safe_mode=safe)\n"
        "            out.append('loaded')\n"
        "        except ModelLoadError as exc:\n"
        "            out.append(str(exc))\n"
        "print(json.dumps(out))\n"
        "print('ALIVE')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([str(f) for f in files])],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0 and "ALIVE" in done.stdout, done.stderr[-3000:]
    messages = json.loads(done.stdout.splitlines()[-2])
    assert len(messages) == 2 * len(files)
    assert all("not a public TensorFlow API name" in m for m in messages), messages


def test_legitimate_op_layers_pass_and_the_allowlist_is_real() -> None:
    # Every op the Keras 2 fixtures hold (preprocess_input, tutorial arithmetic, slicing,
    # concat, reshape, ...) is allowed in safe mode; the fixtures themselves load in
    # tests/test_loading.py under the default safe_mode.
    found = set()
    for path in KERAS2.glob("*.h5"):
        with h5py.File(path) as f:
            raw = f.attrs["model_config"]
        config = json.loads(raw.decode() if hasattr(raw, "decode") else raw)
        for node in _walk(config):
            if node.get("class_name") in ("TFOpLambda", "SlicingOpLambda"):
                found.add(node["config"]["function"])
    assert {"math.truediv", "__operators__.getitem", "concat", "reshape"} <= found
    for name in found:
        check_op_name(name, layer="x", safe_mode=True)
    # Each allowlisted name is an exported, callable TensorFlow function (no typos), and so are
    # the names of the allowed namespaces the fixtures use.
    for name in sorted(k2._SAFE_OPS):
        assert callable(k2._tf_symbol(name)), name
    for name in ("image.resize", "linalg.matmul", "signal.rfft", "nn.gelu", "math.l2_normalize"):
        check_op_name(name, layer="x", safe_mode=True)
        assert callable(k2._tf_symbol(name)), name
    # Outside a loading scope (a direct from_config) safe mode is on, as for Keras' Lambda.
    with pytest.raises(ModelLoadError, match="not allowed in safe_mode"):
        TFOpLambda.from_config({"name": "w", "function": "io.write_file"})
    assert TFOpLambda.from_config({"name": "r", "function": "nn.relu"}).function == "nn.relu"


# ------------------------------------------------------------------------------ lambdas


def test_lambda_code_is_refused_in_safe_mode_in_every_file_kind(jail: Path) -> None:
    sentinel = jail / "pwned"
    code = _hostile_code(sentinel)
    crafted = [
        _h5_edited(KERAS2 / "seq_lambda.h5", jail / "k2.h5", _set_lambda_code(code)),
        _h5_edited(KERAS2 / "lambda_tf.h5", jail / "k2_tf.h5", _set_lambda_code(code)),
        _keras_edited(KERAS2 / "lambda_tf.keras", jail / "k2.keras", _set_lambda_code(code)),
    ]
    harmless = _keras3_model_with(keras.layers.Lambda(lambda x: x * 2.0, name="lam"))
    harmless.save(jail / "k3_src.keras")
    harmless.save(jail / "k3_src.h5")
    crafted += [
        _keras_edited(jail / "k3_src.keras", jail / "k3.keras", _set_lambda_code(code)),
        # Keras 3's legacy `.h5` (CVE-2025-9905: once read without safe mode).
        _h5_edited(jail / "k3_src.h5", jail / "k3.h5", _set_lambda_code(code)),
        # A Keras 3 archive that claims to be from Keras 2 goes through transferkit's reader.
        _keras_edited(
            jail / "k3_src.keras", jail / "k3_as_k2.keras", _set_lambda_code(code), "2.15.0"
        ),
        # The Keras2Lambda stand-in (registered, so a file can name it) is a Lambda too.
        _keras_edited(
            jail / "k3_src.keras",
            jail / "stand_in.keras",
            _set_lambda_code(code, class_name="transferkit>Keras2Lambda"),
        ),
        _h5_edited(
            KERAS2 / "seq_lambda.h5",
            jail / "stand_in.h5",
            _set_lambda_code(code, class_name="transferkit>Keras2Lambda", as_dict=True),
        ),
    ]
    for path in crafted:
        _refused(path, jail, "safe_mode=False if you trust it")
        assert not sentinel.exists(), path
        with pytest.raises(ModelLoadError):
            transferkit.load(path)
    # The stand-in with Keras 2's list form is never unmarshalled (only `Lambda` is converted).
    listed = _h5_edited(
        KERAS2 / "seq_lambda.h5",
        jail / "stand_in_list.h5",
        _set_lambda_code(code, class_name="transferkit>Keras2Lambda"),
    )
    for safe_mode in (True, False):
        _refused(listed, jail, "could not load model", safe_mode=safe_mode)
        assert not sentinel.exists()
    # Controls: the crafted code is live, and runs when the user vouches for the file.
    for path in (jail / "k2.h5", jail / "k3.keras"):
        FineTuner(path, safe_mode=False)
        assert sentinel.exists(), path
        sentinel.unlink()


# ------------------------------------------------------------- module and class references

HOSTILE_REFS: list[tuple[str, dict[str, Any]]] = [
    # CVE-2025-1550: a config naming a module outside Keras.
    (
        "os.system class",
        {"module": "os", "class_name": "system", "registered_name": "system", "config": {}},
    ),
    (
        "subprocess.Popen class",
        {"module": "subprocess", "class_name": "Popen", "registered_name": None, "config": {}},
    ),
    (
        "builtins.exec function",
        {
            "module": "builtins",
            "class_name": "function",
            "config": "exec",
            "registered_name": "exec",
        },
    ),
    (
        "registered name os>system",
        {"module": "os", "class_name": "system", "registered_name": "os>system", "config": {}},
    ),
    (
        "non-modelling Keras API",
        {
            "module": "keras.utils",
            "class_name": "function",
            "config": "get_file",
            "registered_name": None,
        },
    ),
]


def _replace_dense(ref: dict[str, Any], *, as_activation: bool) -> Edit:
    def edit(config: dict[str, Any]) -> None:
        for node in _walk(config):
            if node.get("class_name") == "Dense":
                if as_activation or ref.get("class_name") == "function":
                    node["config"]["activation"] = json.loads(json.dumps(ref))
                else:
                    inner = node["config"]
                    node.clear()
                    node.update(json.loads(json.dumps(ref)))
                    node["config"] = {**ref["config"], "name": inner["name"]}
                return

    return edit


@pytest.mark.parametrize(("name", "ref"), HOSTILE_REFS, ids=[r[0] for r in HOSTILE_REFS])
def test_module_references_outside_keras_are_refused(
    name: str, ref: dict[str, Any], jail: Path
) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="crafted")
    model.save(jail / "src.keras")
    model.save(jail / "src.h5")
    for as_activation in (False, True):
        edit = _replace_dense(ref, as_activation=as_activation)
        for version in (None, "2.15.0"):  # read by Keras, or by transferkit's Keras 2 reader
            path = _keras_edited(jail / "src.keras", jail / "crafted.keras", edit, version)
            _refused(path, jail, "could not load model")
        path = _h5_edited(jail / "src.h5", jail / "crafted.h5", edit)
        _refused(path, jail, "could not load model")


def test_legacy_h5_class_names_reach_only_keras_objects(jail: Path) -> None:
    # Keras' legacy reader looks class names up in `keras.layers`' namespace, which also holds
    # functions: `deserialize` hands a nested config to the new deserializer, which must still
    # refuse a module outside Keras.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="crafted")
    model.save(jail / "src.h5")
    nested: dict[str, Any] = {
        "module": "os",
        "class_name": "system",
        "registered_name": None,
        "config": {},
    }
    for class_name, inner in (("deserialize", {"config": nested}), ("system", {})):

        def edit(config: dict[str, Any], class_name: str = class_name, inner: Any = inner) -> None:
            for node in _walk(config):
                if node.get("class_name") == "Dense":
                    node["class_name"] = class_name
                    node["config"] = dict(inner)
                    return

        for version in (None, "2.15.0"):
            path = _h5_edited(jail / "src.h5", jail / "crafted.h5", edit, version)
            _refused(path, jail, "could not load model")


# ---------------------------------------------------------------------- .npz and .json


class _Payload:
    """Unpickling this makes a directory: a pickle in an `.npz` must never be unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.target),))


def _pickled(target: Path) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(target)
    return arr


def test_adapter_files_are_read_without_pickles_and_checked(
    pretrained: Pretrained, digits: Digits, jail: Path
) -> None:
    sentinel = jail / "pwned"
    tuner = FineTuner(pretrained.keras_path).replace_head(num_classes=5).lora(rank=2)
    result = tuner.compile_sgd(lr=0.01).fit(
        digits.x_new[:32], digits.y_new[:32], epochs=1, verbose=0
    )
    good = result.save_adapters(jail / "good.npz")
    with np.load(good) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(bytes(arrays["__transferkit__"]).decode())

    def fresh() -> FineTuner:
        return FineTuner(pretrained.keras_path).replace_head(num_classes=5)

    def write(name: str, **changes: Any) -> Path:
        path = jail / name
        np.savez(path, **{**arrays, **changes})
        return path

    def header_with(**fields: Any) -> np.ndarray:
        text = json.dumps({**header, **fields}).encode()
        return np.frombuffer(text, dtype=np.uint8)

    key = header["adapters"][0]
    cases = [
        (
            write("pickled_weight.npz", **{key: _pickled(sentinel)}),
            "Object arrays cannot be loaded",
        ),
        (write("pickled_header.npz", __transferkit__=_pickled(sentinel)), "Object arrays"),
        (write("bad_rank.npz", __transferkit__=header_with(rank="2; rm -rf")), "rank"),
        (write("bad_targets.npz", __transferkit__=header_with(targets={"a": 1})), "'targets'"),
        (write("bad_base.npz", __transferkit__=header_with(base=[1, 2])), "'base'"),
        (write("list_header.npz", __transferkit__=np.frombuffer(b"[1]", np.uint8)), "not a"),
    ]
    for path, match in cases:
        target = fresh()
        before = [w.copy() for w in target.model.get_weights()]
        listing = _listing(jail)
        with pytest.raises(ModelLoadError, match=match):
            target.load_adapters(path)
        assert not sentinel.exists() and _listing(jail) == listing
        assert all((a == b).all() for a, b in zip(before, target.model.get_weights(), strict=True))
    # The genuine file still loads.
    fresh().load_adapters(good)


def test_provenance_records_are_data_only(
    pretrained: Pretrained, digits: Digits, jail: Path
) -> None:
    result = (
        FineTuner(pretrained.keras_path)
        .compile_sgd(lr=0.01)
        .fit(digits.x_new[:16], digits.y_new[:16], epochs=1, verbose=0)
    )
    path = result.save(jail / "m.keras")
    record = jail / "m.keras.transferkit.json"
    assert record.exists()
    for text, match in (
        ('{"model_file": ["rm", "-rf"]}', "'model_file' entry is not a mapping"),
        ("[" * 100_000 + "]" * 100_000, "cannot read the provenance record"),
        ('{"model_file": {"sha256": ', "cannot read the provenance record"),
        ("\"__import__('os')\"", "not a transferkit provenance record"),
    ):
        record.write_text(text)
        listing = _listing(jail)
        with pytest.raises(ModelLoadError, match=match):
            transferkit.load(path)
        assert _listing(jail) == listing


# -------------------------------------------------------------------------------- the CLI


def test_cli_reads_npz_without_pickles_and_models_in_safe_mode(
    pretrained: Pretrained, jail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = jail / "pwned"
    data = jail / "train.npz"
    np.savez(data, x=_pickled(sentinel), y=np.zeros(1))
    out = jail / "out.keras"
    code = main(["fit", str(pretrained.h5), "--data", str(data), "--out", str(out)])
    assert code == 2 and not sentinel.exists() and not out.exists()
    assert "not a readable .npz archive" in capsys.readouterr().err

    # A model with Lambda code: refused unless --unsafe, and the message says how.
    lam = jail / "lambda.keras"
    _keras3_model_with(keras.layers.Lambda(lambda x: x * 2.0, name="lam")).save(lam)
    _keras_edited(lam, lam, _set_lambda_code(_hostile_code(sentinel)))
    assert main(["inspect", str(lam)]) == 2 and not sentinel.exists()
    err = capsys.readouterr().err
    assert "safe_mode=False" in err and "--unsafe" in err
    # An op layer safe mode forbids: the same, on `fit` too.
    ops = _h5_edited(
        KERAS2 / "tf_ops.h5", jail / "ops.h5", _set_op("guarantee_const", only="nn.relu")
    )
    np.savez(data, x=np.zeros((2, 4, 5), "float32"), y=np.zeros(2))
    assert main(["fit", str(ops), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not allowed in safe_mode" in err and "--unsafe" in err and not out.exists()
    if keras.backend.backend() == "tensorflow":
        assert main(["inspect", str(ops), "--unsafe"]) == 0
    else:  # no keras.ops equivalent: the file needs the TensorFlow backend, trusted or not
        assert main(["inspect", str(ops), "--unsafe"]) == 2
        assert "KERAS_BACKEND=tensorflow" in capsys.readouterr().err
    assert main(["inspect", str(lam), "--unsafe"]) == 0 and sentinel.exists()
