"""Every notebook of ``notebooks/`` runs from top to bottom without an error.

The notebooks are stored without outputs; here they are executed with nbclient on the
``python3`` kernel of the environment running the tests, with a time limit per cell.
"""

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: Seconds a single cell may take (the slowest, a rank or smoothness search, takes ~15 s).
CELL_TIMEOUT = 300

NAMES = [
    "01_quickstart.ipynb",
    "02_station_network.ipynb",
    "03_dask_and_distributed.ipynb",
    "04_rank_and_smoothness.ipynb",
    "05_binary_forecast_streaming.ipynb",
]


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: strip the outputs before committing"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel must import the xadapter under test, from the interpreter running pytest
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name} failed:\n{error}")
    print(f"{name}: {time.perf_counter() - start:.1f} s")
