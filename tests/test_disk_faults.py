"""Hostile disks: a full filesystem, damaged checkpoint files, two writers on one directory.

The full disk is real: a small tmpfs mounted by the test (the tests run as root on our machines).
Where mounting is not allowed, or with TRANSFERKIT_TEST_FAKE_DISK=1, the same tests run against
an injected ENOSPC: every `os.fsync` of a file on the "disk" fails once the disk is "full", which
is where a real filesystem with delayed allocation reports it, and every transferkit write
flushes its file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from conftest import Pretrained, few_shot_split

import transferkit
import transferkit.results.result
import transferkit.train.checkpoints.manifest
from transferkit import CheckpointError, FineTuner, FitResult, SaveError
from transferkit.train.checkpoints.store import CheckpointStore

SRC = Path(__file__).resolve().parents[1] / "src"
FIT: dict[str, Any] = {"epochs": 4, "batch_size": 10, "shuffle": False, "verbose": 0}
PAGE = 4096

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------- helpers


def make_tuner(pretrained: Pretrained, seed: int = 7) -> FineTuner:
    keras.utils.set_random_seed(seed)
    return (
        FineTuner(pretrained.h5)
        .freeze_until("fc1")
        .replace_head(num_classes=5, hidden=(8,))
        .compile_sgd(lr=0.05)
    )


def values(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.variables]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def assert_history(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: relative path -> (bytes, mtime in ns)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp") or ".keras." in p.name]


class Batches(keras.callbacks.Callback):
    """Counts the training batches a fit ran."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.count += 1


class AtEpoch(keras.callbacks.Callback):
    """Calls `action` when epoch `epoch` (0-based) begins."""

    def __init__(self, epoch: int, action: Callable[[], None]) -> None:
        super().__init__()
        self.epoch, self.action = epoch, action

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            self.action()


def stop() -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- the small disk


class Disk:
    """A small filesystem at `path` that `fill` fills (leaving `leave` bytes) and `free` frees."""

    def __init__(self, path: Path, real: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.real = real
        self.filler = path / "filler"
        self._budget: int | None = None
        if not real:
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if self._budget is not None and self._on_disk(fd):
                    size = os.fstat(fd).st_size
                    if size > self._budget:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    self._budget -= size
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)

    def _on_disk(self, fd: int) -> bool:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        return target.startswith(str(self.path.resolve()) + os.sep) and os.path.isfile(target)

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        if not self.real:
            self._budget = leave
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            chunk = b"\0" * (1 << 16)
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            if leave:
                pages = -(-leave // PAGE)
                os.ftruncate(fd, os.fstat(fd).st_size - pages * PAGE)
        finally:
            os.close(fd)
        assert self.available() == -(-leave // PAGE) * PAGE

    def free(self) -> None:
        self._budget = None
        self.filler.unlink(missing_ok=True)


def _mount(path: Path, size: str) -> bool:
    if os.environ.get("TRANSFERKIT_TEST_FAKE_DISK") == "1" or shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """A 1 MiB tmpfs mounted for the test (an injected ENOSPC where mounting is not allowed)."""
    root = tmp_path / "disk"
    root.mkdir()
    real = _mount(root, "1m")
    try:
        yield Disk(root, real, monkeypatch)
    finally:
        if real:
            proc = subprocess.run(["umount", str(root)], capture_output=True)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", str(root)], check=True)


def test_the_disk_is_real_where_it_can_be(disk: Disk) -> None:
    # Here (root, Linux) the real path must run; elsewhere the fallback is announced.
    if os.geteuid() == 0 and os.environ.get("TRANSFERKIT_TEST_FAKE_DISK") != "1":
        assert disk.real
        assert disk.available() <= 1 << 20
    disk.fill()
    with pytest.raises(OSError) as info, open(disk.path / "x", "wb") as fh:
        fh.write(b"x" * (1 << 17))
        fh.flush()
        os.fsync(fh.fileno())
    assert info.value.errno == errno.ENOSPC
    disk.free()


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def few_shot(digits: Any) -> Data:
    return few_shot_split(digits)


@pytest.fixture(scope="module")
def reference(pretrained: Pretrained, few_shot: Data) -> tuple[list[np.ndarray], Any]:
    """An uninterrupted 4-epoch run without checkpoints."""
    x, y, _, _ = few_shot
    result = make_tuner(pretrained).fit(x, y, **FIT)
    return values(result.model), result.history


@pytest.fixture(scope="module")
def best_reference(pretrained: Pretrained, few_shot: Data) -> tuple[list[np.ndarray], Any]:
    """The same with `restore_best=True`."""
    x, y, _, _ = few_shot
    result = make_tuner(pretrained).fit(x, y, restore_best=True, **FIT)
    return values(result.model), result.history


@pytest.fixture(scope="module")
def pristine(pretrained: Pretrained, few_shot: Data, tmp_path_factory: Any) -> Path:
    """A real `restore_best` checkpoint directory after 3 of 4 epochs: two generations."""
    x, y, _, _ = few_shot
    ckpt = tmp_path_factory.mktemp("pristine") / "ckpt"
    result = make_tuner(pretrained).fit(
        x, y, checkpoint_dir=ckpt, restore_best=True, callbacks=[AtEpoch(3, stop)], **FIT
    )
    assert result.interrupted and result.epochs == 3
    return ckpt


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest_of(ckpt: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ckpt / "manifest.json").read_text())
    return data


def checksum(body: dict[str, Any]) -> str:
    """The manifest checksum, as the format defines it: SHA-256 of the canonical JSON."""
    rest = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- point 3: a full disk


@pytest.fixture(scope="module")
def two_results(pretrained: Pretrained, few_shot: Data) -> tuple[FitResult, FitResult]:
    """Two fits that predict differently: the one saved first, and the one saved over it."""
    x, y, _, _ = few_shot
    first = make_tuner(pretrained).fit(x, y, epochs=1, batch_size=25, verbose=0)
    second = make_tuner(pretrained, seed=8).fit(x, y, epochs=2, batch_size=25, verbose=0)
    return first, second


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_on_a_full_disk_keeps_the_old_file(
    two_results: tuple[FitResult, FitResult],
    few_shot: Data,
    disk: Disk,
    tmp_path: Path,
    suffix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, xt, _ = few_shot
    first, second = two_results
    path = disk.path / f"tuned{suffix}"
    first.save(path)
    old = keras.models.load_model(path).predict(xt, verbose=0)
    assert not np.allclose(old, second.predict(xt))  # else the checks below could not fail
    before = tree(disk.path)

    def unchanged() -> None:
        assert not temporaries(disk.path)
        assert tree(disk.path, skip=("filler",)) == before
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the record still matches the file it describes
            model, info = transferkit.load(path)
        np.testing.assert_array_equal(model.predict(xt, verbose=0), old)
        assert info["epochs"] == 1

    # Nothing fits: the model itself cannot be written.
    disk.fill()
    with pytest.raises(SaveError, match=f"{path.name}.*No space left on device") as info:
        second.save(path)
    assert str(path) in str(info.value) and "unchanged" in str(info.value)
    unchanged()
    disk.free()

    # The model fits, its provenance record does not: neither file is replaced.
    probe = tmp_path / f"probe{suffix}"
    second.save(probe)
    staged: list[Path] = []
    real_stage = transferkit.results.result._stage_bytes

    def spy(target: Path, data: bytes) -> Path:
        staged.append(target)
        return real_stage(target, data)

    monkeypatch.setattr(transferkit.results.result, "_stage_bytes", spy)
    disk.fill(leave=probe.stat().st_size)
    with pytest.raises(SaveError, match="No space left on device"):
        second.save(path)
    assert [p.name for p in staged] == [f"tuned{suffix}.transferkit.json"]
    unchanged()

    # With space again the same call replaces both.
    disk.free()
    second.save(path)
    np.testing.assert_allclose(
        keras.models.load_model(path).predict(xt, verbose=0), second.predict(xt), rtol=1e-6
    )
    assert not temporaries(disk.path)


def _newest_state(ckpt: Path) -> dict[str, Any]:
    """The record of the newest committed state, after checking its file against the manifest."""
    phase = manifest_of(ckpt)["phases"][0]
    record = phase["generations"][0]["state"]
    data = (ckpt / phase["name"] / record["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    with np.load(ckpt / phase["name"] / record["file"]) as npz:
        meta: dict[str, Any] = json.loads(bytes(npz["meta"]).decode())
    return meta


@pytest.mark.parametrize("fails", ["state file", "manifest"])
def test_checkpoint_on_a_full_disk_then_resume_matches_uninterrupted(
    pretrained: Pretrained,
    few_shot: Data,
    reference: Any,
    disk: Disk,
    fails: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y, _, _ = few_shot
    ref_values, ref_history = reference
    ckpt = disk.path / "ckpt"

    def fill() -> None:
        newest = manifest_of(ckpt)["phases"][0]["generations"][0]["state"]
        # "manifest": room for one more state file (its record grows by a few bytes an epoch),
        # too little for the manifest naming it.
        disk.fill(leave=newest["size"] + 64 if fails == "manifest" else 0)

    failed: list[str] = []
    calls: list[str] = []
    real_write_json = transferkit.train.checkpoints.manifest._write_json

    def spy(path: Path, data: Any) -> Any:
        calls.append(path.name)
        try:
            return real_write_json(path, data)
        except OSError:
            failed.append(path.name)
            raise

    monkeypatch.setattr(transferkit.train.checkpoints.manifest, "_write_json", spy)
    tuner = make_tuner(pretrained)
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        tuner.fit(x, y, checkpoint_dir=ckpt, callbacks=[AtEpoch(2, fill)], **FIT)
    message = str(info.value)
    assert str(ckpt) in message and "next epoch 3" in message
    assert failed == (["manifest.json"] if fails == "manifest" else [])
    # The spy saw every manifest write: the new phase, epochs 1 and 2, and epoch 3's attempt.
    assert calls == ["manifest.json"] * (4 if fails == "manifest" else 3)
    # The newest complete checkpoint is the one of epoch 2, intact; nothing half-written is left.
    assert not temporaries(ckpt)
    assert _newest_state(ckpt)["next_epoch"] == 2
    assert sorted(p.name for p in (ckpt / "fit").iterdir()) == ["1.state.npz", "2.state.npz"]

    disk.free()
    counter = Batches()
    resumed = make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, callbacks=[counter], **FIT)
    assert counter.count == 2 * 5  # epochs 3 and 4 only
    assert_same(values(resumed.model), ref_values)
    assert_history(resumed.history, ref_history)


def test_full_disk_before_the_first_commit_leaves_nothing(
    pretrained: Pretrained, few_shot: Data, reference: Any, disk: Disk
) -> None:
    x, y, _, _ = few_shot
    ckpt = disk.path / "runs" / "ckpt"
    disk.fill()
    tuner = make_tuner(pretrained)
    before = values(tuner.model)
    with pytest.raises(CheckpointError, match="no space left on device"):
        tuner.fit(x, y, checkpoint_dir=ckpt, **FIT)
    assert_same(values(tuner.model), before)
    assert not (disk.path / "runs").exists()  # the directories it created are gone again
    disk.free()
    result = make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, **FIT)
    assert_same(values(result.model), reference[0])


def test_a_finished_run_on_a_read_only_disk_returns_its_result(
    pretrained: Pretrained, few_shot: Data, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No lock can be taken where nothing can be written, and none is needed to read a result.
    x, y, _, _ = few_shot
    ckpt = disk.path / "ckpt"
    kwargs = {**FIT, "epochs": 1}
    first = make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, **kwargs)
    before = tree(ckpt)
    if disk.real:
        subprocess.run(["mount", "-o", "remount,ro", str(disk.path)], check=True)
    else:
        real_open = os.open

        def read_only(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and str(path).startswith(str(disk.path)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", read_only)
    counter = Batches()
    again = make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, callbacks=[counter], **kwargs)
    assert counter.count == 0
    assert_same(values(again.model), values(first.model))
    assert tree(ckpt) == before


# ---------------------------------------------------------------- point 4: damaged files


def _damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))


def test_each_damaged_file_resumes_equal_or_raises(
    pretrained: Pretrained, few_shot: Data, best_reference: Any, pristine: Path, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ref_values, ref_history = best_reference
    gens = manifest_of(pristine)["phases"][0]["generations"]
    newest = {"fit/" + gens[0]["state"]["file"], "fit/" + gens[0]["best"]["file"]}
    previous = {"fit/" + gens[1]["state"]["file"], "fit/" + gens[1]["best"]["file"]}
    assert len(newest | previous) == 4  # each generation has its own state and best file
    files = sorted(str(p.relative_to(pristine)) for p in pristine.rglob("*") if p.is_file())
    assert set(files) == {".lock", "manifest.json"} | newest | previous
    outcomes = {}
    # Both damages where they take different paths (a size and a checksum mismatch); one where
    # the file is not read when all goes well (the lock's content names its holder, no more).
    damages = [(name, how) for name in files for how in ("truncate", "flip")]
    for name, how in [(".lock", "truncate"), *((name, "flip") for name in sorted(previous))]:
        damages.remove((name, how))
    for name, how in damages:
        ckpt = copy_of(pristine, tmp_path / f"{name.replace('/', '_')}-{how}")
        _damage(ckpt / name, how)
        tuner = make_tuner(pretrained)
        before = values(tuner.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = tuner.fit(x, y, checkpoint_dir=ckpt, restore_best=True, **FIT)
            except CheckpointError as exc:
                assert_same(values(tuner.model), before)  # nothing damaged was loaded
                outcomes[name, how] = "error"
                assert name in str(exc) or "manifest.json" in str(exc)
                continue
        assert_same(values(result.model), ref_values)
        assert_history(result.history, ref_history)
        damaged = [w for w in caught if "damaged" in str(w.message)]
        outcomes[name, how] = "previous generation" if damaged else "equal"
        if damaged:
            assert Path(name).name in str(damaged[0].message)
    expected = {
        (name, how): "error"
        if name == "manifest.json"
        else "previous generation"
        if name in newest
        else "equal"
        for name, how in damages
    }
    assert outcomes == expected


def test_no_intact_generation_names_the_damaged_files(
    pretrained: Pretrained, few_shot: Data, pristine: Path, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ckpt = copy_of(pristine, tmp_path / "ckpt")
    gens = manifest_of(ckpt)["phases"][0]["generations"]
    _damage(ckpt / "fit" / gens[0]["state"]["file"], "flip")
    (ckpt / "fit" / gens[1]["state"]["file"]).unlink()
    before = tree(ckpt)
    tuner = make_tuner(pretrained)
    weights = values(tuner.model)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        tuner.fit(x, y, checkpoint_dir=ckpt, restore_best=True, **FIT)
    message = str(info.value)
    assert gens[0]["state"]["file"] in message and "SHA-256" in message
    assert gens[1]["state"]["file"] in message and "missing" in message
    assert "never loaded" in message and "start over" in message
    assert_same(values(tuner.model), weights)
    # Neither weights nor files changed: the run did not quietly start from scratch. (The lock
    # file, not checkpoint data, names the last process that opened the directory.)
    assert tree(ckpt, skip=(".lock",)) == {k: v for k, v in before.items() if k != ".lock"}


def _as_format_1(src: Path, dst: Path) -> Path:
    """The directory the previous release wrote for the same run: one state, no checksums."""
    manifest = manifest_of(src)
    phase = manifest["phases"][0]
    (dst / "fit").mkdir(parents=True)
    shutil.copy(src / "fit" / phase["generations"][0]["state"]["file"], dst / "fit" / "state.npz")
    shutil.copy(src / "fit" / phase["generations"][0]["best"]["file"], dst / "fit" / "best.npz")
    old = {
        "format": "transferkit.checkpoint",
        "version": 1,
        "phases": [{k: phase[k] for k in ("name", "fingerprint", "plan")}],
    }
    (dst / "manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True))
    return dst


def test_format_1_directory_resumes_and_is_upgraded(
    pretrained: Pretrained, few_shot: Data, best_reference: Any, pristine: Path, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    ref_values, ref_history = best_reference
    ckpt = _as_format_1(pristine, tmp_path / "v1")
    counter = Batches()
    result = make_tuner(pretrained).fit(
        x, y, checkpoint_dir=ckpt, restore_best=True, callbacks=[counter], **FIT
    )
    assert counter.count == 1 * 5
    assert_same(values(result.model), ref_values)
    assert_history(result.history, ref_history)
    manifest = manifest_of(ckpt)
    assert manifest["version"] == 2 and manifest["checksum"] == checksum(manifest)
    assert not (ckpt / "fit" / "state.npz").exists()  # rotated out after two more commits

    # A damaged format-1 state (no checksum to compare) is still never loaded.
    broken = _as_format_1(pristine, tmp_path / "v1-broken")
    _damage(broken / "fit" / "state.npz", "truncate")
    with pytest.raises(CheckpointError, match=r"state\.npz.*unreadable"):
        make_tuner(pretrained).fit(x, y, checkpoint_dir=broken, restore_best=True, **FIT)


def _crafted(pristine: Path) -> dict[str, bytes]:
    base = manifest_of(pristine)

    def variant(change: Callable[[dict[str, Any]], None], *, sign: bool = True) -> bytes:
        body = json.loads(json.dumps(base))
        change(body)
        if sign:  # a crafted file carries a correct checksum: the checks behind it must hold
            body["checksum"] = checksum(body)
        return json.dumps(body).encode()

    def phase(body: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = body["phases"][0]
        return entry

    def state(body: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = phase(body)["generations"][0]["state"]
        return record

    def set_at(getter: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Any:
        return lambda body: getter(body).__setitem__(key, value)

    return {
        "not JSON": b'{"format": "transferkit.checkpoint", ',
        "not UTF-8": b"\xff\xfe{}",
        "deeply nested": b"[" * 200_000,
        "a list": b"[]",
        "empty": b"",
        "digits beyond int limits": b'{"version": ' + b"9" * 5000 + b"}",
        "phases not a list": variant(lambda b: b.__setitem__("phases", "fit")),
        "phase is a string": variant(lambda b: b.__setitem__("phases", ["fit"])),
        "phase name traversal": variant(set_at(phase, "name", "../../outside")),
        "phase name absolute": variant(set_at(phase, "name", "/etc")),
        "state file traversal": variant(set_at(state, "file", "../../etc/x")),
        "state file absolute": variant(set_at(state, "file", "/etc/passwd")),
        "state file beyond serial": variant(set_at(state, "file", "999.state.npz")),
        "checksum of wrong type": variant(set_at(state, "sha256", 12)),
        "size as a string": variant(set_at(state, "size", "100")),
        "size huge": variant(set_at(state, "size", 10**30)),
        "serial huge": variant(set_at(phase, "serial", 10**30)),
        "serial a bool": variant(set_at(phase, "serial", True)),
        "serial infinite": variant(set_at(phase, "serial", float("inf"))),
        "version infinite": variant(lambda b: b.__setitem__("version", float("inf"))),
        "version newer": variant(lambda b: b.__setitem__("version", 3)),
        "fingerprint not a mapping": variant(set_at(phase, "fingerprint", [1, 2])),
        "generations not a list": variant(set_at(phase, "generations", {"a": 1})),
        "too many generations": variant(
            lambda b: phase(b).__setitem__("generations", phase(b)["generations"] * 3)
        ),
        "wrong checksum": variant(set_at(phase, "serial", 7), sign=False),
        "format 1 with traversal": variant(
            lambda b: b.update(version=1, phases=[{"name": "../x", "fingerprint": {}, "plan": {}}]),
            sign=False,
        ),
    }


def test_crafted_manifests_are_refused_without_side_effects(
    pretrained: Pretrained, few_shot: Data, pristine: Path, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    cases = _crafted(pristine)
    tuner = make_tuner(pretrained)
    weights = values(tuner.model)
    for name, content in cases.items():
        case = tmp_path / name.replace(" ", "_")
        ckpt = copy_of(pristine, case / "a" / "b" / "ckpt")
        (ckpt / "manifest.json").write_bytes(content)
        before = tree(case)
        with pytest.raises(CheckpointError) as info:
            tuner.fit(x, y, checkpoint_dir=ckpt, restore_best=True, **FIT)
        message = str(info.value)
        assert "manifest.json" in message, (name, message)
        assert tree(case) == before, name
        assert_same(values(tuner.model), weights)
    assert not (tmp_path / "outside").exists()


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _meta(**changes: Any) -> np.ndarray:
    meta = {
        "next_epoch": 3,
        "history": {"loss": [1.0, 0.9, 0.8]},
        "finished": False,
        "diverged": False,
        "model_count": 1,
        "optimizer_count": 0,
        **changes,
    }
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def test_crafted_state_files_are_refused_without_side_effects(
    pretrained: Pretrained, few_shot: Data, pristine: Path, tmp_path: Path
) -> None:
    # A crafted state file comes with a manifest that records its true checksum: what is inside
    # must still be checked before anything is loaded.
    objects = np.empty(2, dtype=object)
    objects[:] = [{"pickled": True}, print]
    cases = {
        "not a zip": (b"PK\x03\x04" + b"\0" * 64, "unreadable"),
        "pickled object array": (_npz(meta=_meta(), m0=objects), "unreadable.*allow_pickle"),
        "epoch as a string": (_npz(meta=_meta(next_epoch="3"), m0=np.zeros(2)), "'next_epoch'"),
        "negative epoch": (_npz(meta=_meta(next_epoch=-1), m0=np.zeros(2)), "'next_epoch'"),
        "huge count": (_npz(meta=_meta(model_count=10**12), m0=np.zeros(2)), "'model_count'"),
        "history of strings": (
            _npz(meta=_meta(history={"loss": ["x"]}), m0=np.zeros(2)),
            "'history'",
        ),
        "record not JSON": (
            _npz(meta=np.frombuffer(b"{oops", np.uint8), m0=np.zeros(2)),
            "unreadable",
        ),
        "weights of other shapes": (_npz(meta=_meta(), m0=np.zeros(2)), "do not fit this model"),
    }
    tuner = make_tuner(pretrained)
    weights = values(tuner.model)
    x, y, _, _ = few_shot
    for name, (content, match) in cases.items():
        ckpt = copy_of(pristine, tmp_path / name.replace(" ", "_"))
        manifest = manifest_of(ckpt)
        for gen in manifest["phases"][0]["generations"]:
            (ckpt / "fit" / gen["state"]["file"]).write_bytes(content)
            gen["state"].update(sha256=hashlib.sha256(content).hexdigest(), size=len(content))
        manifest["checksum"] = checksum(manifest)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        before = tree(ckpt, skip=(".lock",))
        with pytest.raises(CheckpointError, match=match):
            tuner.fit(x, y, checkpoint_dir=ckpt, restore_best=True, **FIT)
        assert tree(ckpt, skip=(".lock",)) == before, name
        assert_same(values(tuner.model), weights)


# ---------------------------------------------------------------- point 5: one writer


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    import keras
    from transferkit import FineTuner

    model_path, data_path, ckpt, ready = sys.argv[1:5]

    class Hold(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:  # two epochs committed: announce, then hold the directory
                Path(ready).write_text("ready")
                time.sleep(600)

    data = np.load(data_path)
    keras.utils.set_random_seed(7)
    tuner = (FineTuner(model_path).freeze_until("fc1").replace_head(num_classes=5, hidden=(8,))
             .compile_sgd(lr=0.05))
    tuner.fit(data["x"], data["y"], epochs=4, batch_size=10, shuffle=False, verbose=0,
              checkpoint_dir=ckpt, callbacks=[Hold()])
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(
    pretrained: Pretrained, few_shot: Data, reference: Any, tmp_path: Path
) -> None:
    x, y, _, _ = few_shot
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, str(script), str(pretrained.h5), str(data), str(ckpt), str(ready)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert holder.poll() is None, holder.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the holder never reached epoch 3"
            time.sleep(0.2)
        before = tree(ckpt)
        tuner = make_tuner(pretrained)
        weights = values(tuner.model)
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=f"in use by process {holder.pid}"):
            tuner.fit(x, y, checkpoint_dir=ckpt, **FIT)
        assert time.monotonic() - start < 30  # at once, not after waiting for the holder
        assert tree(ckpt) == before  # not even the holder's lock file was touched
        assert_same(values(tuner.model), weights)
    finally:
        holder.kill()  # SIGKILL: no handler runs, the lock dies with the process
        holder.communicate()
    assert holder.returncode == -9

    counter = Batches()
    resumed = make_tuner(pretrained).fit(x, y, checkpoint_dir=ckpt, callbacks=[counter], **FIT)
    assert counter.count == 2 * 5  # resumed after the holder's two committed epochs
    assert_same(values(resumed.model), reference[0])
    assert_history(resumed.history, reference[1])


def test_one_writer_within_a_process_too(pristine: Path, tmp_path: Path) -> None:
    # Two stores of one process (two threads, two notebooks cells running at once) also conflict.
    ckpt = copy_of(pristine, tmp_path / "ckpt")
    entry = manifest_of(ckpt)["phases"][0]
    with (
        CheckpointStore.open(ckpt, "fit", entry["fingerprint"], entry["plan"]),
        pytest.raises(CheckpointError, match=f"in use by process {os.getpid()}"),
    ):
        CheckpointStore.open(ckpt, "fit", entry["fingerprint"], entry["plan"])
    # Closed: the next one opens, and finds the state it left.
    with CheckpointStore.open(ckpt, "fit", entry["fingerprint"], entry["plan"]) as store:
        state = store.load(best=True)
        assert state is not None and state.next_epoch == 3 and state.best is not None
