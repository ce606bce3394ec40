"""The ``xadapter demo`` command end to end: files, maps and skill at unseen cells.

One demo run (a few seconds) is shared by the tests of this file.
"""

import numpy as np
import pytest
import xarray as xr

from xadapter import cli, datasets
from xadapter.engine import metrics

N_TRAIN = 48  # months of the demo's first stage and fit


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = cli.main(["demo", "--out", str(out), "--quiet"])
    return status, out


def test_demo_exits_cleanly_and_writes_netcdf_and_png(demo_output):
    status, out = demo_output
    assert status == 0
    netcdf = sorted(p.name for p in out.glob("*.nc"))
    png = sorted(p.name for p in out.glob("*.png"))
    assert len(netcdf) >= 2, netcdf
    assert len(png) >= 2, png
    # the maps the README promises: basis modes, kriged mean and variance, coverage
    assert {"ozone_basis.png", "ozone_kriged_map.png", "ozone_calibration.png"} <= set(png)
    for name in png:
        with open(out / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG file"


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
