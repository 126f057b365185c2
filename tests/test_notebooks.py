"""Executes the notebooks under notebooks/ top to bottom with nbclient, as a reader would.

The kernel is this interpreter (the project's venv) whatever Jupyter kernels the machine has: the
test writes a kernelspec pointing at `sys.executable` into a temporary `JUPYTER_PATH`, which
Jupyter searches first. The kernel inherits the environment, so `PYTHONPATH` (this checkout's
`src`) and `TF_ENABLE_ONEDNN_OPTS` apply. Each notebook runs in a temporary working directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "transferkit-tests"
# Each notebook must finish in under 2 minutes on 2 CPU cores (they take well under one).
BUDGET_S = 120


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "transferkit tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    src = str(ROOT / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


def test_both_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_few_shot_transfer.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} is stored with outputs: clear them before committing "
                "(jupyter nbconvert --clear-output --inplace)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, kernel: str, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=BUDGET_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    assert seconds < BUDGET_S, f"{path.name} took {seconds:.0f} s"
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    if path.stem == "01_quickstart":
        # Three learning-curve figures, one layer strip; the FineTuner's HTML table.
        assert len(images) == 4
        assert any("transferkit-summary" in o["data"]["text/html"] for o in html)
        assert (workdir / "digits_5_9.keras").is_file()
    else:
        # The accuracy bars, the learning curves and one FitResult.plot().
        assert len(images) == 3
        text = "".join(o.get("text", "") for o in outputs)
        assert text.count("test accuracy") == 8  # 2 shot counts x 4 arms
    print(f"{path.name}: {seconds:.1f} s")
