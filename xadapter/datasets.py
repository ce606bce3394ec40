"""Bundled real data and synthetic fields with known truth.

* :func:`ozone`: monthly total column ozone over Central America, 24 x 24 grid of
  2.5 degree cells, 72 months (1995-2000), shipped with the package.
* :func:`ozone_residuals`: the same data with a frozen first stage (OLS on latitude,
  longitude, their squares and product, and seasonal harmonics, fitted on the first
  months) and its residuals: the standard input of the demo and the benchmarks.
* :func:`synthetic_field`: smooth orthonormal patterns with AR(1) scores, white
  noise and optional missing values on a lat/lon grid or scattered stations, with the
  truth attached.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import xarray as xr

from .exceptions import InputError

OZONE_FILE = "ozone_central_america.nc"


def ozone():
    """Monthly mean total column ozone over Central America (real data).

    Returns
    -------
    xarray.Dataset
        ``ozone(time, lat, lon)`` float32 in Dobson units (DU); 72 months from
        1995-01 and a 24 x 24 grid of 2.5 degree cells (-21.25..36.25 N,
        -113.75..-56.25 E). Source: NASA Langley ASA Data Expo 2006 (public domain).
    """
    path = resources.files("xadapter").joinpath("data", OZONE_FILE)
    with resources.as_file(path) as local, xr.open_dataset(local) as ds:
        return ds.load()


def _first_stage_design(lat, lon, month):
    """Design of the frozen ozone first stage for every (time, lat, lon) cell."""
    lat_c, lon_c = (lat - 7.5) / 30.0, (lon + 85.0) / 30.0
    lat_g, lon_g = np.meshgrid(lat_c, lon_c, indexing="ij")
    spatial = np.stack([np.ones_like(lat_g), lat_g, lon_g, lat_g**2, lon_g**2, lat_g * lon_g], axis=-1)
    angle = 2 * np.pi * (np.asarray(month) - 1) / 12.0
    seasonal = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(2 * angle)], axis=-1)
    n_t, (n_lat, n_lon) = len(angle), lat_g.shape
    # seasonal harmonics may vary with latitude (opposite cycles in the two hemispheres)
    interaction = seasonal[:, None, None, :] * lat_g[None, :, :, None]
    blocks = [
        np.broadcast_to(spatial[None], (n_t, n_lat, n_lon, spatial.shape[-1])),
        np.broadcast_to(seasonal[:, None, None, :], (n_t, n_lat, n_lon, seasonal.shape[-1])),
        interaction,
    ]
    return np.concatenate(blocks, axis=-1)


def ozone_residuals(n_train=48):
    """The ozone data with a frozen first stage and its residuals.

    The first stage is ordinary least squares on latitude, longitude, their squares
    and product, and two seasonal harmonics (also interacting with latitude), fitted
    on the first ``n_train`` months only and then frozen.

    Returns
    -------
    xarray.Dataset
        ``ozone``, ``prediction`` (first stage) and ``residual`` = ozone - prediction,
        all ``(time, lat, lon)`` in DU; attribute ``n_train``.
    """
    ds = ozone()
    values = ds["ozone"].values.astype(np.float64)
    if not 0 < n_train <= values.shape[0]:
        raise InputError(f"n_train must be between 1 and {values.shape[0]}, got {n_train}.")
    month = pd.DatetimeIndex(ds["time"].values).month
    design = _first_stage_design(ds["lat"].values, ds["lon"].values, month)
    x_train = design[:n_train].reshape(-1, design.shape[-1])
    coef, *_ = np.linalg.lstsq(x_train, values[:n_train].ravel(), rcond=None)
    prediction = design @ coef
    dims = ("time", "lat", "lon")
    attrs = {"units": "DU"}
    out = xr.Dataset(
        {
            "ozone": (dims, values, {**ds["ozone"].attrs}),
            "prediction": (dims, prediction, {**attrs, "long_name": "first-stage prediction of total column ozone"}),
            "residual": (dims, values - prediction, {**attrs, "long_name": "residual of the first stage"}),
        },
        coords=ds.coords,
        attrs={**ds.attrs, "n_train": n_train},
    )
    return out


def _smooth_patterns(coords_km, rank, length_km, rng):
    """Orthonormal smooth patterns: Gaussian bumps at random centres, orthonormalised."""
    n_sites = coords_km.shape[0]
    lo, hi = coords_km.min(axis=0), coords_km.max(axis=0)
    centres = lo + (hi - lo) * rng.uniform(0.2, 0.8, size=(rank, coords_km.shape[1]))
    dist2 = ((coords_km[:, None, :] - centres[None]) ** 2).sum(-1)
    raw = np.exp(-dist2 / (2 * length_km**2))
    q, r = np.linalg.qr(raw)
    q = q * np.sign(np.diag(r))
    if q.shape != (n_sites, rank):
        raise InputError("could not build the requested number of patterns.")
    return q


def ar1(n_times, n_series, coefficient, variance, rng):
    """AR(1) series with the given stationary variance, shape (n_times, n_series)."""
    coefficient = np.asarray(coefficient, dtype=float) * np.ones(n_series)
    variance = np.asarray(variance, dtype=float) * np.ones(n_series)
    innovation_sd = np.sqrt(variance * (1 - coefficient**2))
    out = np.empty((n_times, n_series))
    out[0] = rng.standard_normal(n_series) * np.sqrt(variance)
    for t in range(1, n_times):
        out[t] = coefficient * out[t - 1] + innovation_sd * rng.standard_normal(n_series)
    return out


def synthetic_field(
    n_times=200,
    *,
    grid=(20, 20),
    n_stations=None,
    rank=3,
    score_variance=(9.0, 4.0, 1.0),
    ar_coefficient=0.5,
    noise_sd=1.0,
    missing=0.0,
    length_km=400.0,
    extent=(30.0, 45.0, -110.0, -90.0),
    units="K",
    seed=0,
):
    """A residual field with known smooth basis, AR(1) scores and white noise.

    Parameters
    ----------
    n_times : int
        Number of time steps.
    grid : (int, int)
        (n_lat, n_lon) of a regular grid over ``extent``; ignored when ``n_stations``.
    n_stations : int, optional
        Scatter this many stations uniformly over ``extent`` instead of a grid.
    rank : int
        Number of true patterns.
    score_variance : sequence of float
        Stationary variance of each score (units squared); cycled if shorter than rank.
    ar_coefficient : float
        Lag-1 autocorrelation of the scores.
    noise_sd : float
        Standard deviation of the white noise (units).
    missing : float
        Fraction of entries set to NaN at random.
    length_km : float
        Width of the Gaussian bumps the patterns are made from (km).
    extent : (lat_min, lat_max, lon_min, lon_max)
        Domain, degrees.

    Returns
    -------
    xarray.Dataset
        ``residual`` (time, lat, lon) or (time, station) with NaNs where missing;
        ``true_basis`` (space dims..., mode), ``true_scores`` (time, mode),
        ``true_signal`` (time, space dims...) and attribute ``noise_sd``.
    """
    from .engine.geometry import local_projection_km

    rng = np.random.default_rng(seed)
    lat_min, lat_max, lon_min, lon_max = extent
    if n_stations is not None:
        lat = rng.uniform(lat_min, lat_max, n_stations)
        lon = rng.uniform(lon_min, lon_max, n_stations)
        space = ("station",)
        coords = {"station": np.arange(n_stations), "lat": ("station", lat, {"units": "degrees_north"}),
                  "lon": ("station", lon, {"units": "degrees_east"})}
        flat_lat, flat_lon, shape = lat, lon, (n_stations,)
    else:
        lat = np.linspace(lat_min, lat_max, grid[0])
        lon = np.linspace(lon_min, lon_max, grid[1])
        space = ("lat", "lon")
        coords = {"lat": ("lat", lat, {"units": "degrees_north"}), "lon": ("lon", lon, {"units": "degrees_east"})}
        lat_g, lon_g = np.meshgrid(lat, lon, indexing="ij")
        flat_lat, flat_lon, shape = lat_g.ravel(), lon_g.ravel(), grid
    coords_km = local_projection_km(flat_lat, flat_lon)
    basis = _smooth_patterns(coords_km, rank, length_km, rng)
    variances = np.resize(np.asarray(score_variance, dtype=float), rank)
    scores = ar1(n_times, rank, ar_coefficient, variances, rng)
    signal = scores @ basis.T
    values = signal + noise_sd * rng.standard_normal(signal.shape)
    if missing > 0:
        values[rng.uniform(size=values.shape) < missing] = np.nan
    time = pd.date_range("2000-01-01", periods=n_times, freq="D")
    coords["time"] = time
    dims = ("time",) + space
    return xr.Dataset(
        {
            "residual": (dims, values.reshape((n_times,) + shape), {"units": units, "long_name": "synthetic residual"}),
            "true_signal": (dims, signal.reshape((n_times,) + shape), {"units": units}),
            "true_basis": (space + ("mode",), basis.reshape(shape + (rank,))),
            "true_scores": (("time", "mode"), scores, {"units": units}),
        },
        coords=coords,
        attrs={"noise_sd": noise_sd, "seed": seed},
    )


def grid_to_cells(field, dim="cell"):
    """A gridded ``(time, lat, lon)`` field as station-like cells.

    Stacks ``lat``/``lon`` to one ``dim`` numbered 0..N-1 with ``lat`` and ``lon`` as
    plain coordinates along it, so that cells can be subset and held out like
    stations (a fitted adapter then kriges held-out cells as new sites).
    """
    stacked = field.stack({dim: ("lat", "lon")}).reset_index(dim)
    return stacked.assign_coords({dim: np.arange(stacked.sizes[dim])})
