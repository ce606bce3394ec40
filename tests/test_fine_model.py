"""The fine-scale component through the public API: SpatialAdapter(fine_scale="exponential").

Simulated station fields with a known covariance

    Sigma = B diag(lambda) B^T + eta^2 exp(-h / ell) + tau^2 I

(three smooth patterns with AR(1) scores, an exponential fine-scale field independent in
time, white noise), h great-circle km.

What limits the recovery of ``(eta^2, ell, tau^2)``: the fine-scale field has power at
all wavelengths, so each smooth basis direction also takes about ``2 pi ell^2 eta^2``
times the site density of it (not ``eta^2``: the K / N of a random direction); the
remainders lose that long-wave part, their semivariogram plateau drops and the fit
shortens the range and lowers the nugget (the nugget is an extrapolation below the
closest pairs). Parameters are therefore recovered on a domain many ranges wide
(~1500 km, ell = 50 km) with sites closer than the range, and with the nominal rank
at the true rank. Measured with the default rank (10) on the same two fields: the
noise-calibrated threshold keeps all 10 components (the leading fine-scale modes are
detectable signal), and the fit gives range 41.5 / 39.6 km and nugget 0.42 / 0.42
(T < N / T > N; truth 50 km and 0.5), partial sill 0.81 / 0.99.
"""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import xadapter
from xadapter import SpatialAdapter, datasets
from xadapter.engine import finescale, geometry

LARGE_EXTENT = (34.0, 48.0, -102.0, -82.0)  # ~1550 x 1650 km
SMALL_EXTENT = (38.0, 44.0, -98.0, -90.0)  # ~670 x 700 km


def station_field(n_sites, n_times, *, partial_sill, range_km, nugget, extent, seed=0,
                  score_variance=(20.0, 10.0, 5.0), width_km=300.0):
    """Stations with a known low-rank + exponential + nugget covariance, and the truth."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(extent[0], extent[1], n_sites)
    lon = rng.uniform(extent[2], extent[3], n_sites)
    xy = geometry.local_projection_km(lat, lon)
    centres = xy.min(0) + (xy.max(0) - xy.min(0)) * rng.uniform(0.2, 0.8, (3, 2))
    patterns, _ = np.linalg.qr(np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * width_km**2)))
    # per-site variance of the patterns ~ score_variance: strong against the fine scale
    scores = datasets.ar1(n_times, 3, 0.5, np.asarray(score_variance) * n_sites, rng)
    values = scores @ patterns.T + np.sqrt(nugget) * rng.standard_normal((n_times, n_sites))
    if partial_sill > 0:
        distance = geometry.great_circle_km(lat[:, None], lon[:, None], lat[None], lon[None])
        factor = np.linalg.cholesky(partial_sill * np.exp(-distance / range_km) + 1e-10 * np.eye(n_sites))
        values += (factor @ rng.standard_normal((n_sites, n_times))).T
    return xr.DataArray(
        values, dims=("time", "station"),
        coords={"time": pd.date_range("2000-01-01", periods=n_times), "station": np.arange(n_sites),
                "lat": ("station", lat, {"units": "degrees_north"}),
                "lon": ("station", lon, {"units": "degrees_east"})},
        attrs={"units": "K"},
    )


def dense_covariance(adapter):
    """``B diag(lambda) B^T + eta^2 exp(-h / ell)`` (latent) and ``+ tau^2 I``, built here."""
    state = adapter.state
    loadings = adapter.basis.values @ state["rotation"].values
    fine = adapter.fine_scale_params
    lat, lon = adapter.basis["lat"].values, adapter.basis["lon"].values
    distance = geometry.great_circle_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    low_rank = (loadings * adapter.eigenvalues.values) @ loadings.T
    latent = low_rank + fine.partial_sill * np.exp(-distance / fine.range_km)
    return latent, latent + adapter.noise_variance * np.eye(len(lat))


# --------------------------------------------------------------------- small field: (a) (b) (e)


@pytest.fixture(scope="module")
def small():
    field = station_field(150, 260, partial_sill=1.0, range_km=80.0, nugget=0.3, extent=SMALL_EXTENT)
    train, test = field.isel(time=slice(0, 200)), field.isel(time=slice(200, None))
    adapters = {rank: SpatialAdapter(rank=rank, fine_scale="exponential", seed=0).fit(train) for rank in (3, 10)}
    gaps = np.random.default_rng(1).random(test.shape) < 0.3  # every time its own pattern
    return adapters, test.where(~gaps)


@pytest.mark.parametrize("rank", [3, 10])
def test_covariance_is_low_rank_plus_exponential_plus_nugget(small, rank):
    adapter = small[0][rank]
    fine = adapter.fine_scale_params
    assert fine.kind == "exponential" and fine.partial_sill > 0 and fine.nugget > 0
    assert adapter.noise_variance == fine.nugget
    _, expected = dense_covariance(adapter)
    covariance = adapter.covariance()
    assert covariance.dims == ("station", "station_")
    np.testing.assert_allclose(covariance.values, expected, rtol=1e-12, atol=1e-12)
    # sill on the diagonal; the fine-scale term alone off it
    np.testing.assert_allclose(np.diag(covariance.values) - np.diag(expected), 0.0, atol=1e-12)


@pytest.mark.parametrize("rank", [3, 10])
def test_local_kriging_agrees_with_the_exact_dense_solution(small, rank):
    adapter, observed = small[0][rank], small[1]
    result = adapter.krige(observed)  # at=None: every fitted site, gaps filled
    site_mean = adapter.mean.values
    latent, sigma = dense_covariance(adapter)
    residual = observed.values - site_mean
    mean = np.empty_like(residual)
    variance = np.empty_like(residual)
    for t, row in enumerate(residual):
        seen = ~np.isnan(row)
        weights = np.linalg.solve(sigma[np.ix_(seen, seen)], latent[seen, :]).T  # Sigma_PO Sigma_OO^-1
        mean[t] = weights @ row[seen]
        variance[t] = np.diag(latent) - np.einsum("po,op->p", weights, latent[seen, :]) + adapter.noise_variance
    local = result["mean"].values - site_mean
    gaps = np.isnan(residual)
    relative = np.sqrt(np.mean((local - mean) ** 2) / np.mean(mean**2))
    relative_gaps = np.sqrt(np.mean((local - mean)[gaps] ** 2) / np.mean(mean[gaps] ** 2))
    # measured: 1e-4 to 2e-4 (30 of ~105 observed neighbours)
    assert relative < 0.02 and relative_gaps < 0.02
    np.testing.assert_allclose(result["variance"].values, variance, rtol=0.02)
    # the package's exact dense kriging is the same dense formula
    exact_mean, exact_var = finescale.exact_krige(
        observed.values, adapter.basis.values @ adapter.state["rotation"].values, adapter.eigenvalues.values,
        adapter.fine_scale_params, np.column_stack([adapter.basis["lat"].values, adapter.basis["lon"].values]),
        mean=site_mean, geographic=True)
    np.testing.assert_allclose(exact_mean - site_mean, mean, atol=1e-8)
    np.testing.assert_allclose(exact_var, variance, atol=1e-8)


def test_round_trip_keeps_the_fine_scale(small, tmp_path):
    adapters, observed = small
    adapter = adapters[3]
    path = tmp_path / "adapter.nc"
    adapter.to_netcdf(path)
    loaded = xadapter.load(path)
    xr.testing.assert_identical(loaded.state, adapter.state)
    assert loaded.fine_scale_params == adapter.fine_scale_params
    assert loaded.fine_scale == "exponential"
    # kriging identical at the fitted sites and at new sites (with the site calibration)
    xr.testing.assert_equal(loaded.krige(observed), adapter.krige(observed))
    at = xr.Dataset(coords={"station": [900, 901], "lat": ("station", [40.1, 41.7]),
                            "lon": ("station", [-95.3, -92.2])})
    xr.testing.assert_equal(loaded.krige(observed, at=at), adapter.krige(observed, at=at))
    # repr reports the fitted fine-scale parameters
    fine = adapter.fine_scale_params
    text = repr(loaded)
    assert text == repr(adapter)
    assert "fine scale: exponential" in text
    assert f"partial sill {fine.partial_sill:.4g}" in text and f"range {fine.range_km:.4g} km" in text
    assert f"noise variance: {fine.nugget:.4g}" in text


# ------------------------------------------------------------------ large fields: (c) (d)


REGIMES = {"T<N": (1200, 100), "T>N": (900, 1200)}
TRUTH = {"partial_sill": 1.0, "range_km": 50.0, "nugget": 0.5}


@pytest.fixture(scope="module")
def fine_fields():
    return {regime: station_field(n_sites, n_times, extent=LARGE_EXTENT, **TRUTH)
            for regime, (n_sites, n_times) in REGIMES.items()}


@pytest.fixture(scope="module")
def fine_fits(fine_fields):
    # the site calibration does not touch the covariance parameters: switched off for speed
    return {regime: (SpatialAdapter(rank=3, fine_scale="exponential", site_folds=None, seed=0).fit(field),
                     SpatialAdapter(gamma=0.0, fine_scale=None, site_folds=None, seed=0).fit(field))
            for regime, field in fine_fields.items()}


def test_fine_scale_parameters_recovered_on_a_large_field(fine_fits):
    adapter, _ = fine_fits["T>N"]
    fine = adapter.fine_scale_params
    print(f"\nfitted {fine} (truth {TRUTH})")
    # measured: partial sill 1.006, range 46.5 km, nugget 0.468 (T = 1200, N = 900)
    assert adapter.effective_rank == 3
    assert fine.partial_sill == pytest.approx(TRUTH["partial_sill"], rel=0.2)
    assert fine.range_km == pytest.approx(TRUTH["range_km"], rel=0.2)
    assert fine.nugget == pytest.approx(TRUTH["nugget"], rel=0.2)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_noise_variance_with_a_fine_scale_in_both_regimes(fine_fits, regime):
    adapter, paper = fine_fits[regime]
    nugget, total = TRUTH["nugget"], TRUTH["nugget"] + TRUTH["partial_sill"]
    print(f"\n{regime}: nugget {adapter.noise_variance:.3f} (truth {nugget}); paper's rule "
          f"{paper.noise_variance:.3f} with effective rank {paper.effective_rank} "
          f"(its white part is everything beyond the low rank: {total})")
    # the fine-scale nugget: measured 0.468 in both regimes (0.46-0.47 over four seeds)
    assert adapter.noise_variance == pytest.approx(nugget, rel=0.15)
    # the paper's rule lumps the fine scale into its white noise, and with T < N its
    # kept components absorb noise energy: measured 1.242 (T<N, 0.83 of eta^2 + tau^2;
    # 0.83-0.84 over four seeds) and 1.418 (T>N, 0.95)
    assert paper.effective_rank == 10
    if regime == "T<N":
        assert paper.noise_variance < 0.87 * total
    else:
        assert 0.9 * total < paper.noise_variance < total


@pytest.mark.parametrize("regime", list(REGIMES))
def test_noise_variance_of_white_noise_in_both_regimes(regime):
    n_sites, n_times = REGIMES[regime]
    field = station_field(n_sites, n_times, partial_sill=0.0, range_km=1.0, nugget=0.5, extent=LARGE_EXTENT, seed=3)
    adapter = SpatialAdapter(site_folds=None, seed=0).fit(field)  # defaults: rank 10, noise-calibrated
    paper = SpatialAdapter(gamma=0.0, fine_scale=None, site_folds=None, seed=0).fit(field)
    low_rank_noise = float(adapter.state["low_rank_noise_variance"])
    print(f"\n{regime}: nugget {adapter.noise_variance:.3f}, spectral {low_rank_noise:.3f}, rank "
          f"{adapter.effective_rank}; paper {paper.noise_variance:.3f}, rank {paper.effective_rank} (truth 0.5)")
    # measured: nugget 0.476 (T<N) and 0.497 (T>N), spectral noise 0.478 and 0.498;
    # partial sill ~0; the threshold keeps the 3 patterns
    assert adapter.effective_rank == 3
    assert adapter.noise_variance == pytest.approx(0.5, rel=0.15)
    assert adapter.fine_scale_params.partial_sill < 0.05
    assert low_rank_noise == pytest.approx(0.5, rel=0.1)
    # Wang's rule keeps all 10: measured 0.427 (T<N) and 0.489 (T>N)
    assert paper.effective_rank == 10
    if regime == "T<N":
        assert paper.noise_variance < 0.9 * 0.5
        assert abs(adapter.noise_variance - 0.5) < 0.5 * abs(paper.noise_variance - 0.5)
    else:
        assert paper.noise_variance == pytest.approx(0.5, rel=0.05)
