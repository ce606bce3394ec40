"""The same fit and kriging on numpy, dask (threads) and dask.distributed.

Dask-backed residuals are fitted chunk by chunk along time and kriged lazily; the
answers must agree with the numpy path. Laziness is asserted with a scheduler that
refuses to compute.
"""

import numpy as np
import pytest
import xarray as xr

from xadapter import SpatialAdapter, datasets
from xadapter.engine.basis import subspace_distance

dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")


class _RefuseCompute:
    """A dask scheduler that fails the test on any compute (xarray's raise_if_dask_computes)."""

    def __call__(self, dsk, keys, **kwargs):
        raise AssertionError("a dask array was computed where the result should stay lazy")


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def complete_grid():
    """A gridded field with no gaps, split into fitted cells and held-out cells."""
    field = datasets.synthetic_field(n_times=120, grid=(12, 12), rank=3, seed=5)["residual"]
    cells = datasets.grid_to_cells(field)
    held = np.zeros(cells.sizes["cell"], bool)
    held[np.random.default_rng(0).choice(held.size, 24, replace=False)] = True
    return cells.isel(cell=~held), cells.isel(cell=held)


@pytest.fixture(scope="module")
def gappy_network():
    """Stations with 10 % gaps and a trend on two covariates."""
    ds = datasets.synthetic_field(n_times=90, n_stations=70, rank=3, missing=0.1, seed=7)
    rng = np.random.default_rng(1)
    covariates = xr.DataArray(rng.standard_normal((90, 70, 2)), dims=("time", "station", "feature"),
                              coords={"time": ds["time"], "station": ds["station"], "feature": ["a", "b"]})
    resid = ds["residual"] + (covariates * xr.DataArray([0.8, -0.5], dims="feature")).sum("feature")
    return resid.assign_attrs(ds["residual"].attrs), covariates


def _assert_same_model(fitted, reference, tol=1e-8):
    rank = reference.basis.sizes["mode"]
    assert subspace_distance(fitted.basis.values.reshape(-1, rank), reference.basis.values.reshape(-1, rank)) < tol
    np.testing.assert_allclose(fitted.eigenvalues.values, reference.eigenvalues.values, rtol=tol, atol=tol)
    np.testing.assert_allclose(fitted.mean.values, reference.mean.values, rtol=tol, atol=tol)
    assert fitted.effective_rank == reference.effective_rank
    assert fitted.noise_variance == pytest.approx(reference.noise_variance, rel=tol)
    fine, fine_ref = fitted.fine_scale_params, reference.fine_scale_params
    assert (fine is None) == (fine_ref is None)
    if fine is not None:
        assert fine.partial_sill == pytest.approx(fine_ref.partial_sill, rel=tol, abs=tol)
        assert fine.nugget == pytest.approx(fine_ref.nugget, rel=tol, abs=tol)
        if fine_ref.partial_sill > 1e-6 * fine_ref.sill:  # else the range is not identified
            assert fine.range_km == pytest.approx(fine_ref.range_km, rel=tol)
    if reference.calibration is not None:
        np.testing.assert_allclose(fitted.state["cv_squared_error"].values,
                                   reference.state["cv_squared_error"].values, rtol=1e-6)


def _assert_same_kriging(lazy, eager, tol=1e-8):
    for name in ("mean", "variance", "lower", "upper"):
        np.testing.assert_allclose(lazy[name].values, eager[name].values, rtol=tol, atol=tol)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_complete_field_fits_and_kriges_like_numpy(complete_grid, scheduler, request):
    train, test = complete_grid
    if scheduler == "distributed":
        request.getfixturevalue("cluster_client")
    eager = SpatialAdapter(rank=6).fit(train.isel(time=slice(0, 100)))
    eager_krige = eager.krige(train.isel(time=slice(100, None)), at=test.isel(time=0, drop=True))
    config = {"scheduler": "threads"} if scheduler == "threads" else {}
    with dask.config.set(**config):
        lazy = SpatialAdapter(rank=6).fit(train.isel(time=slice(0, 100)).chunk({"time": 25}))
        kriged = lazy.krige(train.isel(time=slice(100, None)).chunk({"time": 7}), at=test.isel(time=0, drop=True))
        assert isinstance(kriged["mean"].data, dask.array.Array)
        assert kriged["variance"].chunks[0] == (7, 7, 6)
        kriged = kriged.compute()
    _assert_same_model(lazy, eager)
    _assert_same_kriging(kriged, eager_krige)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_gaps_and_covariates_fit_and_krige_like_numpy(gappy_network, scheduler, request):
    resid, covariates = gappy_network
    if scheduler == "distributed":
        request.getfixturevalue("cluster_client")
    train, later = resid.isel(time=slice(0, 70)), resid.isel(time=slice(70, None))
    eager = SpatialAdapter(rank=5).fit(train, covariates=covariates)
    eager_krige = eager.krige(later, covariates=covariates)
    config = {"scheduler": "threads"} if scheduler == "threads" else {}
    with dask.config.set(**config):
        lazy = SpatialAdapter(rank=5).fit(train.chunk({"time": 20}), covariates=covariates)
        kriged = lazy.krige(later.chunk({"time": 8}), covariates=covariates).compute()
    _assert_same_model(lazy, eager)
    np.testing.assert_allclose(lazy.trend_coefficients.values, eager.trend_coefficients.values, rtol=1e-8)
    _assert_same_kriging(kriged, eager_krige)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_gaps_without_a_trend_fit_and_krige_like_numpy(gappy_network, scheduler, request):
    """No trend: the alternation of gap fill and basis step, its state and memory in the
    store's blocks (on disk, or on the workers), gives the numpy model."""
    resid, _ = gappy_network
    if scheduler == "distributed":
        request.getfixturevalue("cluster_client")
    train, later = resid.isel(time=slice(0, 70)), resid.isel(time=slice(70, None))
    eager = SpatialAdapter(rank=5).fit(train)
    eager_krige = eager.krige(later)
    config = {"scheduler": "threads"} if scheduler == "threads" else {}
    with dask.config.set(**config):
        lazy = SpatialAdapter(rank=5).fit(train.chunk({"time": 20}))
        kriged = lazy.krige(later.chunk({"time": 8})).compute()
    assert not eager.history.attrs["skipped_loop"]
    np.testing.assert_array_equal(lazy.history["iteration"].values, eager.history["iteration"].values)
    _assert_same_model(lazy, eager)
    _assert_same_kriging(kriged, eager_krige)


def test_kriging_dask_input_stays_lazy(complete_grid):
    train, test = complete_grid
    adapter = SpatialAdapter(rank=6).fit(train.isel(time=slice(0, 100)))
    observed = train.isel(time=slice(100, None)).chunk({"time": 5})
    with dask.config.set(scheduler=_RefuseCompute()):
        at_fitted = adapter.krige(observed)
        at_new = adapter.krige(observed, at=test.isel(time=0, drop=True), level=0.8)
    for result in (at_fitted, at_new):
        for name in ("mean", "variance", "lower", "upper"):
            assert isinstance(result[name].data, dask.array.Array), name
            assert result[name].chunks[0] == observed.chunks[0]


def test_kriged_netcdf_from_dask_equals_numpy(complete_grid, tmp_path):
    train, test = complete_grid
    adapter = SpatialAdapter(rank=6).fit(train.isel(time=slice(0, 100)))
    observed = train.isel(time=slice(100, None))
    targets = test.isel(time=0, drop=True)
    adapter.krige(observed.chunk({"time": 4}), at=targets).to_netcdf(tmp_path / "lazy.nc")
    adapter.krige(observed, at=targets).to_netcdf(tmp_path / "eager.nc")
    with xr.open_dataset(tmp_path / "lazy.nc") as lazy, xr.open_dataset(tmp_path / "eager.nc") as eager:
        for name in ("mean", "variance", "lower", "upper"):
            np.testing.assert_allclose(lazy[name].values, eager[name].values, rtol=1e-12, atol=1e-12)


def test_fit_on_an_opened_netcdf_with_time_chunks(complete_grid, tmp_path):
    train, _ = complete_grid
    data = train.isel(time=slice(0, 100))
    data.to_dataset(name="residual").to_netcdf(tmp_path / "resid.nc")
    eager = SpatialAdapter(rank=6).fit(data)
    with xr.open_dataset(tmp_path / "resid.nc", chunks={"time": 30}) as ds:
        assert isinstance(ds["residual"].data, dask.array.Array)
        lazy = SpatialAdapter(rank=6).fit(ds["residual"])
    _assert_same_model(lazy, eager)


def test_real_ozone_grid_with_fine_scale_fits_like_numpy():
    """Real data with a short-range remainder: the fine-scale fit must agree too."""
    resid = datasets.ozone_residuals(n_train=48)["residual"].isel(time=slice(0, 48))
    eager = SpatialAdapter(rank=10).fit(resid)
    assert eager.fine_scale_params.partial_sill > 0.1 * eager.fine_scale_params.sill
    with dask.config.set(scheduler="threads"):
        lazy = SpatialAdapter(rank=10).fit(resid.chunk({"time": 12}))
    _assert_same_model(lazy, eager)


def test_complete_field_with_a_trend_fits_like_numpy(gappy_network):
    resid, covariates = gappy_network
    complete = resid.fillna(0.0).isel(time=slice(0, 60))
    eager = SpatialAdapter(rank=5, site_folds=None).fit(complete, covariates=covariates)
    with dask.config.set(scheduler="threads"):
        lazy = SpatialAdapter(rank=5, site_folds=None).fit(complete.chunk({"time": 15}), covariates=covariates)
    assert not eager.history.attrs["skipped_loop"]  # the trend runs the ADMM
    _assert_same_model(lazy, eager)
    np.testing.assert_allclose(lazy.trend_coefficients.values, eager.trend_coefficients.values, rtol=1e-8)


class _LargestResult:
    """A dask callback recording the largest result of any task (bytes)."""

    def __init__(self):
        from dask.callbacks import Callback

        self.largest = 0
        outer = self

        class _Watch(Callback):
            def _posttask(self, key, result, dsk, state, id):
                outer.largest = max(outer.largest, getattr(result, "nbytes", 0))

        self.callback = _Watch()


def test_gappy_dask_fit_never_computes_the_whole_array(gappy_network):
    """Gaps and a trend run the ADMM; its state stays in time blocks: no dask task returns
    more than the bounded subsample of times the variogram reads, and the fit equals
    the numpy one."""
    from xadapter.engine.pipeline import FINE_MAX_TIMES

    resid, covariates = gappy_network
    long = xr.concat([resid] * 8, dim="time")
    long["time"] = np.arange(long.sizes["time"])
    long_covariates = xr.concat([covariates] * 8, dim="time").assign_coords(time=long["time"])
    assert long.sizes["time"] > FINE_MAX_TIMES
    eager = SpatialAdapter(rank=5, site_folds=None).fit(long, covariates=long_covariates)
    watch = _LargestResult()
    with dask.config.set(scheduler="threads"), watch.callback:
        lazy = SpatialAdapter(rank=5, site_folds=None).fit(long.chunk({"time": 60}), covariates=long_covariates)
    assert not eager.history.attrs["skipped_loop"]
    assert 0 < watch.largest <= FINE_MAX_TIMES * long.sizes["station"] * 8 < long.size * 8
    _assert_same_model(lazy, eager)
    np.testing.assert_allclose(lazy.trend_coefficients.values, eager.trend_coefficients.values, rtol=1e-8)


def test_mini_batches_of_time_chunks_equal_numpy_windows_of_the_same_rows(gappy_network):
    resid, covariates = gappy_network
    train = resid.isel(time=slice(0, 60))
    eager = SpatialAdapter(rank=4, site_folds=None, fine_scale=None, batch_size=15, tol=1e-6).fit(train)
    with dask.config.set(scheduler="threads"):
        lazy = SpatialAdapter(rank=4, site_folds=None, fine_scale=None, batch_size="chunks",
                              tol=1e-6).fit(train.chunk({"time": 15}))
    assert lazy.history.sizes["iteration"] == eager.history.sizes["iteration"] > 4
    _assert_same_model(lazy, eager)
    with pytest.raises(Exception, match="batch_size"):
        SpatialAdapter(batch_size="rows").fit(train)


def test_short_record_on_many_sites_gives_the_exact_basis():
    """More sites than the Gram path takes and fewer times than three solver blocks: the
    block eigensolver's search space exceeds the operator's rank (below T) and it stopped
    early on wrong vectors (subspace distance 2.3); such records use Lanczos."""
    from xadapter.engine.basis import LAZY_GRAM_MAX_SITES, solve_basis

    rng = np.random.default_rng(0)
    n_times, n_sites = 40, LAZY_GRAM_MAX_SITES + 1000
    patterns = np.linalg.qr(rng.standard_normal((n_sites, 2)))[0]
    data = (rng.standard_normal((n_times, 2)) * [300.0, 200.0]) @ patterns.T + rng.standard_normal((n_times, n_sites))
    exact = solve_basis(data, 8)
    with dask.config.set(scheduler="threads"):
        lazy = solve_basis(dask.array.from_array(data, chunks=(10, n_sites)), 8)
    assert subspace_distance(lazy, exact) < 1e-8
