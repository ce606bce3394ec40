"""Forecasting the residual field ahead: VAR on the scores, propagated variances."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.stats import norm

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.engine import forecast as fc
from xadapter.engine.geometry import local_projection_km
from xadapter.exceptions import InputError

#: True VAR(1) of the two score series: rotating, persistent, stationary.
TRUE_A = np.array([[0.75, 0.3], [-0.25, 0.7]])
TRUE_Q = np.array([[6.0, 1.0], [1.0, 3.0]])
NOISE_SD = 0.4
N_TRAIN, N_TEST = 300, 240


def _var1_field(n_times, seed=0, n_stations=90):
    """Stations whose residual is two smooth patterns with VAR(1) scores plus white noise."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(30, 45, n_stations)
    lon = rng.uniform(-110, -90, n_stations)
    xy = local_projection_km(lat, lon)
    centres = xy[rng.choice(n_stations, 2, replace=False)]
    raw = np.exp(-((xy[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * 500.0**2))
    basis = np.linalg.qr(raw)[0]
    root = np.linalg.cholesky(TRUE_Q)
    scores = np.zeros((n_times, 2))
    for t in range(1, n_times):
        scores[t] = TRUE_A @ scores[t - 1] + root @ rng.standard_normal(2)
    values = scores @ basis.T + NOISE_SD * rng.standard_normal((n_times, n_stations))
    coords = {"time": pd.date_range("2001-01-01", periods=n_times, freq="D"), "station": np.arange(n_stations),
              "lat": ("station", lat), "lon": ("station", lon)}
    return xr.DataArray(values, dims=("time", "station"), coords=coords, attrs={"units": "K"}), basis


@pytest.fixture(scope="module")
def var_case():
    field, basis = _var1_field(N_TRAIN + N_TEST, seed=3)
    adapter = SpatialAdapter(rank=4, fine_scale=None, site_folds=None).fit(field.isel(time=slice(0, N_TRAIN)))
    return field, basis, adapter


def test_var_fit_recovers_the_generating_coefficients():
    rng = np.random.default_rng(0)
    series = np.zeros((4000, 2))
    root = np.linalg.cholesky(TRUE_Q)
    for t in range(1, len(series)):
        series[t] = TRUE_A @ series[t - 1] + root @ rng.standard_normal(2)
    var = fc.fit_var(series, order=1, ridge=0.0)
    np.testing.assert_allclose(var.coefficients[0], TRUE_A, atol=0.03)
    # sampling sd of an entry: sqrt((Q_ii Q_jj + Q_ij^2) / n) <= 0.1; four of them
    np.testing.assert_allclose(var.innovation_covariance, TRUE_Q, atol=0.4)
    # ridge 0 is least squares, order 2 included
    var2 = fc.fit_var(series, order=2, ridge=0.0)
    design = np.hstack([series[1:-1], series[:-2]])
    solution = np.linalg.lstsq(design, series[2:], rcond=None)[0]
    np.testing.assert_allclose(np.concatenate(list(var2.coefficients), axis=1), solution.T, atol=1e-10)
    assert var2.spectral_radius() < 1


def test_score_forecast_matches_the_closed_form():
    var = fc.VarModel(TRUE_A[None], TRUE_Q)
    start = np.array([[2.0, -1.0]])
    mean, cov = fc.forecast_scores(var, start, 3)
    expected_cov = np.zeros((2, 2))
    for h in range(3):
        power = np.linalg.matrix_power(TRUE_A, h)
        expected_cov = expected_cov + power @ TRUE_Q @ power.T
        np.testing.assert_allclose(mean[h], np.linalg.matrix_power(TRUE_A, h + 1) @ start[0], atol=1e-12)
        np.testing.assert_allclose(cov[h], expected_cov, atol=1e-12)


def test_field_variance_is_the_diagonal_of_the_dense_forecast_covariance():
    rng = np.random.default_rng(1)
    loadings = np.linalg.qr(rng.standard_normal((30, 3)))[0]
    score_cov = np.array([[[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]]])
    mean, variance = fc.field_moments(np.ones((1, 3)), score_cov, loadings, np.zeros(30), 0.4)
    dense = loadings @ score_cov[0] @ loadings.T + 0.4 * (np.eye(30) - loadings @ loadings.T)
    np.testing.assert_allclose(variance[0], np.diag(dense), atol=1e-12)
    np.testing.assert_allclose(mean[0], loadings.sum(axis=1), atol=1e-12)


def test_forecast_beats_persistence_and_climatology_with_calibrated_intervals(var_case):
    field, _, adapter = var_case
    fitted = adapter.fitted
    test = field.values[N_TRAIN:]
    level, q = 0.9, norm.ppf(0.95)
    errors = {name: np.zeros(3) for name in ("forecast", "persistence", "climatology")}
    covered, count = np.zeros(3), 0
    for start in range(0, N_TEST - 3):
        history = (test[start:start + 1] - fitted.mean) @ fitted.kept_loadings
        mean, variance = fc.forecast_field(fitted, history, 3)
        truth = test[start + 1:start + 4]
        errors["forecast"] += ((mean - truth) ** 2).mean(axis=1)
        errors["persistence"] += ((test[start] - truth) ** 2).mean(axis=1)
        errors["climatology"] += ((fitted.mean - truth) ** 2).mean(axis=1)
        covered += (np.abs(truth - mean) <= q * np.sqrt(variance)).mean(axis=1)
        count += 1
    rmse = {name: np.sqrt(total / count) for name, total in errors.items()}
    assert np.all(rmse["forecast"] < 0.97 * rmse["persistence"]), rmse
    assert np.all(rmse["forecast"] < 0.97 * rmse["climatology"]), rmse
    coverage = covered / count
    assert np.all(np.abs(coverage - level) < 0.03), coverage
    # the forecast error grows towards climatology with the lead
    assert rmse["forecast"][0] < rmse["forecast"][1] < rmse["forecast"][2] < rmse["climatology"][2]


def test_public_forecast_matches_the_engine_and_labels_the_lead_times(var_case):
    field, _, adapter = var_case
    fitted = adapter.fitted
    out = adapter.forecast(3)
    history = fc.component_scores(fitted.scores, fitted.rotation, fitted.eigenvalues)[-1:]
    mean, variance = fc.forecast_field(fitted, history, 3)
    np.testing.assert_allclose(out["mean"].values, mean, atol=1e-12)
    np.testing.assert_allclose(out["variance"].values, variance, atol=1e-12)
    last = field["time"].values[N_TRAIN - 1]
    assert list(out["time"].values) == [last + np.timedelta64(h, "D") for h in (1, 2, 3)]
    assert list(out["step"].values) == [1, 2, 3] and out["mean"].dims == ("time", "station")
    # a start given as residuals at a later time equals starting from its projected scores
    later = field.isel(time=slice(N_TRAIN + 9, N_TRAIN + 10))
    from_field = adapter.forecast(2, start=later)
    history = (later.values - fitted.mean) @ fitted.kept_loadings
    np.testing.assert_allclose(from_field["mean"].values, fc.forecast_field(fitted, history, 2)[0], atol=1e-12)
    assert from_field["time"].values[0] == field["time"].values[N_TRAIN + 10]
    # a fitted time label as start uses the scores up to it
    label = adapter.forecast(1, start=field["time"].values[99])
    history = fc.component_scores(fitted.scores, fitted.rotation, fitted.eigenvalues)[99:100]
    np.testing.assert_allclose(label["mean"].values[0], fc.forecast_field(fitted, history, 1)[0][0], atol=1e-12)
    # gaps in the start are filled with the kriged mean
    gappy = later.copy()
    gappy[0, :10] = np.nan
    filled = adapter.forecast(1, start=gappy)
    assert np.isfinite(filled["mean"].values).all()
    assert np.abs(filled["mean"].values - from_field["mean"].values[:1]).max() < 0.5


def test_forecast_at_new_sites_and_on_a_grid(var_case):
    _, _, adapter = var_case
    grid = xr.Dataset(coords={"lat": np.linspace(31, 44, 5), "lon": np.linspace(-109, -91, 6)})
    out = adapter.forecast(2, at=grid)
    assert out["mean"].dims == ("time", "lat", "lon") and out["mean"].shape == (2, 5, 6)
    assert np.isfinite(out["variance"].values).all()
    # the grid variance is at least the remainder part at its fitted neighbours' level
    assert out["variance"].values.min() > 0.5 * adapter.noise_variance
    assert np.all(out["lower"].values < out["mean"].values)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "3"])
def test_bad_steps_are_refused(var_case, steps):
    with pytest.raises(InputError, match="steps"):
        var_case[2].forecast(steps)


def test_bad_starts_and_trend_adapters_are_refused(var_case):
    field, _, adapter = var_case
    with pytest.raises(InputError, match="not a fitted time"):
        adapter.forecast(1, start=np.datetime64("1990-01-01"))
    with pytest.raises(InputError, match="no 'time' dim"):
        adapter.forecast(1, start=field.isel(time=0))
    ds = datasets.synthetic_field(40, n_stations=30, seed=2)
    covariates = xr.DataArray(np.random.default_rng(0).standard_normal((40, 1)), dims=("time", "feature"),
                              coords={"time": ds["time"], "feature": ["x"]})
    trend = SpatialAdapter(rank=3, fine_scale=None, site_folds=None).fit(ds["residual"], covariates=covariates)
    with pytest.raises(InputError, match="trend"):
        trend.forecast(1)
    with pytest.raises(InputError, match="var_order"):
        SpatialAdapter(var_order=0).settings()


def test_forecast_round_trips_and_older_files_still_forecast(var_case, tmp_path):
    _, _, adapter = var_case
    adapter.to_netcdf(tmp_path / "a.nc")
    loaded = xadapter.load(tmp_path / "a.nc")
    xr.testing.assert_identical(loaded.state.drop_attrs(), adapter.state.drop_attrs())
    np.testing.assert_array_equal(loaded.fitted.var.coefficients, adapter.fitted.var.coefficients)
    xr.testing.assert_identical(loaded.forecast(3).drop_attrs(), adapter.forecast(3).drop_attrs())
    # a file from before forecasting (no VAR variables) refits the VAR from its scores
    old = adapter.state.drop_vars(["var_coefficients", "var_innovation_covariance"])
    old.to_netcdf(tmp_path / "old.nc")
    restored = xadapter.load(tmp_path / "old.nc")
    np.testing.assert_allclose(restored.forecast(2)["mean"].values, adapter.forecast(2)["mean"].values, atol=1e-12)


def test_cli_forecast_writes_the_public_forecast(var_case, tmp_path, capsys):
    from xadapter.cli import main

    _, _, adapter = var_case
    adapter.to_netcdf(tmp_path / "adapter.nc")
    out = tmp_path / "f.nc"
    assert main(["forecast", str(tmp_path / "adapter.nc"), "--steps", "3", "-o", str(out), "-q"]) == 0
    with xr.open_dataset(out) as written:
        np.testing.assert_array_equal(written["mean"].values, adapter.forecast(3)["mean"].values)
        np.testing.assert_array_equal(written["upper"].values, adapter.forecast(3)["upper"].values)
        assert "xadapter forecast" in written.attrs["history"]
    assert main(["forecast", str(tmp_path / "adapter.nc"), "--steps", "2", "--grid", "32:40:4,-105:-95:5",
                 "-o", str(tmp_path / "g.nc"), "-q"]) == 0
    with xr.open_dataset(tmp_path / "g.nc") as written:
        assert written["mean"].shape == (2, 3, 3) and written["lat"].attrs["units"] == "degrees_north"
    capsys.readouterr()
    assert main(["forecast", str(tmp_path / "adapter.nc"), "--steps", "0", "-o", str(tmp_path / "x.nc")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.nc").exists()
