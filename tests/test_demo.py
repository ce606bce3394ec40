"""The ``xadapter demo`` command end to end: files, maps and skill at unseen cells.

One run of the installed command (a few seconds, in a subprocess and without
``--quiet``, as a user runs it) is shared by the tests of this file.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from xadapter import datasets
from xadapter.engine import metrics

N_TRAIN = 48  # months of the demo's first stage and fit


def _entry_point():
    """The installed ``xadapter`` script (the one next to this Python first), else ``python -m``."""
    script = Path(sys.executable).parent / "xadapter"
    if script.exists():
        return [str(script)]
    found = shutil.which("xadapter")
    return [found] if found else [sys.executable, "-m", "xadapter.cli"]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """The finished ``xadapter demo --out DIR`` process and its output folder."""
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run([*_entry_point(), "demo", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    return done, out


def _skill_table(stdout):
    """``{model: {column: value}}`` of the skill table the demo prints."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "RMSE"])
    columns = lines[start].split()[1:]
    table = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        # model names have spaces; the numbers are the last len(columns) fields
        fields = line.split()
        table[" ".join(fields[:-len(columns)])] = dict(zip(columns, map(float, fields[-len(columns):])))
    return table


def test_demo_exits_cleanly_and_writes_netcdf_and_png(demo_output):
    done, out = demo_output
    assert done.returncode == 0, done.stderr
    assert "error:" not in done.stderr and "Traceback" not in done.stderr
    netcdf = sorted(p.name for p in out.glob("*.nc"))
    png = sorted(p.name for p in out.glob("*.png"))
    assert len(netcdf) >= 2, netcdf
    assert len(png) >= 2, png
    # the maps the README promises: basis modes, kriged mean and variance, coverage
    assert {"ozone_basis.png", "ozone_kriged_map.png", "ozone_calibration.png"} <= set(png)
    for name in png:
        with open(out / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG file"


def test_demo_prints_a_held_out_rmse_below_the_first_stage(demo_output):
    done, out = demo_output
    assert done.returncode == 0, done.stderr
    table = _skill_table(done.stdout)
    first_stage, adapter = table["first stage alone"], table["first stage + adapter"]
    assert np.isfinite(adapter["RMSE"]) and np.isfinite(first_stage["RMSE"])
    assert adapter["RMSE"] < first_stage["RMSE"], table
    assert 0 <= adapter["cover90"] <= 1
    # the printed files are the ones written
    assert len(list(out.glob("*.nc"))) >= 2 and len(list(out.glob("*.png"))) >= 2
    for path in out.iterdir():
        assert str(path) in done.stdout


def test_demo_adapter_beats_the_first_stage_at_unseen_cells(demo_output):
    _, out = demo_output
    with xr.open_dataset(out / "ozone_kriged_cells.nc") as kriged:
        kriged = kriged.load()
    # the truth at the held-out cells, matched by the cell numbers of grid_to_cells
    cells = datasets.grid_to_cells(datasets.ozone_residuals(n_train=N_TRAIN)["residual"])
    truth = cells.sel(cell=kriged["cell"].values).isel(time=slice(N_TRAIN, None))
    np.testing.assert_allclose(truth["lat"].values, kriged["lat"].values)
    np.testing.assert_allclose(truth["lon"].values, kriged["lon"].values)
    truth = truth.transpose("time", "cell").values
    predicted = kriged["mean"].transpose("time", "cell").values
    assert np.isfinite(predicted).all()
    first_stage = metrics.rmse(truth, np.zeros_like(truth))  # the residual is the first stage's error
    adapter = metrics.rmse(truth, predicted)
    assert adapter < 0.6 * first_stage, (adapter, first_stage)


def test_demo_map_covers_the_whole_grid(demo_output):
    _, out = demo_output
    with xr.open_dataset(out / "ozone_kriged_map.nc") as maps:
        assert maps.sizes["lat"] == 24 and maps.sizes["lon"] == 24
        assert np.isfinite(maps["mean"].values).all()
        assert (maps["variance"].values > 0).all()
        assert maps["lat"].attrs.get("units") == "degrees_north"
        assert maps.attrs["Conventions"] == "CF-1.8"
        assert maps["time"].attrs["standard_name"] == "time" and maps["time"].attrs["axis"] == "T"
