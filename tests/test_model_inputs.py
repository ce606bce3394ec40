"""More input forms of SpatialAdapter: projected coordinates, CF names, trend covariates."""

import numpy as np
import pytest
import xarray as xr

from xadapter import SpatialAdapter, datasets
from xadapter.engine.admm import fit_adapter
from xadapter.exceptions import InputError


@pytest.fixture(scope="module")
def stations():
    return datasets.synthetic_field(150, n_stations=60, rank=2, score_variance=(200.0, 80.0), noise_sd=0.5, seed=4)


def test_projected_xy_and_cf_standard_names(stations):
    resid = stations["residual"]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 500_000, 60)
    y = rng.uniform(0, 400_000, 60)
    planar = resid.drop_vars(["lat", "lon"]).assign_coords(
        east=("station", x, {"standard_name": "projection_x_coordinate", "units": "m"}),
        north=("station", y, {"standard_name": "projection_y_coordinate", "units": "m"}),
    )
    adapter = SpatialAdapter(rank=3, tau1=1.0, fine_scale=None, site_folds=None).fit(planar)
    # the same sites in km give the same fit
    km = resid.drop_vars(["lat", "lon"]).assign_coords(x=("station", x / 1000, {"units": "km"}),
                                                       y=("station", y / 1000, {"units": "km"}))
    adapter_km = SpatialAdapter(rank=3, tau1=1.0, fine_scale=None, site_folds=None).fit(km)
    np.testing.assert_allclose(adapter.basis.values, adapter_km.basis.values, atol=1e-8)
    targets = xr.Dataset(coords={"site": [0, 1], "x": ("site", [100.0, 200.0], {"units": "km"}),
                                 "y": ("site", [100.0, 150.0], {"units": "km"})})
    result = adapter_km.krige(km.isel(time=slice(0, 3)), at=targets)
    assert result["mean"].dims == ("time", "site")
    assert np.isfinite(result["mean"].values).all()
    # lat/lon found through CF standard_name and units under other names
    renamed = resid.rename(lat="phi", lon="lam")
    renamed["phi"].attrs = {"standard_name": "latitude"}
    renamed["lam"].attrs = {"units": "degrees_east"}
    a = SpatialAdapter(rank=3, fine_scale=None, site_folds=None).fit(renamed)
    b = SpatialAdapter(rank=3, fine_scale=None, site_folds=None).fit(resid)
    np.testing.assert_allclose(a.basis.values, b.basis.values, atol=1e-10)


def test_time_dim_by_argument(stations):
    resid = stations["residual"].rename(time="step").assign_coords(step=np.arange(150))
    adapter = SpatialAdapter(rank=2, fine_scale=None, site_folds=None, time_dim="step").fit(resid)
    assert adapter.scores.dims == ("step", "mode")


def _covariates(resid, rng):
    """Covariates (time, station, feature) with a known effect on the residual."""
    values = rng.standard_normal((resid.sizes["time"], resid.sizes["station"], 2))
    return xr.DataArray(values, dims=("time", "station", "feature"),
                        coords={"time": resid.time, "station": resid.station, "feature": ["a", "b"]})


def test_trend_covariates_fit_and_krige(stations):
    rng = np.random.default_rng(1)
    resid = stations["residual"]
    covariates = _covariates(resid, rng)
    beta = np.array([3.0, -2.0])
    with_trend = resid + (covariates * xr.DataArray(beta, dims="feature", coords={"feature": ["a", "b"]})).sum("feature")
    with_trend.attrs = resid.attrs
    train = with_trend.isel(time=slice(0, 120))
    adapter = SpatialAdapter(rank=3, fine_scale=None, site_folds=None).fit(
        train, covariates=covariates.isel(time=slice(0, 120)))
    np.testing.assert_allclose(adapter.trend_coefficients.values, beta, atol=0.05)
    assert list(adapter.trend_coefficients["feature"].values) == ["a", "b"]
    # the same numbers as the numerical core on the equivalent arrays
    core = fit_adapter(train.values, 3, covariates=covariates.isel(time=slice(0, 120)).values)
    np.testing.assert_allclose(adapter.trend_coefficients.values, core.trend_coef, rtol=1e-10)

    test = with_trend.isel(time=slice(120, None))
    observed = test.where(test.station % 3 != 0)
    test_cov = covariates.isel(time=slice(120, None))
    result = adapter.krige(observed, covariates=test_cov)
    hidden = (test.station % 3 == 0)
    err = float(np.sqrt(((result["mean"] - test).where(hidden) ** 2).mean()))
    assert err < 1.0  # noise sd 0.5: trend and pattern restored at the hidden stations
    with pytest.raises(ValueError, match="covariates"):
        adapter.krige(observed)

    # new stations: covariates cover observed and target sites, matched by label
    new = xr.Dataset(coords={"station": [100, 101], "lat": ("station", [35.0, 40.0]),
                             "lon": ("station", [-100.0, -95.0])})
    new_cov = xr.DataArray(rng.standard_normal((30, 2, 2)), dims=("time", "station", "feature"),
                           coords={"time": test.time, "station": [100, 101], "feature": ["a", "b"]})
    both = xr.concat([test_cov, new_cov], dim="station")
    at_new = adapter.krige(observed, at=new, covariates=both)
    without = adapter.krige(observed, at=new, covariates=xr.concat([test_cov, new_cov * 0], dim="station"))
    shift = (at_new["mean"] - without["mean"]).values
    np.testing.assert_allclose(shift, new_cov.values @ adapter.trend_coefficients.values, atol=1e-8)


def test_first_stage_added_back_and_accessor_krige(stations):
    resid = stations["residual"]
    adapter = SpatialAdapter(rank=3, fine_scale=None, site_folds=None).fit(resid.isel(time=slice(0, 100)))
    observed = resid.isel(time=slice(100, 110))
    first_stage = xr.full_like(observed, 280.0)
    plain = observed.sadapter.krige(adapter)
    shifted = adapter.krige(observed, first_stage=first_stage)
    np.testing.assert_allclose((shifted["mean"] - plain["mean"]).values, 280.0)
    np.testing.assert_allclose(shifted["variance"].values, plain["variance"].values)
    with pytest.raises(ValueError, match="SpatialAdapter"):
        observed.sadapter.krige("not an adapter")


def test_covariates_as_a_dataset_of_variables_equal_the_stacked_dataarray():
    """One variable per covariate, each on its own dims (a site-only elevation next to a
    (time, station) temperature), gives the same fit as the stacked DataArray."""
    ds = datasets.synthetic_field(n_times=50, n_stations=30, rank=2, missing=0.1, seed=4)
    rng = np.random.default_rng(1)
    elevation = xr.DataArray(rng.normal(size=30), dims="station", coords={"station": ds["station"]})
    temperature = xr.DataArray(rng.normal(size=(50, 30)), dims=("time", "station"),
                               coords={"time": ds["time"], "station": ds["station"]})
    resid = ds["residual"] + 0.4 * temperature
    stacked = xr.concat([elevation.broadcast_like(temperature), temperature], dim="feature") \
        .assign_coords(feature=["elevation", "temperature"])
    settings = dict(rank=3, site_folds=None, fine_scale=None, progress=False)
    by_dataset = SpatialAdapter(**settings).fit(resid, covariates=xr.Dataset({"elevation": elevation,
                                                                                 "temperature": temperature}))
    by_array = SpatialAdapter(**settings).fit(resid, covariates=stacked)
    np.testing.assert_array_equal(by_dataset.trend_coefficients.values, by_array.trend_coefficients.values)
    assert list(by_dataset.trend_coefficients["feature"].values) == ["elevation", "temperature"]
    with pytest.raises(InputError, match="empty Dataset"):
        SpatialAdapter(**settings).fit(resid, covariates=xr.Dataset())
