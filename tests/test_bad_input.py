"""The bad-input matrix: every wrong input fails loudly with a typed error naming the
problem and the fix; imprecise but usable input is accepted (with a warning where the
fit changes what it uses). No failing call modifies its inputs or leaves files behind.
"""

import os
import re
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.engine.basis import subspace_distance
from xadapter.engine.covariance import ORTHONORMAL_MAX_DEVIATION, low_rank_plus_noise
from xadapter.engine.penalty import THIN_PLATE_MAX_SITES
from xadapter.exceptions import (
    CoordinateError,
    DuplicateSiteError,
    InputError,
    MissingCoordinateError,
    ProblemTooLargeError,
)

FAST = dict(rank=3, fine_scale=None, site_folds=None)


@pytest.fixture(scope="module")
def field():
    return datasets.synthetic_field(40, n_stations=20, rank=2, noise_sd=0.5, seed=3)["residual"]


@pytest.fixture(scope="module")
def adapter(field):
    return SpatialAdapter(**FAST).fit(field)


@pytest.fixture(autouse=True)
def in_empty_folder(tmp_path, monkeypatch):
    """Run every test in an empty folder; nothing may be left in it but what the test wrote."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _refused(call, obj, error, *patterns):
    """``call(obj)`` raises ``error`` whose message contains every regex in ``patterns``,
    ``obj`` is unchanged (values, coords, attrs) and no file was written."""
    before = obj.copy(deep=True)
    with pytest.raises(error) as info:
        call(obj)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    xr.testing.assert_identical(obj, before)
    assert os.listdir(".") == []
    return message


@contextmanager
def _unchanged(*objects):
    """The block leaves every xarray object in ``objects`` as it was (values, coords, attrs)."""
    before = [obj.copy(deep=True) for obj in objects]
    yield
    for obj, copy in zip(objects, before):
        xr.testing.assert_identical(obj, copy)


def _fit(**params):
    return lambda data: SpatialAdapter(**{**FAST, **params}).fit(data)


def _with_coord(field, name, index, value):
    values = field[name].values.copy()
    values[index] = value
    return field.assign_coords({name: ("station", values, field[name].attrs)})


# ------------------------------------------------------------------ coordinates


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_coordinates(field, value):
    bad = _with_coord(field, "lat", 2, value)
    _refused(_fit(), bad, CoordinateError, r"latitude is NaN or infinite at site indices \[2\]", "drop those sites")
    bad = _with_coord(field, "lon", 5, value)
    _refused(_fit(), bad, CoordinateError, r"longitude is NaN or infinite at site indices \[5\]")


def test_latitude_out_of_range(field):
    bad = _with_coord(field, "lat", 4, 95.0)
    _refused(_fit(), bad, CoordinateError, r"latitude out of range \[-90, 90\]", r"\[4\]", "swapped")


def test_longitude_out_of_range(field):
    bad = _with_coord(field, "lon", 1, 400.0)
    _refused(_fit(), bad, CoordinateError, r"longitude out of range \[-360, 360\]", r"\[1\]", "degrees")
    # both conventions and the limits themselves are fine
    shifted = field.assign_coords(lon=("station", field["lon"].values + 360.0))
    assert SpatialAdapter(**FAST).fit(shifted).is_fitted


def test_duplicate_sites(field):
    bad = _with_coord(_with_coord(field, "lat", 7, field["lat"].values[3]), "lon", 7, field["lon"].values[3])
    _refused(_fit(), bad, DuplicateSiteError, r"\(3, 7\)", "average or drop")


def test_at_without_coordinates(adapter, field):
    observed = field.isel(time=slice(0, 3)).where(field.station % 3 != 0)
    # `_refused` checks `at`; the observations must come out untouched as well
    with _unchanged(observed, field):
        for at in (xr.Dataset(coords={"site": [0, 1]}), xr.DataArray(np.zeros(2), dims="site")):
            _refused(lambda a: adapter.krige(observed, at=a), at, MissingCoordinateError, "lat/lon", "x'/'y'")
        with pytest.raises(InputError, match="`at` must be an xarray"):
            adapter.krige(observed, at=[(35.0, -100.0)])
        bad = xr.Dataset(coords={"site": [0, 1], "lat": ("site", [35.0, np.nan]), "lon": ("site", [-100.0, -95.0])})
        _refused(lambda a: adapter.krige(observed, at=a), bad, CoordinateError, "NaN or infinite", r"\[1\]")
        # the same observations (a dask-backed copy too) with a usable `at` then krige fine
        good = bad.assign_coords(lat=("site", [35.0, 36.0]))
        for given in (observed, observed.chunk({"time": 2})):
            _refused(lambda a: adapter.krige(given, at=a), bad, CoordinateError, "NaN or infinite")
            assert np.isfinite(adapter.krige(given, at=good)["mean"].values).all()


# ------------------------------------------------------------------ residual values


def test_all_nan_site(field):
    bad = field.copy()
    bad[:, 4] = np.nan
    _refused(_fit(), bad, InputError, r"site\(s\) \[4\]", "all NaN", "drop them")


def test_all_nan_time_step_is_dropped_with_a_warning(field):
    """An empty time step carries no information: it is dropped from the fit (documented in fit)."""
    gappy = field.copy()
    gappy[5, :] = np.nan
    before = gappy.copy(deep=True)
    with pytest.warns(UserWarning, match=r"1 time step\(s\).*2000-01-06.*dropped from the fit"):
        adapter = SpatialAdapter(**FAST).fit(gappy)
    xr.testing.assert_identical(gappy, before)
    assert adapter.scores.sizes["time"] == field.sizes["time"] - 1
    assert np.datetime64("2000-01-06") not in adapter.scores["time"].values
    # the same fit as on the data without that time step
    reference = SpatialAdapter(**FAST).fit(field.drop_isel(time=5))
    np.testing.assert_allclose(adapter.eigenvalues.values, reference.eigenvalues.values, rtol=1e-10)
    np.testing.assert_allclose(adapter.basis.values, reference.basis.values, atol=1e-10)
    # only empty time steps left: the fit refuses
    empty = xr.full_like(field, np.nan)
    with pytest.warns(UserWarning, match="dropped"), pytest.raises(InputError, match="at least 3 time steps"):
        SpatialAdapter(**FAST).fit(empty)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_residuals(field, value):
    bad = field.copy()
    bad[5, 2] = value
    _refused(_fit(), bad, InputError, "infinite values", "NaN")


def test_fewer_than_three_time_steps(field):
    _refused(_fit(), field.isel(time=slice(0, 2)), InputError, "at least 3 time steps", "got 2",
             "give at least 3 time steps", r"single map.*adapter\.krige")
    # one map: the same refusal, naming the fix
    _refused(_fit(), field.isel(time=[0]), InputError, "got 1", r"single map.*adapter\.krige")


def test_duplicated_time_steps_name_the_times(field):
    times = field["time"].values.copy()
    times[[6, 11]] = times[[5, 10]]
    bad = field.assign_coords(time=times)
    _refused(_fit(), bad, InputError, "duplicated 'time'", "2000-01-06", "2000-01-11", "groupby")


def test_unordered_time_index(field):
    times = field["time"].values.copy()
    times[[4, 5]] = times[[5, 4]]
    bad = field.assign_coords(time=times)
    _refused(_fit(), bad, InputError, "out of order", r"sortby\('time'\)")
    # decreasing time is an order too: the same fit as increasing
    backwards = SpatialAdapter(**FAST).fit(field.isel(time=slice(None, None, -1)))
    forwards = SpatialAdapter(**FAST).fit(field)
    np.testing.assert_allclose(backwards.eigenvalues.values, forwards.eigenvalues.values, rtol=1e-8)


def _refused_cases(field):
    """Refused inputs shared by the numpy and the dask tests: ``(data, params, error, patterns)``."""
    infinite = field.copy()
    infinite[5, 2] = np.inf
    empty_site = field.copy()
    empty_site[:, 4] = np.nan
    times = field["time"].values.copy()
    times[[6, 11]] = times[[5, 10]]
    return {
        "infinite values": (infinite, {}, InputError, ("infinite values", "NaN")),
        "all-NaN site": (empty_site, {}, InputError, (r"site\(s\) \[4\]", "all NaN", "drop them")),
        "duplicated times": (field.assign_coords(time=times), {}, InputError,
                             ("duplicated 'time'", "2000-01-06", "2000-01-11")),
        "rank too large": (field, {"rank": 20}, InputError, ("rank=20", r"number of sites \(20\)", "lower rank")),
    }


@pytest.mark.parametrize("case", ["infinite values", "all-NaN site", "duplicated times", "rank too large"])
def test_dask_input_is_refused_like_numpy_input(field, case):
    data, params, error, patterns = _refused_cases(field)[case]
    eager = _refused(_fit(**params), data, error, *patterns)
    lazy = data.chunk({"time": 10})
    before = lazy.copy(deep=True)
    with pytest.raises(error) as info:
        _fit(**params)(lazy)
    # the same class and message as for numpy input (not merely a subclass of it)
    assert type(info.value) is error
    assert str(info.value) == eager
    assert lazy.chunks is not None  # still lazy: the checks did not load it in place
    xr.testing.assert_identical(lazy, before)
    assert os.listdir(".") == []


def test_integer_input_is_converted(field):
    integers = (field * 100).round().astype(np.int64)
    before = integers.copy(deep=True)
    adapter = SpatialAdapter(**FAST).fit(integers)
    xr.testing.assert_identical(integers, before)
    reference = SpatialAdapter(**FAST).fit(integers.astype(np.float64))
    assert adapter.basis.dtype == np.float64
    np.testing.assert_array_equal(adapter.basis.values, reference.basis.values)
    result = adapter.krige(integers.isel(time=slice(0, 2)))
    assert result["mean"].dtype == np.float64


def test_float32_input_works_to_float32_precision(field):
    single = field.astype(np.float32)
    with _unchanged(single):
        adapter = SpatialAdapter(**FAST).fit(single)
    assert single.dtype == np.float32
    reference = SpatialAdapter(**FAST).fit(single.astype(np.float64))
    assert adapter.basis.dtype == np.float64
    # computed in float64 from the same float32 values: identical to the converted fit
    np.testing.assert_array_equal(adapter.basis.values, reference.basis.values)
    # and within float32 rounding of the float64 data's fit
    exact = SpatialAdapter(**FAST).fit(field)
    assert subspace_distance(adapter.basis.values, exact.basis.values) < 1e-5
    np.testing.assert_allclose(adapter.eigenvalues.values, exact.eigenvalues.values, rtol=1e-5)


def test_numpy_input_of_the_engine_is_not_modified(field):
    from xadapter.engine import pipeline
    from xadapter.engine.settings import Settings
    from xadapter.labelled.labels import site_coordinates

    data = field.values.copy()
    data[np.random.default_rng(0).random(data.shape) < 0.1] = np.nan
    before = data.copy()
    sites = site_coordinates(field, "station", ("station",))
    pipeline.fit(data, sites, Settings(rank=3, fine_scale="exponential"))
    np.testing.assert_array_equal(data, before)


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_rank_below_one(field, rank):
    _refused(_fit(rank=rank), field, InputError, "rank", "integer >= 1")


@pytest.mark.parametrize("rank", [20, 25])
def test_rank_not_below_the_number_of_sites(field, rank):
    _refused(_fit(rank=rank), field, InputError, f"rank={rank}", r"number of sites \(20\)", "lower rank")


@pytest.mark.parametrize("name", ["tau1", "tau2", "gamma"])
@pytest.mark.parametrize("value", [-1.0, np.nan, np.inf, "big"])
def test_negative_or_non_finite_weights(field, name, value):
    message = _refused(_fit(**{name: value}), field, InputError, name)
    assert "finite and >= 0" in message or "must be a number" in message


def test_unknown_penalty(field):
    _refused(_fit(penalty="laplace", tau1=1.0), field, InputError, "unknown penalty 'laplace'", "graph", "tps")


def test_thin_plate_above_its_size_limit():
    n_sites = THIN_PLATE_MAX_SITES + 1
    rng = np.random.default_rng(0)
    big = xr.DataArray(rng.standard_normal((3, n_sites)), dims=("time", "station"),
                       coords={"lat": ("station", rng.uniform(-60, 60, n_sites)),
                               "lon": ("station", rng.uniform(-180, 180, n_sites))})
    _refused(_fit(rank=1, tau1=1.0, penalty="tps"), big, ProblemTooLargeError,
             f"{n_sites} sites exceeds the limit", "penalty='graph'")


# ------------------------------------------------------------------ covariates


@pytest.fixture(scope="module")
def covariates(field):
    rng = np.random.default_rng(0)
    return xr.DataArray(rng.standard_normal((40, 20, 2)), dims=("time", "station", "feature"),
                        coords={"time": field.time, "station": field.station, "feature": ["a", "b"]})


def test_covariates_on_other_dims(field, covariates):
    fit = lambda c: SpatialAdapter(**FAST).fit(field, covariates=c)  # noqa: E731
    # `_refused` checks the covariates; the residuals must come out untouched as well
    with _unchanged(field, covariates):
        _refused(fit, covariates.rename(station="site"), InputError, r"covariates have dims \('time', 'site'",
                 "rename")
        _refused(fit, covariates.isel(feature=0), InputError, "'feature' dim")
        _refused(fit, covariates.isel(time=slice(0, 30)), InputError, "do not cover the times", "10 in all")
        _refused(fit, covariates.assign_coords(station=covariates.station + 100), InputError,
                 "do not cover every site")


def test_covariates_with_nan(field, covariates):
    bad = covariates.copy()
    bad[3, 4, 1] = np.nan
    for residuals in (field, field.chunk({"time": 10})):
        with _unchanged(residuals):
            _refused(lambda c: SpatialAdapter(**FAST).fit(residuals, covariates=c), bad, InputError,
                     "1 NaN or infinite", "fill them or drop")


# ------------------------------------------------------------------ observed at kriging


def test_observed_that_does_not_match_the_adapter(adapter, field):
    observed = field.isel(time=slice(0, 4))
    krige = adapter.krige
    _refused(krige, observed.assign_coords(station=observed.station + 100), InputError,
             "not fitted on", r"at=\.\.\.")
    _refused(krige, observed.rename(station="site"), InputError, r"lacks the fitted space dims \['station'\]")
    _refused(krige, observed.isel(time=0), InputError, "no 'time' dim")
    _refused(krige, observed.assign_attrs(units="degC"), InputError, "'degC'", "fitted on 'K'", "convert")
    # a subset of the fitted sites and observations without units are fine
    result = krige(observed.isel(station=slice(0, 10)).assign_attrs(units=None))
    assert np.isfinite(result["mean"].values).all()


# ------------------------------------------------------------------ files


def test_load_refuses_what_is_not_an_adapter(adapter, in_empty_folder):
    xr.Dataset({"x": ("t", [1.0, 2.0])}).to_netcdf("other.nc")
    with pytest.raises(InputError, match="not an xadapter file"):
        xadapter.load("other.nc")
    with open("text.nc", "w") as handle:
        handle.write("not netcdf")
    with pytest.raises(InputError, match="cannot read text.nc as NetCDF.*not NetCDF"):
        xadapter.load("text.nc")
    with pytest.raises(FileNotFoundError, match="no adapter file at nothing.nc"):
        xadapter.load("nothing.nc")
    assert sorted(os.listdir(".")) == ["other.nc", "text.nc"]


def test_load_refuses_a_truncated_file(adapter):
    adapter.to_netcdf("adapter.nc")
    with open("adapter.nc", "rb") as handle:
        content = handle.read()
    with open("truncated.nc", "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(InputError, match="truncated, damaged or not NetCDF"):
        xadapter.load("truncated.nc")
    assert xadapter.load("adapter.nc").is_fitted


def test_load_checks_the_format_version(adapter):
    assert adapter.state.attrs["xadapter_format"] == 1
    future = adapter.state.copy()
    future.attrs["xadapter_format"] = 99
    future.to_netcdf("future.nc")
    with pytest.raises(InputError, match="state format 99.*reads formats 1 to 1.*upgrade xadapter"):
        xadapter.load("future.nc")
    # files that predate the attribute are format 1
    older = adapter.state.copy()
    del older.attrs["xadapter_format"]
    older.to_netcdf("older.nc")
    np.testing.assert_array_equal(xadapter.load("older.nc").basis.values, adapter.basis.values)
    damaged = adapter.state.drop_vars("rotation")
    damaged.to_netcdf("damaged.nc")
    with pytest.raises(InputError, match=r"incomplete xadapter state: \['rotation'\] missing"):
        xadapter.load("damaged.nc")


# ------------------------------------------------------------------ user-supplied basis


def _near_orthonormal(n_sites, rank, deviation, rng):
    """An orthonormal basis perturbed so that max |Phi^T Phi - I| is about ``deviation``."""
    exact, _ = np.linalg.qr(rng.standard_normal((n_sites, rank)))
    noise = rng.standard_normal((n_sites, rank))
    measured = np.abs((exact + 1e-8 * noise).T @ (exact + 1e-8 * noise) - np.eye(rank)).max() / 1e-8
    return exact, exact + noise * deviation / measured  # deviation linear in the perturbation here


@pytest.mark.parametrize("deviation", [3e-6, 1e-4])
def test_nearly_orthonormal_basis_is_accepted(deviation):
    rng = np.random.default_rng(1)
    n_sites, rank = 40, 4
    exact, basis = _near_orthonormal(n_sites, rank, deviation, rng)
    measured = np.abs(basis.T @ basis - np.eye(rank)).max()
    assert 0.9 * deviation < measured < 1.1 * deviation
    data = rng.standard_normal((200, rank)) * [5.0, 4.0, 3.0, 2.0] @ exact.T + rng.standard_normal((200, n_sites))
    before = basis.copy()
    covariance = low_rank_plus_noise(basis, data)
    np.testing.assert_array_equal(basis, before)
    reference = low_rank_plus_noise(exact, data)
    # the loadings of the basis as given are exactly orthonormal
    loadings = covariance.loadings(basis)
    np.testing.assert_allclose(loadings.T @ loadings, np.eye(rank), atol=1e-12)
    # and the answer moves by the order of the deviation only
    np.testing.assert_allclose(covariance.eigenvalues, reference.eigenvalues, rtol=20 * deviation)
    assert covariance.noise_variance == pytest.approx(reference.noise_variance, rel=20 * deviation)
    assert covariance.effective_rank == reference.effective_rank == rank


@pytest.mark.parametrize("scale", [1.01, 2.0])
def test_basis_far_from_orthonormal_is_refused(scale):
    rng = np.random.default_rng(2)
    exact, _ = np.linalg.qr(rng.standard_normal((40, 4)))
    data = rng.standard_normal((50, 40))
    with pytest.raises(InputError, match=rf"not orthonormal.*accepted up to {ORTHONORMAL_MAX_DEVIATION:g}.*qr"):
        low_rank_plus_noise(exact * scale, data)
    oblique = exact.copy()
    oblique[:, 1] = (exact[:, 1] + 0.1 * exact[:, 0]) / np.sqrt(1.01)
    with pytest.raises(InputError, match="not orthonormal"):
        low_rank_plus_noise(oblique, data)


def _deviated_basis(exact, deviation, kind):
    """``exact`` times ``G^(1/2)``: columns with Gram matrix ``G`` exactly, ``max |G - I| = deviation``
    on one column's squared norm or on one pair's inner product. Its span is that of ``exact``."""
    gram = np.eye(exact.shape[1])
    if kind == "norm":
        gram[1, 1] += deviation
    else:
        gram[0, 2] = gram[2, 0] = deviation
    values, vectors = np.linalg.eigh(gram)
    return exact @ (vectors * np.sqrt(values)) @ vectors.T


@pytest.mark.parametrize("kind", ["norm", "angle"])
def test_user_basis_orthonormality_limit(kind):
    """A basis off by 5e-4 is accepted (and used through its orthonormalised span), one off
    by 2e-3 is refused: the documented limit is 1e-3."""
    assert ORTHONORMAL_MAX_DEVIATION == 1e-3
    rng = np.random.default_rng(4)
    n_sites, rank = 40, 4
    exact, _ = np.linalg.qr(rng.standard_normal((n_sites, rank)))
    data = rng.standard_normal((200, rank)) * [5.0, 4.0, 3.0, 2.0] @ exact.T + rng.standard_normal((200, n_sites))
    reference = low_rank_plus_noise(exact, data)
    accepted = _deviated_basis(exact, 5e-4, kind)
    assert np.abs(accepted.T @ accepted - np.eye(rank)).max() == pytest.approx(5e-4, rel=1e-9)
    covariance = low_rank_plus_noise(accepted, data)
    loadings = covariance.loadings(accepted)
    np.testing.assert_allclose(loadings.T @ loadings, np.eye(rank), atol=1e-12)
    # its orthonormalised span is the span of `exact`: the same covariance to rounding
    np.testing.assert_allclose(covariance.eigenvalues, reference.eigenvalues, rtol=1e-10)
    assert covariance.noise_variance == pytest.approx(reference.noise_variance, rel=1e-10)
    refused = _deviated_basis(exact, 2e-3, kind)
    assert np.abs(refused.T @ refused - np.eye(rank)).max() == pytest.approx(2e-3, rel=1e-9)
    with pytest.raises(InputError, match=r"not orthonormal \(max \|Phi\^T Phi - I\| = 2\.00e-03, accepted up to "
                                         r"0\.001\).*numpy\.linalg\.qr"):
        low_rank_plus_noise(refused, data)


def test_no_warning_on_clean_input(field):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpatialAdapter(**FAST).fit(field)


# ------------------------------------------------------------------ numerical robustness


def _robust_cases(field):
    rng = np.random.default_rng(0)
    one_pattern = np.linalg.qr(rng.standard_normal((field.sizes["station"], 1)))[0][:, 0]
    lat = field["lat"].values.copy()
    lat[3] = lat[2] + 1e-6 / 111.2  # 1 mm north of site 2
    lon = field["lon"].values.copy()
    lon[3] = field["lon"].values[2]
    few = field.copy()
    few[2:, 5] = np.nan  # seen twice
    few[1:, 6] = np.nan  # seen once
    return {
        "near-duplicate sites": (field.assign_coords(lat=("station", lat), lon=("station", lon)), (1, 3)),
        "rank-deficient": (field.copy(data=np.outer(rng.standard_normal(40), one_pattern)), (1, 1)),
        "scale 1e-8": (field * 1e-8, (1, 3)),
        "scale 1e8": (field * 1e8, (1, 3)),
        "constant": (xr.full_like(field, 3.0), (0, 0)),
        "white noise": (field.copy(data=rng.standard_normal(field.shape)), (0, 0)),
        "sites seen once or twice": (few, (1, 3)),
    }


@pytest.mark.parametrize("name", ["near-duplicate sites", "rank-deficient", "scale 1e-8", "scale 1e8", "constant",
                                  "white noise", "sites seen once or twice"])
def test_numerically_hard_fields_give_finite_outputs(field, name):
    data, (low, high) = _robust_cases(field)[name]
    observed = data.isel(time=slice(0, 5)).where(data.station % 4 != 0)
    with warnings.catch_warnings(record=True) as caught, _unchanged(data, observed):
        warnings.simplefilter("always")
        adapter = SpatialAdapter(rank=4, tau1=1.0, fine_scale=None, site_folds=5).fit(data)
        result = adapter.krige(observed)
    assert low <= adapter.effective_rank <= high
    for values in (adapter.basis, adapter.eigenvalues, adapter.mean, adapter.scores):
        assert np.isfinite(values.values).all()
    assert np.isfinite(adapter.noise_variance) and adapter.noise_variance > 0
    assert (adapter.eigenvalues.values >= 0).all()
    assert np.isfinite(result["mean"].values).all() and np.isfinite(result["variance"].values).all()
    assert (result["variance"].values >= 0).all()
    # 20 sites, 5 folds of 4: the site cross-validation runs on every one of these fields
    assert adapter.calibration is not None
    assert np.isfinite(adapter.state.attrs["cv_rmse"]) and np.isfinite(adapter.state.attrs["cv_crps"])
    counted = adapter.calibration["count"].values > 0
    assert counted.any() and np.isfinite(adapter.calibration["coverage_calibrated"].values[counted]).all()
    if name in ("constant", "white noise"):
        # no overflow, division by zero or invalid value in the arithmetic (numpy warns from
        # inside the package); xadapter's own warnings point at the caller's line, here
        arithmetic = [w for w in caught if issubclass(w.category, RuntimeWarning)
                      and (re.search(r"encountered in|empty slice|degrees of freedom", str(w.message), re.I)
                           or os.path.abspath(w.filename) != os.path.abspath(__file__))]
        assert not arithmetic, [(w.filename, w.lineno, str(w.message)) for w in arithmetic]


@pytest.mark.parametrize("name", ["near-duplicate sites", "scale 1e8", "white noise", "sites seen once or twice"])
def test_numerically_hard_fields_with_the_fine_scale(field, name):
    data, (low, high) = _robust_cases(field)[name]
    adapter = SpatialAdapter(rank=4).fit(data)
    assert low <= adapter.effective_rank <= high
    result = adapter.krige(data.isel(time=slice(0, 5)).where(data.station % 4 != 0))
    assert np.isfinite(result["mean"].values).all() and np.isfinite(result["variance"].values).all()


def test_constant_field_with_the_fine_scale(field):
    adapter = SpatialAdapter(rank=4).fit(xr.full_like(field, 3.0))
    assert adapter.effective_rank == 0
    assert adapter.fine_scale_params.partial_sill == 0.0
    assert 0.0 < adapter.noise_variance < 1e-6  # the floor: nothing varies
    result = adapter.krige(xr.full_like(field, 3.0).isel(time=slice(0, 3)))
    np.testing.assert_allclose(result["mean"].values, 3.0)
