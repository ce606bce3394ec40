"""What a user reads: error messages with plain names, warnings pointing at the user's line."""

import warnings

import numpy as np
import pytest
import xarray as xr

from xadapter import SpatialAdapter, datasets
from xadapter.exceptions import InputError


@pytest.fixture(scope="module")
def trended():
    ds = datasets.synthetic_field(n_times=60, n_stations=40, rank=2, seed=3)
    rng = np.random.default_rng(0)
    covariates = xr.DataArray(rng.standard_normal((60, 40, 2)), dims=("time", "station", "feature"),
                              coords={"time": ds["time"], "station": ds["station"],
                                      "feature": np.array(["elevation", "hour_sin"])})
    resid = ds["residual"] + 0.5 * covariates.sel(feature="elevation", drop=True)
    resid.attrs = ds["residual"].attrs
    adapter = SpatialAdapter(rank=3, site_folds=None, fine_scale=None).fit(resid, covariates=covariates)
    return ds, resid, covariates, adapter


def test_feature_mismatch_names_features_plainly(trended):
    _, resid, covariates, adapter = trended
    other = covariates.assign_coords(feature=np.array(["elevation", "slope"]))
    with pytest.raises(InputError) as error:
        adapter.krige(resid.isel(time=slice(50, None)), covariates=other)
    message = str(error.value)
    assert "['elevation', 'hour_sin']" in message and "['elevation', 'slope']" in message
    assert "np.str_" not in message


def test_covariates_missing_at_targets_names_the_targets(trended):
    ds, resid, covariates, adapter = trended
    targets = xr.Dataset(coords={"site": [0, 1], "lat": ("site", [35.0, 40.0]), "lon": ("site", [-100.0, -95.0])})
    with pytest.raises(InputError, match="kriging targets") as error:
        adapter.krige(resid.isel(time=slice(50, None)), at=targets, covariates=covariates)
    assert "residuals" not in str(error.value)


def test_unknown_sites_are_named_plainly(trended):
    _, resid, _, adapter = trended
    stranger = resid.isel(time=slice(50, None)).assign_coords(station=resid["station"].values + 1000)
    with pytest.raises(InputError, match=r"e\.g\. \[1000, 1001") as error:
        adapter.krige(stranger, covariates=None)
    assert "np.int" not in str(error.value)


def test_warnings_point_at_the_callers_line():
    ds = datasets.synthetic_field(n_times=40, n_stations=30, rank=2, missing=0.2, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SpatialAdapter(rank=5, max_iter=2, min_iter=0, site_folds=None, fine_scale=None).fit(ds["residual"])
    admm = [w for w in caught if "stopping rule" in str(w.message)]
    assert admm, [str(w.message) for w in caught]
    assert admm[0].filename == __file__
    assert "SpatialAdapter(max_iter=..., tol=...)" in str(admm[0].message)


def test_kriged_variables_are_read_by_key(trended):
    """``mean`` is also a Dataset method: the kriged fields are read as ``out["mean"]``."""
    _, resid, covariates, adapter = trended
    out = adapter.krige(resid.isel(time=slice(50, None)), covariates=covariates)
    assert set(out.data_vars) == {"mean", "variance", "lower", "upper"}
    assert isinstance(out["mean"], xr.DataArray) and callable(out.mean)
    np.testing.assert_allclose(out["upper"] - out["mean"], out["mean"] - out["lower"], atol=1e-10)


def test_kriged_coordinates_keep_their_attributes(trended):
    _, resid, covariates, adapter = trended
    out = adapter.krige(resid.isel(time=slice(50, None)), covariates=covariates)
    assert out["lat"].attrs.get("units") == "degrees_north"
    assert out["lon"].attrs.get("units") == "degrees_east"
