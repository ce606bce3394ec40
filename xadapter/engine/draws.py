"""Standard normal draws keyed by site and time, the same however the times are chunked.

The gap refill of the covariance step (:func:`xadapter.engine.pipeline.fit_covariance`)
draws a value for every missing entry. The draw of an entry must depend on the seed,
on *where* the site is and on the time index only: not on the order of the sites (a
permutation of the sites must not move the fit) and not on how the times are split
into chunks (numpy and dask must agree). A counter-based generator gives that: each
draw is a hash (SplitMix64) of ``(seed, site key, time)`` turned into a uniform and
then a normal by the inverse CDF, computed for any block of times directly.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from .geometry import sphere_xyz

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x):
    """SplitMix64 finaliser of a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
        return x ^ (x >> np.uint64(31))


def site_keys(sites, seed):
    """One uint64 key per site (N,) from the seed and the site's location.

    Lat/lon sites are keyed by their unit-sphere point (so the longitude convention
    does not matter), planar sites by their km coordinates, both rounded well below
    any meaningful distance.
    """
    if sites.geographic:
        points = sphere_xyz(sites.lat, sites.lon)
        coordinates = np.round((points + 1.0) * 1e9).astype(np.int64)
    else:
        coordinates = np.round(np.asarray(sites.xy_km, dtype=np.float64) * 1e6).astype(np.int64)
    keys = _splitmix(np.full(coordinates.shape[0], np.uint64(int(seed) % 2**64)))
    for column in coordinates.T:
        keys = _splitmix(keys ^ column.astype(np.uint64))
    return keys


def position_keys(n_sites, seed):
    """Keys (N,) for sites without coordinates: their position."""
    return _splitmix(np.arange(n_sites, dtype=np.uint64) ^ _splitmix(np.array([int(seed) % 2**64], np.uint64)))


def normal_draws(keys, start, stop):
    """Standard normal draws ``(stop - start, N)`` for times ``start .. stop - 1``."""
    times = _splitmix(np.arange(start, stop, dtype=np.uint64) * _GOLDEN)
    bits = _splitmix(keys[None, :] ^ times[:, None])
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return ndtri(uniform)
