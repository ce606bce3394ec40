"""Streaming updates: many small updates match a full refit on all the data.

Documented tolerance (xadapter.engine.streaming): the basis span, the sample and
thresholded eigenvalues, the noise variance and the site mean agree with a full refit
to rounding (subspace distance < 1e-8, relative 1e-8); the scores of the new times are
exact; the scores of the old times, re-expressed through the old span, agree to the
noise projected on the change of span, and the effective sample size to a few percent.
"""

import numpy as np
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.engine import streaming
from xadapter.engine.basis import subspace_distance
from xadapter.engine.forecast import component_scores
from xadapter.exceptions import InputError

FIRST, STEP, TOTAL = 60, 3, 150


@pytest.fixture(scope="module")
def field():
    return datasets.synthetic_field(TOTAL, n_stations=70, rank=3, noise_sd=0.6, ar_coefficient=0.7, seed=4)["residual"]


def _streamed(field, **params):
    adapter = SpatialAdapter(rank=5, fine_scale=None, site_folds=None, streaming=True, **params)
    adapter.fit(field.isel(time=slice(0, FIRST)))
    for start in range(FIRST, TOTAL, STEP):
        adapter.update(field.isel(time=slice(start, start + STEP)))
    return adapter


def _assert_matches_refit(streamed, refit, n_eff_rtol=0.05):
    a, b = streamed.fitted, refit.fitted
    assert subspace_distance(a.basis, b.basis) < 1e-8
    np.testing.assert_allclose(a.sample_eigenvalues, b.sample_eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-8, atol=1e-10)
    assert a.low_rank_noise_variance == pytest.approx(b.low_rank_noise_variance, rel=1e-8)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-10)
    if b.n_eff is not None:
        assert a.n_eff == pytest.approx(b.n_eff, rel=n_eff_rtol)
    # canonical columns: the same vectors, not only the same span
    np.testing.assert_allclose(a.basis, b.basis, atol=1e-7)


def test_many_small_updates_match_a_full_refit(field):
    streamed = _streamed(field)
    refit = SpatialAdapter(rank=5, fine_scale=None, site_folds=None).fit(field)
    _assert_matches_refit(streamed, refit)
    assert streamed.state.sizes["time"] == TOTAL
    np.testing.assert_array_equal(streamed.state["time"].values, field["time"].values)
    # the scores of the last update are exact; older ones carry the dropped out-of-span part
    np.testing.assert_allclose(streamed.scores.values[-STEP:], refit.scores.values[-STEP:], atol=1e-8)
    # kept components: RMS error of the old scores below half the noise sd (0.6); the VAR
    # fitted on them is close to the refit's
    a, b = streamed.fitted, refit.fitted
    kept_a = component_scores(a.scores, a.rotation, a.eigenvalues)
    kept_b = component_scores(b.scores, b.rotation, b.eigenvalues)
    error = np.sqrt(((kept_a - kept_b) ** 2).mean(axis=0))
    assert np.all(error > 0) and np.all(error < 0.3), error
    np.testing.assert_allclose(a.var.coefficients, b.var.coefficients, atol=0.05)
    # kriging with the streamed adapter equals kriging with the refit
    today = field.isel(time=slice(-2, None)).where(field["station"] % 3 != 0)
    np.testing.assert_allclose(streamed.krige(today)["mean"].values, refit.krige(today)["mean"].values, atol=1e-7)


def test_updates_with_smoothness_and_the_paper_rule(field):
    refit = SpatialAdapter(rank=5, fine_scale=None, site_folds=None, tau1=50.0, gamma=0.5).fit(field)
    _assert_matches_refit(_streamed(field, tau1=50.0, gamma=0.5), refit)


def test_running_statistics_equal_the_direct_sums(field):
    data = field.values
    first = streaming.running_statistics(data[:40])
    stats = first.add(data[40:90]).add(data[90:])
    centred = data - data.mean(axis=0)
    np.testing.assert_allclose(stats.centred_gram(), centred.T @ centred, atol=1e-9)
    assert stats.centred_lag_one() == pytest.approx(np.vdot(centred[1:], centred[:-1]), rel=1e-10)
    np.testing.assert_allclose(stats.mean, data.mean(axis=0), atol=1e-12)


def test_streaming_state_round_trips_and_updates_continue(field, tmp_path):
    adapter = SpatialAdapter(rank=5, fine_scale=None, site_folds=None, streaming=True)
    adapter.fit(field.isel(time=slice(0, 100)))
    adapter.to_netcdf(tmp_path / "a.nc")
    loaded = xadapter.load(tmp_path / "a.nc")
    xr.testing.assert_identical(loaded.state.drop_attrs(), adapter.state.drop_attrs())
    np.testing.assert_array_equal(loaded.fitted.stream.gram, adapter.fitted.stream.gram)
    new = field.isel(time=slice(100, 110))
    adapter.update(new)
    loaded.update(new)
    xr.testing.assert_identical(loaded.state.drop_attrs(), adapter.state.drop_attrs())
    # a default adapter stores no Gram; its file has no stream variables
    plain = SpatialAdapter(rank=5, fine_scale=None, site_folds=None).fit(field)
    assert not [name for name in plain.state.data_vars if name.startswith("stream_")]


def test_fine_scale_and_calibration_are_kept_from_the_full_fit(field):
    adapter = SpatialAdapter(rank=5, streaming=True, site_folds=3).fit(field.isel(time=slice(0, 100)))
    fine, calibration = adapter.fitted.fine, adapter.calibration
    adapter.update(field.isel(time=slice(100, 120)))
    assert adapter.fitted.fine == fine
    xr.testing.assert_identical(adapter.calibration.drop_attrs(), calibration.drop_attrs())


def test_bad_updates_are_refused(field):
    adapter = SpatialAdapter(rank=5, fine_scale=None, site_folds=None, streaming=True)
    adapter.fit(field.isel(time=slice(0, 100)))
    before = adapter.state
    with pytest.raises(InputError, match="every fitted site"):
        adapter.update(field.isel(time=slice(100, 102), station=slice(0, 60)))
    with pytest.raises(InputError, match="complete"):
        gappy = field.isel(time=slice(100, 102)).copy()
        gappy[1, 5] = np.nan
        adapter.update(gappy)
    with pytest.raises(InputError, match="after the last fitted time"):
        adapter.update(field.isel(time=slice(90, 102)))
    moved = field.isel(time=slice(100, 102)).assign_coords(station=field["station"].values + 1000)
    with pytest.raises(InputError, match="not fitted on"):
        adapter.update(moved)
    with pytest.raises(InputError, match="units"):
        adapter.update(field.isel(time=slice(100, 102)).assign_attrs(units="degC"))
    assert adapter.state is before
    plain = SpatialAdapter(rank=5, fine_scale=None, site_folds=None).fit(field)
    with pytest.raises(InputError, match="streaming=True"):
        plain.update(field.isel(time=slice(100, 102)))


@pytest.mark.parametrize("params, match", [
    ({"tau2": 0.5}, "tau2"),
    ({"rank": "auto"}, "rank='auto'"),
    ({}, "gaps"),
])
def test_unsupported_streaming_fits_are_refused(field, params, match):
    data = field.isel(time=slice(0, 60))
    if not params:
        data = data.where(~((data["station"] == 3) & (data["time"] == data["time"][5])))
    with pytest.raises(InputError, match=match):
        SpatialAdapter(**{"rank": 5, "fine_scale": None, "streaming": True, **params}).fit(data)


def test_trend_and_too_many_sites_are_refused(field, monkeypatch):
    covariates = xr.DataArray(np.ones((60, 1)), dims=("time", "feature"),
                              coords={"time": field["time"][:60], "feature": ["one"]})
    with pytest.raises(InputError, match="trend"):
        SpatialAdapter(rank=5, fine_scale=None, streaming=True).fit(field.isel(time=slice(0, 60)), covariates=covariates)
    monkeypatch.setattr(streaming, "STREAM_MAX_SITES", 50)
    with pytest.raises(InputError, match="limited to 50 sites"):
        SpatialAdapter(rank=5, fine_scale=None, streaming=True).fit(field.isel(time=slice(0, 60)))
