"""Fine-scale spatial variation beyond the low rank (DESIGN "Fine-scale variation").

After the low-rank part ``B diag(lambda) B^T`` is removed, a real residual field keeps
short-range correlation. It is modelled as a stationary isotropic process plus a
nugget::

    Sigma      = B diag(lambda) B^T + C_fine + tau^2 I
    C_fine(h)  = eta^2 rho(h / ell)
    rho(x)     = exp(-x)                              ("exponential")
               = (1 + sqrt(3) x) exp(-sqrt(3) x)      ("matern32")

with ``h`` the distance between sites in km (great-circle for ``[lat, lon]``
coordinates, Euclidean for planar km). This module

* estimates ``(eta^2, ell, tau^2)`` from the pooled training remainders: the sill from a
  binned empirical semivariogram on a subsample of site pairs
  (:func:`empirical_variogram`), its split into nugget and partial sill and the range
  from a local likelihood of sites given their nearest neighbours
  (:func:`fit_fine_scale`) - never an ``N x N`` matrix;
* kriges with it locally from the ``k`` nearest observed sites
  (:func:`local_simple_krige` for a zero-mean field, :func:`krige_with_fine_scale` for
  the full low-rank + fine-scale model);
* gives the exact dense solution of the full model for small N
  (:func:`exact_krige`), the reference for the local approximations.

Combining the low-rank and fine-scale parts
-------------------------------------------
Write ``W = C_fine + tau^2 I`` for the fine-scale covariance among the observations
``O`` and ``a`` for the scores (prior covariance ``Lambda``). With
``G = (Lambda^{-1} + B_O^T W^{-1} B_O)^{-1}`` and ``a_hat = G B_O^T W^{-1} r_O`` (the
posterior mean of the scores), the exact kriging predictor and variance of the latent
field at a target ``p`` are (the universal-kriging identities)::

    mean_p = B_p a_hat + c_p^T W^{-1} (r_O - B_O a_hat)
    var_p  = eta^2 - c_p^T W^{-1} c_p + (B_p - c_p^T W^{-1} B_O) G (B_p - c_p^T W^{-1} B_O)^T

with ``c_p = C_fine(p, O)``. So the remainder to krige with the fine-scale covariance is
the observation minus the low-rank kriged mean *at the observed sites*,
``r_O - B_O a_hat``, where ``a_hat`` is the posterior mean of the scores - not a
projection ``B_O^T r_O`` and not a leave-one-out prediction. Two approximations make
this cheap, and :func:`krige_with_fine_scale` applies both:

1. ``c_p^T W^{-1}`` is replaced by simple-kriging weights from the ``k`` nearest
   observed sites of ``p`` (batched ``k x k`` solves).
2. ``W^{-1}`` in ``G`` and ``a_hat`` is replaced either by ``I / (eta^2 + tau^2)``
   (``scores="white"``: the plain low-rank Woodbury with ``eta^2 + tau^2`` as its white
   part) or by a sparse symmetric local precision built from leave-one-out kriging
   weights of each observed site on its ``k`` nearest observed neighbours
   (``scores="local"``, the default: ``W^{-1} = D^{-1} (I - R)`` holds exactly with
   ``R`` the leave-one-out weights and ``D`` the leave-one-out variances; the local
   version keeps ``k`` weights per row and is symmetrised).

With ``k`` at least the number of observed sites both replacements are exact. Cost per
missingness pattern: ``O((|O| + P) k^3)`` for the batched solves, ``O(|O| K^2)`` for
the scores; memory bounded by blocks of targets.

Simply adding the low-rank and the fine-scale kriging variances overstates the
variance: the fine-scale weights already explain part of ``B_p a``, which is what the
corrected loadings ``B_p - c_p^T W^{-1} B_O`` account for. Measured on a 500-site test
field (three smooth patterns, ``eta^2 = 1``, ``tau^2 = 0.2 .. 0.5``,
``ell = 30 .. 300`` km, 70 % of the sites observed) against the exact dense solution:
plain addition overstated the variance by 1-7 % (median) and up to 28 % at single
targets; the corrected form is within 0.5 % (median), 6 % (max). The mean of the
``"white"`` scores differs from the exact one by 1.3-2.7 % (relative RMS, k = 20-40),
the ``"local"`` scores by 0.05-2.2 %, as close as the exact ``W^{-1}`` gets with the
same ``k`` (the rest is the truncation to ``k`` neighbours). The RMSE against the
simulated truth was within 0.1 % of the exact predictor's in every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.optimize import least_squares, minimize
from scipy.spatial import cKDTree

from .checks import nonnegative
from .geometry_cache import GEOMETRY_CACHE
from ..exceptions import InputError, ProblemTooLargeError, warn
from .geometry import chord_to_great_circle_km, sphere_xyz, validate_latlon
from .kriging import (check_kriging_inputs, observation_patterns, prefers_posterior_by_time, score_posterior,
                      white_posterior_by_time)

#: Correlation families understood by :class:`FineScaleParams`.
KINDS = ("exponential", "matern32")

#: Largest number of observed sites :func:`exact_krige` accepts (it factorises an
#: ``N x N`` matrix per missingness pattern).
EXACT_MAX_SITES = 5000

# Entries of a temporary block (bounds memory at ~32 MB per temporary array).
_BLOCK_ENTRIES = 1_000_000

#: Up to this many sites (or ``k`` if larger), data with a pattern of gaps at nearly
#: every time are kriged exactly, time by time (:func:`_dense_krige_by_time`): a
#: batched ``N x N`` inverse a time costs less there than the ``N`` local ``k x k``
#: systems and the Python round of each pattern. Measured with 6 % gaps, rank 10,
#: k = 30 (local, then exact): 8 targets, 31 sites x 81 times 13 -> 3 ms, 64 x 200
#: 195 -> 25 ms, 128 x 200 890 -> 94 ms, 200 x 200 990 -> 190 ms; 60 targets and 50
#: times, 240 sites 139 -> 51 ms, 400 sites 466 -> 133 ms, 600 sites 577 -> 385 ms;
#: a grid of 5000 targets, 60 sites x 50 times 4500 -> 200 ms, 200 sites 5040 -> 750 ms,
#: 400 sites x 20 times 1840 -> 920 ms.
EXACT_BY_TIME_MAX_SITES = 400

#: Largest network whose complete-data variogram is formed from the site Gram matrix
#: (N x N, 32 MB at this size) rather than from differences per pair and time.
_VARIOGRAM_GRAM_MAX_SITES = 2000

#: Relative tolerance on the local likelihood of a warm-started split (a candidate).
_WARM_SPLIT_FTOL = 1e-7

# The variogram fit must give the same parameters to about 1e-8 from the same data
# summed in another order (dask chunks against numpy); the Newton polish of the best
# start (:func:`_newton_polish`) gets there, so the least-squares runs only need to
# find the basin: 1e-10 instead of 1e-14 cuts the fine-scale fit's CPU by about a
# sixth with the same parameters.
_TIGHT_LSQ = {"ftol": 1e-10, "xtol": 1e-10, "gtol": 1e-10}

# Relative floor on the nugget so that coincident sites never make a singular system.
_NUGGET_FLOOR = 1e-10

#: Parameters the correlated part adds to a pure nugget (its share of the sill and its
#: range): the AIC price it must pay in the local likelihood.
_WHITE_AIC_PARAMETERS = 2

_SQRT3 = np.sqrt(3.0)

#: Nearest neighbours each site is conditioned on in the local likelihood that splits the
#: sill into nugget and partial sill (see :func:`fit_fine_scale`).
LOCAL_NEIGHBOURS = 8

# Patterns of observed neighbours are coded in the bits of an int64 with the centre index.
_LOCAL_MAX_NEIGHBOURS = 40

#: Coarse grid of nugget fractions and (log-spaced) ranges that chooses the start of the
#: local-likelihood optimisation (see :func:`_split_sill_locally`).
_SPLIT_GRID_FRACTIONS = (0.05, 0.35, 0.65, 0.95)
_SPLIT_GRID_RANGES = 6

#: Largest number of centre sites in the local likelihood (bounds its memory and time
#: whatever N and T).
LOCAL_MAX_CENTRES = 1000

#: Largest number of (site, pattern of observed neighbours) blocks in the local
#: likelihood (~1.5 kB each).
LOCAL_MAX_BLOCKS = 4000

#: Share of a centre's observed times held by the patterns of observed neighbours it
#: keeps in the local likelihood, most frequent first (see :func:`_local_blocks`).
LOCAL_PATTERN_COVERAGE = 0.9

# Entries of the (times x centres x group x group) outer products gathered at a time.
_LOCAL_GATHER_ENTRIES = 2**22

#: Fitted correlation at the typical nearest-neighbour distance below which the data
#: cannot tell the nugget from the partial sill (the neighbours carry no information).
IDENTIFIABLE_CORRELATION = 0.05


# --------------------------------------------------------------------------------------
# Parameters and correlation functions
# --------------------------------------------------------------------------------------


def _correlation(kind, scaled_distance):
    """``rho(h / ell)`` for an array of scaled distances ``h / ell`` (dimensionless)."""
    x = np.asarray(scaled_distance, dtype=np.float64)
    if kind == "exponential":
        return np.exp(-x)
    return (1.0 + _SQRT3 * x) * np.exp(-_SQRT3 * x)


def _check_kind(kind):
    if kind not in KINDS:
        raise InputError(
            f"unknown fine-scale kind {kind!r}; use one of {', '.join(repr(k) for k in KINDS)}."
        )
    return kind


@dataclass(frozen=True)
class FineScaleParams:
    """Parameters of the fine-scale covariance ``eta^2 rho(h / ell) + tau^2 [h = 0]``.

    Attributes
    ----------
    kind : {"exponential", "matern32"}
        Correlation family ``rho``.
    partial_sill : float
        ``eta^2``, variance of the spatially correlated part, data units squared.
    range_km : float
        ``ell``, range parameter in km (the exponential correlation drops to
        ``1/e`` at ``h = ell``; practical range about ``3 ell``).
    nugget : float
        ``tau^2``, variance of the spatially white part (measurement error and
        variation below the site spacing), data units squared.
    """

    kind: str
    partial_sill: float
    range_km: float
    nugget: float

    def __post_init__(self):
        _check_kind(self.kind)
        for name in ("partial_sill", "range_km", "nugget"):
            object.__setattr__(self, name, nonnegative(name, getattr(self, name)))
        if self.range_km <= 0:
            raise InputError(f"range_km must be positive (km), got {self.range_km}.")

    @property
    def sill(self):
        """``eta^2 + tau^2``: the total fine-scale variance, data units squared."""
        return self.partial_sill + self.nugget

    def correlation(self, distance_km):
        """``rho(h / ell)`` at distances ``h`` (km); 1 at ``h = 0``."""
        return _correlation(self.kind, np.asarray(distance_km, dtype=np.float64) / self.range_km)

    def covariance(self, distance_km, *, include_nugget=False):
        """Fine-scale covariance at distances ``h`` (km), data units squared.

        Parameters
        ----------
        distance_km : array_like
            Distances between two sites, km.
        include_nugget : bool, default False
            Add ``tau^2`` where ``h == 0``: the covariance of two observations that
            are the same one. Without it, ``eta^2 rho(h / ell)``: the covariance of
            the latent fine-scale field (also between an observation and the latent
            value at its own site).
        """
        distance_km = np.asarray(distance_km, dtype=np.float64)
        cov = self.partial_sill * self.correlation(distance_km)
        if include_nugget:
            cov = cov + self.nugget * (distance_km == 0)
        return cov

    def variogram(self, distance_km):
        """Semivariogram ``tau^2 [h > 0] + eta^2 (1 - rho(h / ell))`` (0 at ``h = 0``)."""
        distance_km = np.asarray(distance_km, dtype=np.float64)
        value = self.nugget + self.partial_sill * (1.0 - self.correlation(distance_km))
        return np.where(distance_km > 0, value, 0.0)


# --------------------------------------------------------------------------------------
# Coordinates and distances
# --------------------------------------------------------------------------------------


def _points(coords, name, geographic, n_expected=None):
    """Validated coordinates as points for a KD-tree: unit-sphere xyz or planar km."""
    coords = np.array(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (sites, coordinates), got shape {coords.shape}.")
    if n_expected is not None and coords.shape[0] != n_expected:
        raise InputError(
            f"{name} has {coords.shape[0]} rows but the data have {n_expected} sites (columns); "
            "give one coordinate row per site, in the order of the data columns."
        )
    if geographic:
        if coords.shape[1] != 2:
            raise InputError(
                f"{name} must have two columns [lat, lon] in degrees when geographic=True, "
                f"got {coords.shape[1]}."
            )
        lat, lon = validate_latlon(coords[:, 0], coords[:, 1], allow_duplicates=True)
        return sphere_xyz(lat, lon)
    if not np.isfinite(coords).all():
        bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))[:10].tolist()
        raise InputError(f"{name} is NaN or infinite at rows {bad}; give every site finite coordinates.")
    return coords


def _distance_km(a, b, geographic):
    """Distance between points (broadcasting over leading axes), km.

    Geographic points are unit-sphere xyz: the chord converts exactly to the
    great-circle distance.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # coordinate by coordinate: no (..., d) array of differences, several times faster for
    # the (targets, k, k) neighbourhoods, and the same sums in the same order
    squares = (a[..., 0] - b[..., 0]) ** 2
    for axis in range(1, a.shape[-1]):
        squares += (a[..., axis] - b[..., axis]) ** 2
    chord = np.sqrt(np.maximum(squares, 0.0))
    return chord_to_great_circle_km(chord) if geographic else chord


def _as_data(values, name):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (times, sites), got shape {values.shape}.")
    if np.isinf(values).any():
        raise InputError(f"{name} contains infinite values; use NaN for unobserved entries.")
    return values


def _check_count(value, name, what):
    try:
        valid = not isinstance(value, bool) and int(value) == value and int(value) >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InputError(f"{name} must be a positive whole number of {what}, got {value!r}.")
    return int(value)


def _check_params(params):
    if not isinstance(params, FineScaleParams):
        raise InputError(
            f"params must be a FineScaleParams (e.g. from fit_fine_scale), got {type(params).__name__}."
        )
    if params.sill <= 0:
        raise InputError(
            "the fine-scale partial sill and nugget are both zero: the observations would be "
            "noise-free and the kriging systems singular; give a positive nugget."
        )
    return params


def _effective_nugget(params):
    return max(params.nugget, _NUGGET_FLOOR * params.sill)


# --------------------------------------------------------------------------------------
# Empirical variogram and fit
# --------------------------------------------------------------------------------------


class EmpiricalVariogram(NamedTuple):
    """Binned empirical semivariogram pooled over time.

    Attributes
    ----------
    distance : ndarray, shape (n,)
        Mean pair distance in each non-empty bin, km.
    semivariance : ndarray, shape (n,)
        ``sum (e_t(i) - e_t(j))^2 / (2 N_h)`` over the sampled pairs and times in the
        bin, data units squared.
    counts : ndarray of int64, shape (n,)
        ``N_h``: number of (pair, time) terms in the bin (both sites observed).
    """

    distance: np.ndarray
    semivariance: np.ndarray
    counts: np.ndarray


def _sample_pairs(points, neighbours, max_pairs, rng):
    """Site pairs ``(i, j)``, ``i < j``: all of them when few, else kNN pairs plus random ones.

    The selection depends on the locations only, never on the values, so every bin
    average stays unbiased; the nearest-neighbour pairs give the short distances that
    a random sample of a large network would miss.
    """
    n_sites = points.shape[0]
    n_all = n_sites * (n_sites - 1) // 2
    if n_all <= max_pairs:
        first, second = np.triu_indices(n_sites, k=1)
        return first, second
    k = min(neighbours, n_sites - 1)
    _, index = cKDTree(points).query(points, k=k + 1)
    first = np.repeat(np.arange(n_sites), k)
    second = index[:, 1:].ravel()
    n_random = max(max_pairs - first.size, 0)
    first = np.concatenate([first, rng.integers(0, n_sites, n_random)])
    second = np.concatenate([second, rng.integers(0, n_sites, n_random)])
    low, high = np.minimum(first, second), np.maximum(first, second)
    keys = np.unique(low[low != high].astype(np.int64) * n_sites + high[low != high])
    return keys // n_sites, keys % n_sites


def empirical_variogram(remainders, coords, *, geographic=False, n_bins=30, max_distance=None,
                        max_pairs=200_000, neighbours=10, min_pairs=None, seed=0):
    """Binned empirical semivariogram of remainder fields, pooled over time.

    Every time step is assumed to be a realisation of the same stationary isotropic
    field; squared differences of all sampled site pairs at all times where both sites
    are observed are averaged per distance bin. Cost ``O(T * max_pairs)``; complete
    data on at most 2000 sites are summed through the ``N x N`` site Gram matrix
    instead (cost ``O(T N^2)`` in one matrix product); larger networks form no
    ``N x N`` array.

    Parameters
    ----------
    remainders : array_like, shape (T, N)
        Remainder fields (e.g. ``z - Phi a``), NaN where unobserved. Any per-time
        offset cancels in the differences.
    coords : array_like, shape (N, d)
        Planar coordinates in km, or ``[lat, lon]`` in degrees when ``geographic``.
    geographic : bool, default False
        Use great-circle distances (km) between ``[lat, lon]`` sites.
    n_bins : int, default 30
        Number of distance bins on ``[0, max_distance]``; bin edges grow
        quadratically (``max_distance * (i / n_bins)^2``), so short distances, where
        nugget and range are decided, get narrow bins. Empty bins are dropped.
    max_distance : float, optional
        Largest pair distance used, km. Default: half the largest sampled distance.
    max_pairs : int, default 200000
        Number of site pairs sampled. All pairs are used when ``N (N - 1) / 2`` is
        not larger; otherwise each site's ``neighbours`` nearest neighbours plus
        uniformly random pairs.
    neighbours : int, default 10
        Nearest-neighbour pairs per site in the subsample.
    min_pairs : int, optional
        Bins holding fewer distinct site pairs are dropped: their averages rest on a
        handful of sites however many times are pooled, and a low one would be read
        as a short range. Default: 50, or fewer for small networks (a quarter of the
        average number of pairs per bin).
    seed : int, default 0
        Seed of the random pair sample.

    Returns
    -------
    EmpiricalVariogram
        ``(distance, semivariance, counts)``, one entry per bin kept.
    """
    remainders = _as_data(remainders, "remainders")
    points = _points(coords, "coords", geographic, n_expected=remainders.shape[1])
    if remainders.shape[1] < 2:
        raise InputError("a variogram needs at least 2 sites.")
    n_bins = _check_count(n_bins, "n_bins", "bins")
    max_pairs = _check_count(max_pairs, "max_pairs", "site pairs")
    neighbours = _check_count(neighbours, "neighbours", "neighbours")
    first, second, distance = _variogram_pairs(points, geographic, neighbours, max_pairs, seed)
    if max_distance is None:
        max_distance = 0.5 * float(distance.max())
    max_distance = float(max_distance)
    if not (np.isfinite(max_distance) and max_distance > 0):
        raise InputError(f"max_distance must be a positive distance in km, got {max_distance}.")
    keep = distance <= max_distance
    first, second, distance = first[keep], second[keep], distance[keep]
    if min_pairs is None:
        min_pairs = min(50, max(1, distance.size // (4 * n_bins)))
    min_pairs = _check_count(min_pairs, "min_pairs", "site pairs")
    edges = max_distance * np.linspace(0.0, 1.0, n_bins + 1) ** 2
    bins = np.clip(np.searchsorted(edges, distance, side="right") - 1, 0, n_bins - 1)

    n_times, n_sites = remainders.shape
    sum_squares = np.zeros(n_bins)
    counts = np.zeros(n_bins, dtype=np.int64)
    sum_distance = np.zeros(n_bins)
    if n_sites <= _VARIOGRAM_GRAM_MAX_SITES and first.size * n_times > n_sites**2 \
            and not np.isnan(remainders).any():
        # complete data: sum_t (r_ti - r_tj)^2 = G_ii + G_jj - 2 G_ij with G = R^T R, one
        # matrix product instead of a difference per pair and time
        gram = remainders.T @ remainders
        diagonal = np.diag(gram)
        pair_squares = np.maximum(diagonal[first] + diagonal[second] - 2.0 * gram[first, second], 0.0)
        sum_squares += np.bincount(bins, weights=pair_squares, minlength=n_bins)
        counts += np.bincount(bins, minlength=n_bins) * n_times
        sum_distance += np.bincount(bins, weights=distance * n_times, minlength=n_bins)
        first = first[:0]  # nothing left for the pairwise loop
    block = max(1, _BLOCK_ENTRIES // max(n_times, 1))
    for start in range(0, first.size, block):
        part = slice(start, start + block)
        diff = remainders[:, first[part]] - remainders[:, second[part]]
        valid = ~np.isnan(diff)
        pair_counts = valid.sum(axis=0)
        pair_squares = np.where(valid, diff, 0.0) ** 2
        sum_squares += np.bincount(bins[part], weights=pair_squares.sum(axis=0), minlength=n_bins)
        counts += np.bincount(bins[part], weights=pair_counts, minlength=n_bins).astype(np.int64)
        sum_distance += np.bincount(bins[part], weights=distance[part] * pair_counts, minlength=n_bins)
    filled = (counts > 0) & (np.bincount(bins, minlength=n_bins) >= min_pairs)
    if not filled.any():
        raise InputError(
            f"no distance bin holds {min_pairs} site pairs observed at the same time within "
            "max_distance; the remainders are too sparse for a variogram (lower min_pairs or "
            "use fewer bins)."
        )
    return EmpiricalVariogram(
        distance=sum_distance[filled] / counts[filled],
        semivariance=sum_squares[filled] / (2.0 * counts[filled]),
        counts=counts[filled],
    )


def _variogram_pairs(points, geographic, neighbours, max_pairs, seed):
    """The sampled site pairs of :func:`empirical_variogram` and their distances (km), cached
    by content: the candidates of a search and the two passes of a fit share the sites,
    and the great-circle distances are most of a variogram's cost on a few hundred sites."""
    def compute():
        first, second = _sample_pairs(points, neighbours, max_pairs, np.random.default_rng(seed))
        return first, second, _distance_km(points[first], points[second], geographic)

    key = GEOMETRY_CACHE.key("pairs", points, bool(geographic), neighbours, max_pairs, seed)
    return GEOMETRY_CACHE.get(key, 3 * 8 * min(max_pairs, points.shape[0] ** 2), compute)


def pooled_variance(remainders):
    """Variance of remainder fields about their per-site time means, pooled over sites.

    ``sum_i sum_t (e_t(i) - mean_i)^2 / sum_i (n_i - 1)`` over observed entries: an
    estimate of the total sill ``eta^2 + tau^2`` of time-independent fields, without
    relying on the variogram reaching its plateau inside the domain. With a single
    time step (no site observed twice) it is the variance of all entries.

    Parameters
    ----------
    remainders : array_like, shape (T, N)
        NaN where unobserved.

    Returns
    -------
    float
        Data units squared.
    """
    remainders = _as_data(remainders, "remainders")
    n_obs = np.sum(~np.isnan(remainders), axis=0)
    usable = n_obs >= 2
    if not usable.any():
        if np.sum(n_obs) < 2:
            raise InputError("the remainders hold fewer than two observed values; no variance to pool.")
        return float(np.nanvar(remainders, ddof=1))
    part = remainders[:, usable]
    centred = part - np.nanmean(part, axis=0)
    return float(np.nansum(centred**2) / np.sum(n_obs[usable] - 1))


def median_spacing_km(coords, geographic, n_sites):
    """Median distance from a site to its nearest neighbour, km."""
    points = _points(coords, "coords", geographic, n_expected=n_sites)
    _, index = cKDTree(points).query(points, k=2)
    return float(np.median(_distance_km(points, points[index[:, 1]], geographic)))


def _model_semivariance(kind, distance, partial_sill, range_km, nugget):
    return nugget + partial_sill * (1.0 - _correlation(kind, distance / range_km))


def _correlation_and_log_range_derivative(kind, scaled_distance):
    """:func:`_correlation` and ``d rho(h / ell) / d log(ell)`` for scaled distances ``h / ell``
    (dimensionless), from one exponential."""
    x = np.asarray(scaled_distance, dtype=np.float64)
    if kind == "exponential":
        correlation = np.exp(-x)
        return correlation, x * correlation
    decay = np.exp(-_SQRT3 * x)
    return (1.0 + _SQRT3 * x) * decay, 3.0 * x**2 * decay


#: The grid of :func:`_grid_start`: ranges (geometric between the bounds) and nugget
#: fractions of the sill.
_START_GRID_RANGES = 16
_START_GRID_FRACTIONS = np.linspace(0.0, 0.95, 20)


def _grid_start(kind, distance, gamma, counts, weights, bounds, sill_bounds=None, sill=None):
    """The best ``(partial_sill, range_km, nugget)`` of a grid, the start of the least squares.

    For a range and a nugget fraction ``f`` the model is ``S g(h)`` with
    ``g = f + (1 - f)(1 - rho(h / ell))``; the best sill ``S`` is closed-form (Cressie
    weights: ``1/S = sum n a / sum n a^2`` with ``a = gamma / g``; pair counts:
    ``S = sum n gamma g / sum n g^2``), clipped to ``sill_bounds``, or ``sill`` when
    given. So one vectorised pass scores a grid of ranges and fractions, and a single
    local search from its best point replaces a search from each of several starts:
    the grid is finer than such starts could afford, so it finds the basin of the best
    fit at least as reliably.
    """
    ranges = np.geomspace(bounds[0], bounds[1], _START_GRID_RANGES)
    fractions = _START_GRID_FRACTIONS
    shape = (1.0 - _correlation(kind, distance[None, :] / ranges[:, None]))[:, None, :]  # (R, 1, B)
    g = np.maximum(fractions[None, :, None] + (1.0 - fractions[None, :, None]) * shape, 1e-12)  # (R, F, B)
    n = counts / counts.sum()
    if sill is None:
        if weights == "cressie":
            a = gamma / g
            total = np.sum(n * a**2, axis=-1) / np.maximum(np.sum(n * a, axis=-1), 1e-300)
        else:
            total = np.sum(n * gamma * g, axis=-1) / np.sum(n * g**2, axis=-1)
        total = np.clip(total, *sill_bounds)
    else:
        total = np.full(g.shape[:2], float(sill))
    model = np.maximum(total[:, :, None] * g, 1e-300)
    if weights == "cressie":
        cost = np.sum(n * (gamma / model - 1.0) ** 2, axis=-1)
    else:
        cost = np.sum(n * (gamma - model) ** 2, axis=-1)
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return total[i, j] * (1.0 - fractions[j]), float(ranges[i]), total[i, j] * fractions[j]


class _LocalBlocks(NamedTuple):
    """Sufficient statistics of the local likelihood, one entry per block.

    A block is one site (the centre, position 0) with its nearest neighbours, and the
    times at which the centre and the same subset of its neighbours are observed.
    """

    cross_products: np.ndarray  # (G, m + 1, m + 1): sum over the block's times of x x^T
    counts: np.ndarray  # (G,): number of times in the block
    observed: np.ndarray  # (G, m + 1) bool: which members are observed (centre always)
    centre: np.ndarray  # (G,) int: row of ``distance`` holding the block's geometry
    distance: np.ndarray  # (C, m + 1, m + 1): distances within each centre's group, km
    # (G, m + 1, m + 1) bool: pairs of observed members; None exactly when every member of
    # every block is observed (formed once: each likelihood of a fit's optimisation reads it)
    pairs: np.ndarray | None = None


def _centre_groups(points, centres, neighbours):
    """Each centre followed by its ``neighbours`` nearest other sites, ``(C, neighbours + 1)``."""
    def compute():
        index = nearest_sites(points, points[centres], neighbours + 1)
        # a coincident site may come first in the query: put the centre itself first
        return (np.stack([np.concatenate([[site], group[group != site][:neighbours]])
                          for site, group in zip(centres, index)]),)

    key = GEOMETRY_CACHE.key("groups", points, centres, neighbours)
    return GEOMETRY_CACHE.get(key, centres.size * (neighbours + 1) * 8, compute)[0]


def _local_blocks(remainders, points, geographic, neighbours, max_centres, max_blocks, rng,
                  coverage=LOCAL_PATTERN_COVERAGE):
    """Gather the local-likelihood statistics.

    At most ``max_centres`` centre sites, drawn at random from the locations only
    (all sites when fewer); many centres matter more than many patterns, because the
    fine-scale variance differs from region to region and a few centres would give a
    regional estimate. Each centre keeps its most frequent patterns of observed
    neighbours, in order, until they hold ``coverage`` of its observed times, and at
    most ``max_blocks // n_centres`` of them (at least one): each block costs a kriging
    system per likelihood evaluation, and with gaps at random most patterns hold a
    time or two. The selection depends on where data are missing, never on their
    values. Each site's time mean is removed first, as in :func:`pooled_variance`.
    Returns None when no centre has an observed neighbour.
    """
    n_times, n_sites = remainders.shape
    neighbours = min(neighbours, n_sites - 1)
    if neighbours < 1:
        return None
    observed_counts = np.sum(~np.isnan(remainders), axis=0)
    repeated = observed_counts >= 2
    site_mean = np.zeros(n_sites)
    site_mean[repeated] = np.nanmean(remainders[:, repeated], axis=0)
    centred = remainders - site_mean
    centres = rng.permutation(n_sites)[:max_centres]
    patterns_per_centre = max(1, max_blocks // centres.size)
    groups = _centre_groups(points, centres, neighbours)
    # the geometry is the same for every candidate model of a search: cached
    distances = _neighbour_distances(points, points[centres], groups, geographic)[0]
    members = centred[:, groups]  # (T, C, m + 1)
    if not np.isnan(members).any():
        # every centre and neighbour observed at every time: one pattern per centre
        products = np.einsum("tci,tcj->cij", members, members)
        return _LocalBlocks(products, np.full(centres.size, float(n_times)),
                            np.ones(groups.shape, dtype=bool), np.arange(centres.size), distances)
    size = groups.shape[1]
    step = max(1, _LOCAL_GATHER_ENTRIES // max(1, n_times * size * size))
    parts = [_pattern_blocks(members[:, start:start + step], start, patterns_per_centre, coverage)
             for start in range(0, groups.shape[0], step)]
    products, counts, observed, centre = (np.concatenate(column) for column in zip(*parts))
    if centre.size == 0 or not observed[:, 1:].any():
        return None
    # only centres that keep a block carry their geometry
    used, centre = np.unique(centre, return_inverse=True)
    pairs = None if observed.all() else observed[:, :, None] & observed[:, None, :]
    return _LocalBlocks(products, counts, observed, centre.ravel(), distances[used], pairs)


def _pattern_blocks(members, first_centre, patterns_per_centre, coverage):
    """The kept blocks of a slab of centres (:func:`_local_blocks`).

    Patterns are coded as integers with the centre first in the most significant bit,
    so sorting the codes orders each centre's patterns as the rows of a boolean array
    would sort; ties in frequency keep that order.
    """
    n_times, n_centres, size = members.shape
    seen = ~np.isnan(members)
    bits = np.left_shift(1, np.arange(size - 1, -1, -1, dtype=np.int64))
    keys = np.arange(n_centres, dtype=np.int64)[None, :] * (1 << size) + seen @ bits  # (T, C)
    entries = np.flatnonzero(seen[:, :, 0].ravel())  # times at which the centre is observed
    if entries.size == 0:
        empty = np.zeros((0, size, size))
        return empty, np.zeros(0), np.zeros((0, size), dtype=bool), np.zeros(0, dtype=np.int64)
    unique_keys, which, key_counts = np.unique(keys.ravel()[entries], return_inverse=True, return_counts=True)
    key_centre = unique_keys >> size
    order = np.lexsort((-key_counts, key_centre))  # by centre, then most frequent first (stable)
    first = np.searchsorted(key_centre[order], key_centre[order], side="left")
    position = np.arange(order.size) - first
    counts_in_order = key_counts[order]
    held_before = np.cumsum(counts_in_order) - counts_in_order
    held_before -= held_before[first]
    centre_total = np.bincount(key_centre, weights=key_counts)[key_centre[order]]
    keep = (position < patterns_per_centre) & (held_before < coverage * centre_total)
    kept = np.sort(order[keep])  # block order: by centre, then pattern code
    block_of_key = np.full(unique_keys.size, -1)
    block_of_key[kept] = np.arange(kept.size)
    block = block_of_key[np.asarray(which).ravel()]
    rows = block >= 0
    values = np.where(seen, members, 0.0).reshape(n_times * n_centres, size)[entries[rows]]
    block = block[rows]
    sorting = np.argsort(block, kind="stable")
    starts = np.searchsorted(block[sorting], np.arange(kept.size))
    values = values[sorting]
    products = np.add.reduceat(values[:, :, None] * values[:, None, :], starts, axis=0)
    codes = unique_keys[kept] & ((1 << size) - 1)
    observed = (codes[:, None] & bits[None, :]) != 0
    return products, key_counts[kept].astype(np.float64), observed, key_centre[kept] + first_centre


def _per_block(blocks, per_centre):
    """An array over centres ``(C, ...)`` taken for each block ``(G, ...)``; complete data
    have one block per centre, in order, and need no copy."""
    centre = blocks.centre
    if centre.size == per_centre.shape[0] and centre[-1] == centre.size - 1 and np.all(np.diff(centre) == 1):
        return per_centre
    return per_centre[centre]


def _local_system(blocks, correlation, partial_sill, nugget):
    """The model covariance of every block ``(G, m + 1, m + 1)``, centre first, and its
    mask of observed pairs (None when every member of every block is observed).
    Unobserved neighbours are decoupled (unit diagonal, zero covariance); a floor on the
    nugget keeps coincident sites and a zero nugget from a singular system."""
    white = max(nugget, _NUGGET_FLOOR * (partial_sill + nugget))
    diagonal = np.arange(correlation.shape[1])
    pairs = blocks.pairs
    if pairs is None:  # every member of every block observed
        covariance = partial_sill * correlation
        covariance[:, diagonal, diagonal] = partial_sill + white
        return covariance, None
    covariance = np.where(pairs, partial_sill * correlation, 0.0)
    covariance[:, diagonal, diagonal] = np.where(blocks.observed, partial_sill + white, 1.0)
    return covariance, pairs


def _local_terms(blocks, covariance, weights, floor):
    """Mean negative log-likelihood of the blocks given the kriging ``weights``; also the
    unfloored and floored variances and the squared errors summed over each block's times."""
    cross = covariance[:, 1:, 0]
    raw_variance = covariance[:, 0, 0] - np.einsum("gk,gk->g", weights, cross)
    variance = np.maximum(raw_variance, floor)
    products = blocks.cross_products
    squared_error = (products[:, 0, 0] - 2.0 * np.einsum("gk,gk->g", weights, products[:, 1:, 0])
                     + np.einsum("gk,gk->g", (products[:, 1:, 1:] @ weights[:, :, None])[:, :, 0], weights))
    value = float(np.sum(blocks.counts * np.log(variance) + squared_error / variance) / blocks.counts.sum())
    return value, raw_variance, variance, squared_error


def _local_negative_loglik(blocks, kind, partial_sill, range_km, nugget):
    """Mean negative Gaussian log-likelihood of each centre given its observed neighbours.

    A Vecchia-type composite likelihood pooled over time (times treated as
    independent replicates): for each block, ``sum_t log v + (x_0 - w^T x_nb)^2 / v``
    with simple-kriging weights ``w`` and variance ``v`` from the model covariance
    ``C_fine + tau^2 I``. Unobserved neighbours are decoupled (unit diagonal, zero
    covariance, zero data) so that every block has the same size.
    """
    correlation = _per_block(blocks, _correlation(kind, blocks.distance / range_km))
    covariance, _ = _local_system(blocks, correlation, partial_sill, nugget)
    weights = np.linalg.solve(covariance[:, 1:, 1:], covariance[:, 1:, 0][:, :, None])[:, :, 0]
    return _local_terms(blocks, covariance, weights, _NUGGET_FLOOR * (partial_sill + nugget))[0]


def _local_grid_values(blocks, kind, sill, fractions, log_ranges):
    """:func:`_local_negative_loglik` at ``(sill (1 - f), exp(r), sill f)`` for every ``f`` in
    ``fractions`` and ``r`` in ``log_ranges``, shape (F, R): one correlation and one
    batched solve per range for all fractions (the same systems and sums as one call each)."""
    values = np.empty((len(fractions), len(log_ranges)))
    for column, log_range in enumerate(log_ranges):
        correlation = _per_block(blocks, _correlation(kind, blocks.distance / np.exp(log_range)))
        systems = np.stack([_local_system(blocks, correlation, sill * (1.0 - fraction), sill * fraction)[0]
                            for fraction in fractions])  # (F, G, m + 1, m + 1)
        weights = np.linalg.solve(systems[:, :, 1:, 1:], systems[:, :, 1:, :1])[..., 0]
        for row, fraction in enumerate(fractions):
            floor = _NUGGET_FLOOR * (sill * (1.0 - fraction) + sill * fraction)
            values[row, column] = _local_terms(blocks, systems[row], weights[row], floor)[0]
    return values


def _local_negative_loglik_gradient(blocks, kind, sill, fraction, log_range):
    """:func:`_local_negative_loglik` at ``(sill (1 - fraction), exp(log_range), sill fraction)``
    and its gradient in ``(fraction, log_range)``.

    With ``A`` the neighbours' covariance, ``c`` the cross covariance, ``s`` the centre's
    variance, ``w = A^-1 c`` and ``v = s - c.w``: ``dv = ds - 2 dc.w + w^T dA w`` and,
    with ``q = A^-1 (P w - p)`` (``P``, ``p`` the neighbours' and cross products),
    ``dSE = 2 (dc - dA w).q``; one factorisation of ``A`` gives ``w`` and ``q``, where a
    difference quotient would take two more likelihoods per step. Both derivatives are
    carried in one stacked array.
    """
    partial_sill, range_km, nugget = sill * (1.0 - fraction), float(np.exp(log_range)), sill * fraction
    correlation, by_log_range = _correlation_and_log_range_derivative(kind, blocks.distance / range_km)
    # derivatives of the covariance in fraction and in log(range), per centre then per
    # block; the diagonal, partial sill plus nugget, is the sill whatever the split (below
    # the floor the nugget is held at it; the derivative is the one from above, where the
    # optimiser goes from a zero nugget)
    by_centre = np.empty((2,) + correlation.shape)  # (2, C, m + 1, m + 1)
    np.multiply(correlation, -sill, out=by_centre[0])
    np.multiply(by_log_range, partial_sill, out=by_centre[1])
    diagonal = np.arange(correlation.shape[1])
    by_centre[:, :, diagonal, diagonal] = 0.0
    per_block = _per_block(blocks, correlation)
    derivative = by_centre if per_block is correlation else by_centre[:, blocks.centre]  # (2, G, m + 1, m + 1)
    covariance, pairs = _local_system(blocks, per_block, partial_sill, nugget)
    if pairs is not None:  # in place: a gathered copy, or this call's own per-centre array
        derivative *= pairs

    factor = _BatchedCholesky(covariance[:, 1:, 1:])
    weights = factor.solve(covariance[:, 1:, 0])
    floor = _NUGGET_FLOOR * sill
    value, raw_variance, variance, squared_error = _local_terms(blocks, covariance, weights, floor)
    products = blocks.cross_products
    adjoint = factor.solve((products[:, 1:, 1:] @ weights[:, :, None])[:, :, 0] - products[:, 1:, 0])
    d_cross = derivative[:, :, 1:, 0]
    moved = (derivative[:, :, 1:, 1:] @ weights[:, :, None])[..., 0]  # dA w
    d_variance = np.where(raw_variance > floor, np.einsum("dgk,gk->dg", moved - 2.0 * d_cross, weights), 0.0)
    d_error = 2.0 * np.einsum("dgk,gk->dg", d_cross - moved, adjoint)
    counts = blocks.counts
    gradient = np.sum((counts / variance - squared_error / variance**2) * d_variance + d_error / variance,
                      axis=1) / counts.sum()
    return value, gradient


def _split_sill_locally(blocks, kind, sill, range_km, nugget, range_bounds, warm=False):
    """Nugget fraction and range maximising the local likelihood at a fixed sill.

    The local likelihood sees lags up to a few site spacings, where the nugget and the
    slope of the variogram at the origin are decided but the plateau is not; the sill
    therefore comes from the variogram (or the pooled variance) and only its split
    and the range are fitted here. ``warm``: one local search from the given split
    (a neighbouring fit's), without the grid and the polish.
    """
    log_bounds = (np.log(range_bounds[0]), np.log(range_bounds[1]))

    def objective(x):
        fraction, log_range = x
        return _local_negative_loglik(blocks, kind, sill * (1.0 - fraction), np.exp(log_range),
                                      sill * fraction)

    def with_gradient(x):
        return _local_negative_loglik_gradient(blocks, kind, sill, float(x[0]), float(x[1]))

    # The likelihood can have a local optimum at each end of the range axis, and the
    # variogram's range is arbitrary when its partial sill is zero; a coarse grid picks
    # the basin, so a change of the data in the last digit cannot move the start (and
    # the answer) from one optimum to the other.
    start = [float(np.clip(nugget / sill, 0.0, 1.0)), float(np.clip(np.log(range_km), *log_bounds))]
    if not warm:
        # one local search, from the best of the grid and the given split: a second search
        # from the given split as well ended at the same model (covariances equal to 1e-11)
        # on 69 cold splits (ozone complete and with gaps, daily and persistent networks,
        # stationary fields) and took as many gradients again
        log_ranges = np.linspace(*log_bounds, _SPLIT_GRID_RANGES)
        values = _local_grid_values(blocks, kind, sill, _SPLIT_GRID_FRACTIONS, log_ranges)
        grid = [(value, (fraction, log_range)) for fraction, row in zip(_SPLIT_GRID_FRACTIONS, values)
                for log_range, value in zip(log_ranges, row)]
        grid.append((objective(np.array(start)), tuple(start)))
        start = list(min(grid)[1])
    bounds = np.array([(0.0, 1.0), log_bounds])
    # a warm start (a candidate of a search, refitted in full if chosen) needs its optimum
    # to the precision of a score, not of a final estimate; it starts near it, where
    # scaling each coordinate by its curvature saves L-BFGS-B a fifth of its evaluations
    scale = _curvature_scale(with_gradient, np.clip(start, bounds[:, 0], bounds[:, 1]), bounds) if warm \
        else np.ones(2)

    def scaled(z):
        value, gradient = with_gradient(z * scale)
        return value, gradient * scale

    best = minimize(scaled, np.asarray(start) / scale, jac=True, method="L-BFGS-B",
                    bounds=bounds / scale[:, None], options={"ftol": _WARM_SPLIT_FTOL} if warm else None)
    best.x = best.x * scale
    fraction, log_range = best.x if warm else _newton_polish(objective, best.x, [(0.0, 1.0), log_bounds])
    # Spatially white remainders: the pure nugget (range irrelevant) unless the correlated
    # part buys more likelihood than its two parameters cost (AIC on the pooled composite
    # likelihood, normalised per observation). Without it, a flat optimum near the
    # boundary leaves a partial sill of 1e-6 of the sill wherever the optimiser stopped.
    white = objective(np.array([1.0, log_range]))
    if float(blocks.counts.sum()) * (white - objective(np.array([fraction, log_range]))) <= 2 * _WHITE_AIC_PARAMETERS:
        fraction = 1.0
    return sill * (1.0 - fraction), float(np.exp(log_range)), sill * fraction


def _curvature_scale(with_gradient, x, bounds, step=1e-4):
    """``1 / sqrt(|d2f / dx_i^2|)`` at ``x`` by forward differences of the gradient
    (inwards at a bound): coordinates in which a quasi-Newton search starts well scaled."""
    gradient = with_gradient(x)[1]
    curvature = np.empty(x.size)
    for axis in range(x.size):
        move = np.zeros(x.size)
        move[axis] = step if x[axis] + step <= bounds[axis, 1] else -step
        curvature[axis] = (with_gradient(x + move)[1][axis] - gradient[axis]) / move[axis]
    return 1.0 / np.sqrt(np.maximum(np.abs(curvature), 1e-8))


#: Steps of :func:`_newton_polish` below this that no longer halve are rounding, not progress.
_POLISH_FLOOR = 1e-9


def _newton_polish(objective, x, bounds, step=1e-4, max_iter=20):
    """Newton steps on the central-difference gradient from a quasi-Newton optimum.

    L-BFGS-B stops where its forward-difference gradient is small, a point that moves
    by the optimiser's tolerance when the data change in the last digit (the same
    data summed in another order). The root of a fixed-step central-difference
    gradient is a smooth function of the data, so polishing to it makes the estimate
    reproducible to rounding. Coordinates within a few steps of a bound stay where
    the optimiser put them. The steps stop at the rounding floor of the differences
    (a step under :data:`_POLISH_FLOOR` no shorter than half the last), where they
    would only circle the root: on the ozone splits the two-parameter split ran 9-20
    steps of 9 likelihoods each, circling at 1e-11.
    """
    x = np.array(x, dtype=np.float64)
    lower = np.array([b[0] for b in bounds])
    upper = np.array([b[1] for b in bounds])
    free = (x - lower > 4 * step) & (upper - x > 4 * step)
    if not free.any():
        return x
    index = np.flatnonzero(free)
    last = np.inf
    for _ in range(max_iter):
        gradient, hessian = _central_derivatives(objective, x, index, step)
        try:
            curvature, directions = np.linalg.eigh(hessian)
        except np.linalg.LinAlgError:
            break
        flat = np.abs(curvature) <= 1e-8 * max(np.abs(curvature).max(), np.finfo(float).tiny)
        if np.any((curvature < 0) & ~flat):
            break  # not a local minimum of the differenced objective: keep x
        # directions the objective does not depend on (a range under a zero partial
        # sill) are left alone; the others are solved
        along = directions.T @ gradient
        move = -directions[:, ~flat] @ (along[~flat] / curvature[~flat])
        size = float(np.max(np.abs(move))) if move.size else 0.0
        if size > 0.5 * last and size < _POLISH_FLOOR:
            break  # at the rounding floor: x is the root to within it
        last = size
        trial = x.copy()
        trial[index] += move
        if np.any(trial[index] - lower[index] < 4 * step) or np.any(upper[index] - trial[index] < 4 * step):
            break
        x = trial
        if np.max(np.abs(move)) < 1e-13:
            break
    return x


def _central_derivatives(function, x, index, step):
    """Central-difference gradient and Hessian of ``function`` in the coordinates ``index``."""
    n = len(index)
    centre = function(x)
    gradient = np.zeros(n)
    hessian = np.zeros((n, n))
    shifted = {}

    def value(offsets):
        key = tuple(offsets)
        if key not in shifted:
            point = x.copy()
            point[index] += step * np.asarray(offsets, dtype=np.float64)
            shifted[key] = function(point)
        return shifted[key]

    for i in range(n):
        plus = [0] * n
        plus[i] = 1
        minus = [0] * n
        minus[i] = -1
        gradient[i] = (value(plus) - value(minus)) / (2 * step)
        hessian[i, i] = (value(plus) - 2 * centre + value(minus)) / step**2
        for j in range(i):
            corners = []
            for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                offsets = [0] * n
                offsets[i], offsets[j] = a, b
                corners.append(value(offsets))
            hessian[i, j] = hessian[j, i] = (corners[0] - corners[1] - corners[2] + corners[3]) / (4 * step**2)
    return gradient, hessian


def _warn_if_nugget_unidentified(params, spacing, range_lower):
    """RuntimeWarning when the data do not pin the nugget down, or put nothing in it."""
    if params.partial_sill <= 0.05 * params.sill:
        return  # spatially white at the site spacing: the sill is the nugget
    if params.range_km <= 1.01 * range_lower or params.correlation(spacing) < IDENTIFIABLE_CORRELATION:
        warn(
            f"the fine-scale nugget is not identifiable from these data: the fitted range "
            f"({params.range_km:.4g} km) is short against the typical nearest-neighbour distance "
            f"({spacing:.4g} km; fitted correlation there {float(params.correlation(spacing)):.2g}), so the "
            f"split of the sill {params.sill:.4g} into nugget {params.nugget:.4g} and partial sill "
            f"{params.partial_sill:.4g} is arbitrary. Intervals at observed sites rest on that split; "
            "consider fine_scale=None or denser sites.",
            RuntimeWarning,
        )
    elif params.nugget <= 1e-3 * params.sill:
        warn(
            f"the fitted fine-scale nugget is essentially zero ({params.nugget:.3g} against a sill of "
            f"{params.sill:.4g}): the data show no white-noise component at the site spacing, so kriging "
            "reproduces observed values with near-zero variance. Check that the data are noise-free.",
            RuntimeWarning,
        )


def fit_fine_scale(remainders, coords, kind="exponential", *, geographic=False, weights="cressie",
                   sill="free", variogram=None, n_bins=30, max_distance=None, max_pairs=200_000,
                   neighbours=10, min_pairs=None, seed=0, split="local", local_neighbours=LOCAL_NEIGHBOURS,
                   local_max_centres=LOCAL_MAX_CENTRES, local_max_blocks=LOCAL_MAX_BLOCKS, start=None):
    """Fit ``(eta^2, ell, tau^2)`` to pooled remainder fields.

    Two steps, each on the part of the data that identifies its parameters:

    1. The sill: the model semivariogram ``tau^2 + eta^2 (1 - rho(h / ell))`` is
       fitted to the binned empirical one (:func:`empirical_variogram`) by weighted
       least squares with bounds ``eta^2, tau^2 >= 0`` and ``ell`` between the first
       and the last bin distance, and not below half the median nearest-neighbour
       spacing of the sites, from the best point of a grid of ranges and nugget
       fractions with the sill in closed form (:func:`_grid_start`).
    2. The split of that sill into nugget and partial sill, and the range
       (``split="local"``): a Vecchia-type local likelihood, pooled over time, of each
       site given its ``local_neighbours`` nearest observed sites, on a random
       subsample of sites, maximised over the nugget fraction and ``ell`` at the
       fixed sill.

    Why not the least-squares nugget: it is an extrapolation of the binned variogram
    from the first bin to distance 0 through the assumed shape. When the first bin
    lies at a good fraction of a range (a grid whose spacing is comparable with
    ``ell``), the extrapolation is ill-conditioned and the bins mix pair classes of
    different sites (on a lat/lon grid east-west neighbours shorten towards the
    poles): moving a bin edge flips the nugget between its plausible value and the
    bound 0 (measured on the bundled ozone residuals: 0.94 DU^2 with 69 months,
    1e-17 with 70). The local likelihood uses every site's own nearest neighbours at
    their exact distances, needs no bins, and is what local kriging relies on; the
    plateau, which neighbours a few spacings away cannot see, stays with the
    variogram.

    A ``RuntimeWarning`` is raised when the nugget is not identifiable (the fitted
    range at its lower bound, or a fitted correlation below
    :data:`IDENTIFIABLE_CORRELATION` at the typical nearest-neighbour distance, with a
    partial sill above 5 % of the sill) or comes out essentially zero.

    No spatial structure: when the remainders are spatially white the empirical
    semivariogram is flat at their variance; the fit then puts the variance in the
    nugget (``tau^2`` = pooled variance) and ``eta^2`` near 0. ``ell`` is not
    identified in that case; its value is whatever the optimiser stopped at and has
    no effect on kriging because ``eta^2`` is (nearly) zero. Structure on scales
    below the site spacing is likewise estimated as nugget: the lower bound on ``ell``
    keeps the fit from reading the noise of the few closest pairs as a tiny range,
    and correlation that dies out before the nearest neighbour cannot help kriging.

    Remainders ``z - Phi a`` of a projection on an orthonormal basis lose the part of
    the fine-scale field that lies in the span of the basis (about ``K / N`` of its
    variance); the estimates refer to what is left, which is what kriging uses.

    Parameters
    ----------
    remainders : array_like, shape (T, N)
        Training remainders, NaN where unobserved; time steps are pooled.
    coords : array_like, shape (N, d)
        Planar km, or ``[lat, lon]`` degrees when ``geographic``.
    kind : {"exponential", "matern32"}, default "exponential"
    geographic : bool, default False
    weights : {"cressie", "npairs"}, default "cressie"
        ``"cressie"``: weights ``N_h / gamma_model(h)^2`` (Cressie 1985; relative
        errors, so the small semivariances near the origin count); ``"npairs"``:
        weights ``N_h``.
    start : FineScaleParams, optional
        A neighbouring fit (e.g. of the remainders beyond one more or one fewer
        component): one local search from it in each step, without the grids of
        starting values and the final polish; a cheaper, slightly less reproducible
        fit for scoring candidates.
    sill : {"free", "pooled"}, default "free"
        ``"free"`` fits all three parameters; ``"pooled"`` fixes ``eta^2 + tau^2`` to
        :func:`pooled_variance` of the remainders and fits the split and the range
        (useful when the range is long against the domain and the empirical
        semivariogram does not reach its plateau). With ``"free"`` the pooled
        variance is the starting sill; the two agree when the model fits.
    variogram : EmpiricalVariogram, optional
        A precomputed empirical semivariogram; the binning arguments are then unused.
    n_bins, max_distance, max_pairs, neighbours, min_pairs, seed
        Passed to :func:`empirical_variogram`; ``seed`` also draws the sites of the
        local likelihood.
    split : {"local", "variogram"}, default "local"
        ``"local"``: the nugget fraction and the range from the local likelihood (step
        2); ``"variogram"``: all three parameters from the least-squares fit (the
        nugget is then an extrapolation and can collapse to 0, see above).
    local_neighbours : int, default :data:`LOCAL_NEIGHBOURS`
        Nearest sites each site is conditioned on in the local likelihood.
    local_max_centres, local_max_blocks : int, default :data:`LOCAL_MAX_CENTRES`, :data:`LOCAL_MAX_BLOCKS`
        Largest number of sites conditioned on their neighbours, and of (site, pattern
        of observed neighbours) blocks, in the local likelihood; bound time and memory
        for large N and T.

    Returns
    -------
    FineScaleParams

    Warns
    -----
    RuntimeWarning
        When the nugget is not identifiable from the data or is essentially zero.
    """
    _check_kind(kind)
    if split not in ("local", "variogram"):
        raise InputError(f"unknown split option {split!r}; use 'local' or 'variogram'.")
    local_neighbours = _check_count(local_neighbours, "local_neighbours", "neighbours")
    if local_neighbours > _LOCAL_MAX_NEIGHBOURS:
        raise InputError(f"local_neighbours={local_neighbours} is more than a local likelihood needs; "
                         f"use at most {_LOCAL_MAX_NEIGHBOURS} (default {LOCAL_NEIGHBOURS}).")
    local_max_centres = _check_count(local_max_centres, "local_max_centres", "sites")
    local_max_blocks = _check_count(local_max_blocks, "local_max_blocks", "blocks")
    if weights not in ("cressie", "npairs"):
        raise InputError(f"unknown weights {weights!r}; use 'cressie' or 'npairs'.")
    if sill not in ("free", "pooled"):
        raise InputError(f"unknown sill option {sill!r}; use 'free' or 'pooled'.")
    remainders = _as_data(remainders, "remainders")
    if variogram is None:
        variogram = empirical_variogram(
            remainders, coords, geographic=geographic, n_bins=n_bins, max_distance=max_distance,
            max_pairs=max_pairs, neighbours=neighbours, min_pairs=min_pairs, seed=seed,
        )
    distance = np.asarray(variogram.distance, dtype=np.float64)
    gamma = np.asarray(variogram.semivariance, dtype=np.float64)
    counts = np.asarray(variogram.counts, dtype=np.float64)
    if distance.size < 3:
        raise InputError(
            f"the empirical variogram has {distance.size} non-empty bins; at least 3 are needed "
            "(use more bins, a larger max_distance or more sites)."
        )
    total = pooled_variance(remainders)
    if not total > 0:
        raise InputError("the remainders have zero variance; there is nothing to fit.")
    spacing = median_spacing_km(coords, geographic, remainders.shape[1])
    range_bounds = (max(float(distance[0]), 0.5 * spacing), float(distance[-1]))
    if not range_bounds[1] > range_bounds[0]:
        raise InputError("the empirical variogram bins span no distance range; check the coordinates.")
    scale = total
    root_counts = np.sqrt(counts / counts.sum())
    floor = 1e-12 * scale

    def parameters(x):
        if sill == "pooled":
            return total * (1.0 - x[0]), x[1], total * x[0]
        return x[0] * scale, x[1], x[2] * scale

    def residuals(x):
        partial_sill, range_km, nugget = parameters(x)
        model = _model_semivariance(kind, distance, partial_sill, range_km, nugget)
        if weights == "cressie":
            return root_counts * (gamma - model) / np.maximum(model, floor)
        return root_counts * (gamma - model) / scale

    def jacobian(x):
        # analytic: a difference quotient costs two residual evaluations per parameter
        # and is most of the fit's cost when many candidate models are fitted
        partial_sill, range_km, nugget = parameters(x)
        correlation, by_log_range = _correlation_and_log_range_derivative(kind, distance / range_km)
        by_range = -partial_sill * by_log_range / range_km
        if sill == "pooled":
            model_derivative = np.stack([total * correlation, by_range], axis=1)
        else:
            model_derivative = np.stack([scale * (1.0 - correlation), by_range, np.full(distance.size, scale)],
                                        axis=1)
        if weights == "cressie":
            model = nugget + partial_sill * (1.0 - correlation)
            factor = np.where(model > floor, -root_counts * gamma / np.maximum(model, floor) ** 2,
                              -root_counts / floor)
        else:
            factor = -root_counts / scale
        return factor[:, None] * model_derivative

    upper_sill = 10.0 * max(float(gamma.max()), total) / scale
    if start is None:
        partial_sill, range_km, nugget = _grid_start(
            kind, distance, gamma, counts, weights, range_bounds, sill_bounds=(0.0, upper_sill * scale),
            sill=total if sill == "pooled" else None)
    else:
        partial_sill, range_km, nugget = start.partial_sill, float(np.clip(start.range_km, *range_bounds)), start.nugget
    if sill == "pooled":
        x0 = [nugget / total, range_km]
        lower, upper = [0.0, range_bounds[0]], [1.0, range_bounds[1]]
    else:
        x0 = [partial_sill / scale, range_km, nugget / scale]
        lower, upper = [0.0, range_bounds[0], 0.0], [upper_sill, range_bounds[1], upper_sill]
    x0 = np.clip(x0, lower, upper)
    best = least_squares(residuals, x0, jac=jacobian, bounds=(lower, upper),
                         x_scale=np.abs(np.asarray(upper)) + 1e-12, method="trf", **_TIGHT_LSQ)
    best_bounds = (np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
    # polish in coordinates scaled to the bounds, where one difference step suits all
    x_scale = np.abs(best_bounds[1]) + 1e-12
    polished = best.x / x_scale if start is not None else \
        _newton_polish(lambda z: 0.5 * float(np.sum(residuals(z * x_scale) ** 2)), best.x / x_scale,
                              list(zip(best_bounds[0] / x_scale, best_bounds[1] / x_scale)))
    best.x = polished * x_scale
    if sill == "pooled":
        nugget_fraction, range_km = best.x
        partial_sill, nugget = total * (1.0 - nugget_fraction), total * nugget_fraction
    else:
        partial_sill, range_km, nugget = best.x[0] * scale, best.x[1], best.x[2] * scale
    partial_sill, nugget = max(float(partial_sill), 0.0), max(float(nugget), 0.0)
    lowest_range = range_bounds[0]
    if split == "local" and partial_sill + nugget > 0:
        blocks = _local_blocks(remainders, _points(coords, "coords", geographic), geographic,
                               local_neighbours, local_max_centres, local_max_blocks,
                               np.random.default_rng(seed))
        if blocks is not None:
            # the local likelihood uses each site's own nearest neighbours at their exact
            # distances, so ranges below the first bin are identified down to the spacing
            lowest_range = min(0.5 * spacing, range_bounds[0])
            total_sill = partial_sill + nugget
            if start is not None and start.sill > 0:  # warm: from the neighbouring fit's split
                range_km, nugget = start.range_km, total_sill * start.nugget / start.sill
            partial_sill, range_km, nugget = _split_sill_locally(
                blocks, kind, total_sill, float(range_km), nugget, (lowest_range, range_bounds[1]),
                warm=start is not None)
    params = FineScaleParams(kind=kind, partial_sill=max(float(partial_sill), 0.0),
                             range_km=float(range_km), nugget=max(float(nugget), 0.0))
    _warn_if_nugget_unidentified(params, spacing, lowest_range)
    return params


# --------------------------------------------------------------------------------------
# Local simple kriging
# --------------------------------------------------------------------------------------


def _local_weights(observed_points, target_points, neighbour_index, params, geographic):
    """Simple-kriging weights of each target on its neighbours (batched ``k x k`` solves).

    Parameters
    ----------
    observed_points : ndarray, shape (n, d)
    target_points : ndarray, shape (b, d)
    neighbour_index : ndarray of int, shape (b, k)
        Rows of ``observed_points`` used for each target.

    Returns
    -------
    weights : ndarray, shape (b, k)
    covariance : ndarray, shape (b, k)
        ``C_fine(target, neighbour)``.
    """
    between, to_target = _neighbour_distances(observed_points, target_points, neighbour_index, geographic)
    system = params.covariance(between)
    diagonal = np.arange(neighbour_index.shape[1])
    system[:, diagonal, diagonal] += _effective_nugget(params)
    covariance = params.covariance(to_target)
    return _BatchedCholesky(system).solve(covariance), covariance


class _BatchedCholesky:
    """A batch of symmetric positive definite ``A`` (b, k, k), factorised once for solves.

    A batched Cholesky factorisation and the two triangular substitutions row by row over
    the whole batch: on hundreds of 30 x 30 systems a quarter less CPU than the batched
    LU of ``np.linalg.solve`` (which also copies each matrix), and on thousands of 8 x 8
    systems solved twice less than half of a batched inverse. A batch with a system that
    is not numerically positive definite is solved by LU instead.
    """

    def __init__(self, systems):
        self.systems = systems
        try:
            self.lower = np.linalg.cholesky(systems)
        except np.linalg.LinAlgError:
            self.lower = None
        else:
            self.diagonal = np.diagonal(self.lower, axis1=1, axis2=2)

    def solve(self, right):
        """``x_b = A_b^{-1} y_b`` for ``right`` (b, k)."""
        if self.lower is None:
            return np.linalg.solve(self.systems, right[:, :, None])[:, :, 0]
        lower, diagonal = self.lower, self.diagonal
        size = right.shape[1]
        forward = np.empty_like(right)
        for row in range(size):
            forward[:, row] = (right[:, row] - np.einsum("bj,bj->b", lower[:, row, :row], forward[:, :row])) \
                / diagonal[:, row]
        solution = np.empty_like(right)
        for row in range(size - 1, -1, -1):
            solution[:, row] = (forward[:, row] - np.einsum("bj,bj->b", lower[:, row + 1:, row],
                                                            solution[:, row + 1:])) / diagonal[:, row]
        return solution


def _neighbour_distances(observed_points, target_points, neighbour_index, geographic):
    """Distances within each target's neighbourhood ``(b, k, k)`` and to the target ``(b, k)``, km."""
    def compute():
        neighbours = observed_points[neighbour_index]
        return (_distance_km(neighbours[:, :, None, :], neighbours[:, None, :, :], geographic),
                _distance_km(neighbours, target_points[:, None, :], geographic))

    key = GEOMETRY_CACHE.key("distances", observed_points, target_points, neighbour_index, bool(geographic))
    return GEOMETRY_CACHE.get(key, neighbour_index.size * neighbour_index.shape[1] * 8, compute)


def nearest_sites(points, queries, k):
    """Positions ``(q, k)`` of the ``k`` nearest ``points`` to each of ``queries`` (cached
    by content, read-only)."""
    points, queries = np.asarray(points, dtype=np.float64), np.asarray(queries, dtype=np.float64)

    def compute():
        _, index = cKDTree(points).query(queries, k=k)
        return (np.asarray(index).reshape(queries.shape[0], k),)

    return GEOMETRY_CACHE.get(GEOMETRY_CACHE.key("nearest", points, queries, k), queries.shape[0] * k * 8,
                               compute)[0]


def _target_blocks(n_targets, k, n_times, dim):
    per_target = max(k * k * max(dim, 2), k * max(n_times, 1), 1)
    block = max(1, _BLOCK_ENTRIES // per_target)
    for start in range(0, n_targets, block):
        yield slice(start, min(start + block, n_targets))


def _neighbour_weights(observed_points, target_points, k, n_times, params, geographic):
    """Simple-kriging weights of each target on its ``k`` nearest observed points, in blocks.

    Yields
    ------
    part : slice
        The block of targets.
    neighbour_index : ndarray (B, k)
        Positions of each target's neighbours among ``observed_points``.
    weights, covariance : ndarray (B, k)
        Kriging weights and target-neighbour covariances (:func:`_local_weights`).
    """
    k_here = min(k, observed_points.shape[0])
    for part in _target_blocks(target_points.shape[0], k_here, n_times, observed_points.shape[1]):
        neighbour_index = nearest_sites(observed_points, target_points[part], k_here)
        weights, covariance = _local_weights(observed_points, target_points[part], neighbour_index,
                                             params, geographic)
        yield part, neighbour_index, weights, covariance


def local_simple_krige(values, coords, target_coords, params, *, k=20, geographic=False,
                       include_nugget=True):
    """Simple kriging (zero mean) of fine-scale remainders from the k nearest observed sites.

    For each time, each target is predicted from the ``k`` nearest sites observed at
    that time, with covariance ``C_fine + tau^2 I`` among the observations and
    ``C_fine`` between the target's latent value and the observations. Times sharing a
    missingness pattern share the neighbour search and the ``k x k`` solves; targets
    are processed in blocks so memory stays bounded whatever ``P``.

    A target that coincides with an observed site predicts the latent (nugget-free)
    value there: the site's own observation enters with covariance ``eta^2`` on the
    right and ``eta^2 + tau^2`` on the diagonal, so it is shrunk towards its
    neighbours by the nugget (with ``tau^2 = 0`` it is reproduced exactly, with zero
    variance).

    Parameters
    ----------
    values : array_like, shape (T, N_obs)
        Zero-mean remainders at the observation sites, NaN where unobserved.
    coords : array_like, shape (N_obs, d)
        Observation sites: planar km, or ``[lat, lon]`` degrees when ``geographic``.
    target_coords : array_like, shape (P, d)
        Prediction sites, same convention.
    params : FineScaleParams
    k : int, default 20
        Number of nearest observed sites per target (fewer when fewer are observed);
        with ``k >= N_obs`` the result is the exact dense simple kriging.
    geographic : bool, default False
        Neighbours searched on unit-sphere coordinates (correct across the dateline
        and near the poles), covariances on great-circle km.
    include_nugget : bool, default True
        Add ``tau^2`` to the variance: a new observation rather than the latent
        fine-scale value.

    Returns
    -------
    mean : ndarray, shape (T, P)
        Kriged remainders, data units.
    variance : ndarray, shape (T, P)
        ``eta^2 [+ tau^2] - c^T C^{-1} c``, data units squared. A time with nothing
        observed gets the prior (mean 0, variance ``eta^2 [+ tau^2]``).
    """
    values = _as_data(values, "values")
    params = _check_params(params)
    k = _check_count(k, "k", "neighbours")
    points = _points(coords, "coords", geographic, n_expected=values.shape[1])
    targets = _points(target_coords, "target_coords", geographic)
    if targets.shape[1] != points.shape[1]:
        raise InputError(
            f"target_coords have {targets.shape[1]} columns but coords have {points.shape[1]}; "
            "use the same coordinate system for both."
        )
    n_times, n_targets = values.shape[0], targets.shape[0]
    prior = params.partial_sill + (params.nugget if include_nugget else 0.0)
    mean = np.zeros((n_times, n_targets))
    variance = np.full((n_times, n_targets), prior)
    for times, sites in observation_patterns(values):
        observed = values[np.ix_(times, sites)]
        observed_points = points[sites]
        for part, neighbour_index, weights, covariance in _neighbour_weights(
                observed_points, targets, k, times.size, params, geographic):
            mean[times, part] = np.einsum("tbk,bk->tb", observed[:, neighbour_index], weights)
            variance[times, part] = prior - np.einsum("bk,bk->b", weights, covariance)
    np.maximum(variance, 0.0, out=variance)
    return mean, variance


# --------------------------------------------------------------------------------------
# Low-rank + fine-scale kriging
# --------------------------------------------------------------------------------------


def _validate_model(data, loadings, eigenvalues, coords, target_loadings, target_coords, mean,
                    target_mean, geographic):
    """Kriging inputs (:func:`xadapter.engine.kriging.check_kriging_inputs`) plus coordinates."""
    if (target_loadings is None) != (target_coords is None):
        raise InputError("give both target_loadings and target_coords for new targets, or neither.")
    data, loadings, eigenvalues, target_loadings, mean, target_mean = check_kriging_inputs(
        _as_data(data, "data"), loadings, eigenvalues, target_loadings, mean, target_mean)
    points = _points(coords, "coords", geographic, n_expected=loadings.shape[0])
    if target_coords is None:
        target_points = points
    else:
        target_points = _points(target_coords, "target_coords", geographic, n_expected=target_loadings.shape[0])
        if target_points.shape[1] != points.shape[1]:
            raise InputError("target_coords and coords must use the same coordinate system.")
    positive = eigenvalues > 0
    return (data - mean, loadings[:, positive], eigenvalues[positive], points,
            target_loadings[:, positive], target_points, target_mean)


def _local_precision(points, params, k, geographic):
    """Sparse symmetric approximation of ``W^{-1}``, ``W = C_fine + tau^2 I`` (n x n).

    ``W^{-1} = D^{-1} (I - R)`` exactly, with ``R`` the leave-one-out kriging weights
    of each observation on all others and ``D`` the leave-one-out variances; keeping
    each site's ``k`` nearest neighbours gives ``n k`` non-zeros, symmetrised
    (:class:`_LocalPrecision`; a sparse ``I / sill`` without fine-scale correlation).
    """
    n_sites = points.shape[0]
    k = min(k, n_sites - 1)
    if k < 1 or params.partial_sill == 0:
        return sp.identity(n_sites, format="csr") / params.sill
    index = nearest_sites(points, points, k + 1)
    others = index != np.arange(n_sites)[:, None]
    others[others.all(axis=1), -1] = False  # a coincident site pushed the site itself out
    index = index[others].reshape(n_sites, k)
    weights = np.empty((n_sites, k))
    loo_variance = np.empty(n_sites)
    for part in _target_blocks(n_sites, k, 1, points.shape[1]):
        part_weights, covariance = _local_weights(points, points[part], index[part], params, geographic)
        weights[part] = part_weights
        loo_variance[part] = params.partial_sill + _effective_nugget(params) - np.einsum(
            "bk,bk->b", part_weights, covariance)
    return _LocalPrecision(1.0 / loo_variance, -0.5 * weights / loo_variance[:, None], index)


class _LocalPrecision:
    """``D^{-1} (I - R)`` symmetrised, as an operator: ``D^{-1} - (D^{-1} R + R^T D^{-1}) / 2``.

    ``R`` has ``k`` entries a row, so it is stored as a CSR matrix straight from the
    neighbour lists; the product with ``R^T`` uses the same storage read by columns.
    Assembling the symmetric matrix itself (sorting and summing ``2 n k`` entries) cost
    more than every product taken with it.
    """

    ndim = 2

    def __init__(self, inverse_variance, half_weights, index):
        n_sites, k = index.shape
        self.inverse_variance = inverse_variance
        self.half = sp.csr_matrix((half_weights.ravel(), index.ravel(), np.arange(0, n_sites * k + 1, k)),
                                  shape=(n_sites, n_sites))
        self.shape = (n_sites, n_sites)

    def __matmul__(self, other):
        other = np.asarray(other)
        diagonal = self.inverse_variance if other.ndim == 1 else self.inverse_variance[:, None]
        return diagonal * other + self.half @ other + self.half.T @ other

    def toarray(self):
        """The dense ``n x n`` matrix (tests and small problems)."""
        return np.diag(self.inverse_variance) + self.half.toarray() + self.half.T.toarray()


def _dense_pattern(points, params, geographic):
    """:class:`_DensePattern` of the observed points, or None when ``W`` does not factorise."""
    try:
        return _DensePattern(points, params, geographic)
    except np.linalg.LinAlgError:
        return None


class _DensePattern:
    """The fine-scale system of a pattern of at most ``k`` observed sites, factorised once.

    ``W = C_fine + tau_eff^2 I`` over the observed sites (``n x n``, ``n <= k``): its
    inverse is what :func:`_local_precision` approximates, exact here, and the weights
    of every target on all observed sites are those :func:`_neighbour_weights` gives
    with ``k >= n`` neighbours.
    """

    def __init__(self, points, params, geographic):
        self.points, self.params, self.geographic = points, params, geographic
        system = params.covariance(_distance_km(points[:, None, :], points[None, :, :], geographic))
        system[np.diag_indices_from(system)] += _effective_nugget(params)
        self.factor = sla.cho_factor(system, lower=True)

    def precision(self):
        if self.points.shape[0] < 2 or self.params.partial_sill == 0:
            return sp.identity(self.points.shape[0], format="csr") / self.params.sill
        return sla.cho_solve(self.factor, np.eye(self.points.shape[0]))

    def target_weights(self, target_points, n_times):
        """As :func:`_neighbour_weights`: blocks of ``(part, neighbour_index, weights, covariance)``."""
        n_observed = self.points.shape[0]
        for part in _target_blocks(target_points.shape[0], n_observed, n_times, self.points.shape[1]):
            covariance = self.params.covariance(
                _distance_km(target_points[part][:, None, :], self.points[None, :, :], self.geographic))
            weights = sla.cho_solve(self.factor, covariance.T).T
            index = np.broadcast_to(np.arange(n_observed), covariance.shape)
            yield part, index, weights, covariance


def _complement_solve(inverse, solved, observed):
    """``W_oo^-1 right_o`` for each row of ``observed`` (B, N), zero at the unobserved sites,
    from ``inverse = W^-1`` and ``solved = W^-1 right`` of all sites.

    With ``P = W^-1`` and ``u`` the unobserved sites, ``W_oo^-1 = P_oo - P_ou P_uu^-1 P_uo``
    gives ``W_oo^-1 right_o = [solved - P_:u P_uu^-1 solved_u]_o`` (and zero at ``u``): a
    solve of the ``m x m`` block at the gaps and an ``N x m`` product per row. The gaps
    of each row come first in ``order``, padded to the most in a row with observed sites,
    which are decoupled (identity in ``P_uu``, zero in ``solved_u``) and drop out.
    """
    missing = ~observed
    width = int(missing.sum(axis=1).max())
    if width == 0:
        return np.broadcast_to(solved, observed.shape + solved.shape[1:]).copy()
    order = np.argsort(observed, axis=1, kind="stable")[:, :width]
    padding = np.take_along_axis(observed, order, axis=1)
    gap_block = np.where(padding[:, :, None] | padding[:, None, :], np.eye(width),
                         inverse[order[:, :, None], order[:, None, :]])
    at_gaps = np.where(padding[:, :, None], 0.0, solved[order])
    result = solved - np.swapaxes(inverse[:, order], 0, 1) @ np.linalg.solve(gap_block, at_gaps)
    return result * observed[:, :, None]  # zero at the gaps (rounding-sized there before)


def _observed_solve(system, inverse, solved, observed, right):
    """``W_oo^-1 right_o`` for each row of ``observed`` (B, N), zero at the unobserved sites.

    ``system`` is ``W`` (N, N) over all sites, ``inverse`` its inverse and ``solved`` is
    ``W^-1 right`` (N, R). Rows with at most half their sites missing take the
    complement in the full inverse (:func:`_complement_solve`, ``O(N m R + m^3)`` a row
    for ``m`` gaps); the others a solve of their own system with the unobserved sites
    decoupled (``O(N^3)`` a row).
    """
    n_sites = system.shape[0]
    few = (~observed).sum(axis=1) * 2 <= n_sites
    if few.all():
        return _complement_solve(inverse, solved, observed)
    result = np.empty(observed.shape + right.shape[1:])
    if few.any():
        result[few] = _complement_solve(inverse, solved, observed[few])
    many = observed[~few]
    both = many[:, :, None] & many[:, None, :]
    result[~few] = np.linalg.solve(np.where(both, system, np.eye(n_sites)), right[None] * many[:, :, None])
    return result


def _dense_krige_by_time(centred, loadings, eigenvalues, params, points, target_loadings, target_points,
                         nugget, geographic, predicted, variance):
    """:func:`krige_with_fine_scale` on a small network, exactly, time by time in batches.

    Every time is kriged from its whole ``W = C_fine + tau_eff^2 I`` over the observed
    sites (as :class:`_DensePattern` does for a pattern of at most ``k`` sites); where
    nearly every time has its own pattern (a daily network with gaps) this replaces a
    Python round per pattern and, above ``k`` sites, the ``n`` local ``k x k`` systems
    of each pattern. Each time's observed block is solved from the inverse of ``W`` over
    all sites, computed once, and the complement at its gaps (:func:`_observed_solve`;
    solutions padded with zeros at the unobserved sites). With fewer right-hand sides
    (loadings and targets) than about ``2N/3`` the blocks are solved for them, else
    their inverses are formed.

    Fills ``predicted`` and ``variance`` ``(T, P)`` in place (no target mean); raises
    ``LinAlgError`` when ``W`` or a time's system is singular.
    """
    n_times, n_sites = centred.shape
    n_targets, rank = target_loadings.shape
    system = params.covariance(_distance_km(points[:, None, :], points[None, :, :], geographic))
    system[np.diag_indices(n_sites)] += _effective_nugget(params)

    def cross_of(part):  # C_fine(targets, sites), (p, N)
        return params.covariance(_distance_km(target_points[part, None, :], points[None, :, :], geographic))

    # computed once unless the targets are many (then slice by slice, in each block of times)
    everything = cross_of(slice(None)) if n_targets * n_sites <= _BLOCK_ENTRIES else None
    root = np.sqrt(eigenvalues)
    scaled = loadings * root  # B D
    solve = everything is not None and 3 * (rank + n_targets) < 2 * n_sites
    right = np.hstack([scaled, everything.T]) if solve else None
    unit_sites, unit_rank = np.eye(n_sites), np.eye(rank)
    # W^-1 of all sites, once: each time's observed block is solved from its complement
    system_inverse = sla.cho_solve(sla.cho_factor(system, lower=True), unit_sites)
    system_inverse = 0.5 * (system_inverse + system_inverse.T)
    solved_all = system_inverse @ right if solve else system_inverse  # W^-1 right (N, R)
    step = max(1, _BLOCK_ENTRIES // (n_sites * (n_sites + rank + (n_targets if solve else 0)) + rank * rank))
    for start in range(0, n_times, step):
        rows = slice(start, min(start + step, n_times))
        observed = ~np.isnan(centred[rows])
        if solve:
            solved = _observed_solve(system, system_inverse, solved_all, observed, right)  # zero at unobserved sites
            weighted, target_weights = solved[:, :, :rank], solved[:, :, rank:]  # Q B D, Q c
        else:
            # W_oo^-1 padded with zeros (its columns at the gaps are zero only to rounding)
            precision = _observed_solve(system, system_inverse, solved_all, observed, unit_sites) \
                * observed[:, None, :]
            weighted = precision @ scaled
        inverse = np.linalg.inv(unit_rank + np.swapaxes(weighted, 1, 2) @ scaled)  # (I + D B^T Q B D)^-1
        score_covariance = root[:, None] * inverse * root[None, :]
        residuals = np.where(observed, centred[rows], 0.0)
        scores = np.einsum("bn,bnl,blm->bm", residuals, weighted, inverse) * root
        remainder = (residuals - scores @ loadings.T) * observed
        # targets in slices: the weights are (B, N, P) and the corrected loadings (B, P, L)
        width = max(1, _BLOCK_ENTRIES // (observed.shape[0] * (n_sites + rank)))
        for first in range(0, n_targets, width):
            part = slice(first, min(first + width, n_targets))
            cross = cross_of(part) if everything is None else everything[part]
            # simple-kriging weights of the targets
            weights = target_weights[:, :, part] if solve else precision @ cross.T
            corrected = target_loadings[part] - np.swapaxes(weights, 1, 2) @ loadings
            predicted[rows, part] = (scores @ target_loadings[part].T
                                     + np.einsum("bn,bnp->bp", remainder, weights))
            variance[rows, part] = (params.partial_sill + nugget - np.einsum("bnp,pn->bp", weights, cross)
                                    + np.einsum("bpl,blm,bpm->bp", corrected, score_covariance, corrected))


def krige_with_fine_scale(data, loadings, eigenvalues, params, coords, *, target_loadings=None,
                          target_coords=None, mean=None, target_mean=None, include_noise=True,
                          k=30, geographic=False, scores="local"):
    """Krige with ``Sigma = B diag(lambda) B^T + C_fine + tau^2 I``, locally.

    Per missingness pattern: posterior scores ``a_hat`` of the low-rank part, the
    remainders ``r_O - B_O a_hat`` at the observed sites, then simple kriging of those
    remainders at each target from its ``k`` nearest observed sites; the variance is
    the universal-kriging variance with corrected loadings (module docstring). No
    ``|O| x |O|`` or ``|P| x |P|`` dense matrix is formed, except on networks of at most
    ``max(k, EXACT_BY_TIME_MAX_SITES)`` sites with a pattern of gaps at nearly every
    time: those are kriged exactly from all observed sites, time by time
    (:func:`_dense_krige_by_time`), which is cheaper there than the local systems.

    Parameters
    ----------
    data : array_like, shape (T, N)
        Residuals at the fitted sites, NaN where unobserved.
    loadings : array_like, shape (N, K)
        ``B = Phi V`` at the fitted sites.
    eigenvalues : array_like, shape (K,)
        ``lambda`` (>= 0; only the positive ones are used), data units squared.
    params : FineScaleParams
        Fine-scale covariance; ``eta^2 + tau^2`` must be positive.
    coords : array_like, shape (N, d)
        Fitted sites: planar km, or ``[lat, lon]`` degrees when ``geographic``.
    target_loadings : array_like, shape (P, K), optional
        ``B`` at new targets (with ``target_coords``). Default: the fitted sites.
    target_coords : array_like, shape (P, d), optional
    mean : array_like, shape (N,), optional
        Site mean subtracted at the observed sites (default 0).
    target_mean : array_like, shape (P,), optional
        Mean added back at the targets (defaults as in :func:`xadapter.engine.kriging.krige`).
    include_noise : bool, default True
        Add ``tau^2``: variance of a new observation rather than of the latent field.
    k : int, default 30
        Nearest observed sites per target, and per observed site for the local
        precision.
    geographic : bool, default False
    scores : {"local", "white"}, default "local"
        How ``W^{-1}`` enters the posterior of the scores: the sparse local
        precision, or ``I / (eta^2 + tau^2)`` (the plain low-rank Woodbury with the
        fine-scale sill as white noise). ``"local"`` falls back to ``"white"`` for a
        pattern whose local information matrix is not positive definite.

    Returns
    -------
    mean : ndarray, shape (T, P)
        Predictive mean (target mean added back), data units.
    variance : ndarray, shape (T, P)
        Predictive variance, data units squared.
    """
    params = _check_params(params)
    k = _check_count(k, "k", "neighbours")
    if scores not in ("local", "white"):
        raise InputError(f"unknown scores option {scores!r}; use 'local' or 'white'.")
    centred, loadings, eigenvalues, points, target_loadings, target_points, target_mean = _validate_model(
        data, loadings, eigenvalues, coords, target_loadings, target_coords, mean, target_mean, geographic
    )
    n_times, n_targets = centred.shape[0], target_points.shape[0]
    nugget = params.nugget if include_noise else 0.0
    prior_low_rank = np.einsum("pk,k,pk->p", target_loadings, eigenvalues, target_loadings)
    predicted = np.zeros((n_times, n_targets))
    variance = np.broadcast_to(prior_low_rank + params.partial_sill + nugget, (n_times, n_targets)).copy()
    by_time = prefers_posterior_by_time(centred)
    if params.partial_sill == 0 and eigenvalues.size and by_time:
        # no fine-scale correlation: the remainders carry nothing to the targets (zero
        # kriging weights) and the local precision is 1 / sill exactly, so only the
        # scores' posterior is left, solved for all times at once where nearly every
        # time has its own pattern of gaps (a daily network)
        for rows, _, scores, covariance in white_posterior_by_time(centred, loadings, eigenvalues,
                                                                  1.0 / params.sill):
            predicted[rows] = scores @ target_loadings.T
            variance[rows] = nugget + np.einsum("pk,tkl,pl->tp", target_loadings, covariance, target_loadings)
        np.maximum(variance, 0.0, out=variance)
        return predicted + target_mean, variance
    if scores == "local" and by_time and centred.shape[1] <= max(k, EXACT_BY_TIME_MAX_SITES):
        try:
            _dense_krige_by_time(centred, loadings, eigenvalues, params, points, target_loadings, target_points,
                                 nugget, geographic, predicted, variance)
            np.maximum(variance, 0.0, out=variance)
            return predicted + target_mean, variance
        except np.linalg.LinAlgError:  # a singular pattern: pattern by pattern, with its fallbacks
            variance[:] = prior_low_rank + params.partial_sill + nugget
            predicted[:] = 0.0
    for times, sites in observation_patterns(centred):
        observed = centred[np.ix_(times, sites)]
        observed_points = points[sites]
        observed_loadings = loadings[sites]
        # at most k observed sites: every target's neighbourhood and every site's
        # leave-one-out set is the whole pattern, so the local formulas are the exact
        # ones; one n x n factorisation replaces the per-target systems
        dense = _dense_pattern(observed_points, params, geographic) if sites.size <= k else None
        posterior = None
        if scores == "local" and eigenvalues.size:
            precision = dense.precision() if dense is not None else \
                _local_precision(observed_points, params, k, geographic)
            posterior = score_posterior(observed_loadings, eigenvalues, precision)
        if posterior is None:  # white: the fine scale and nugget as independent noise
            posterior = score_posterior(observed_loadings, eigenvalues, 1.0 / params.sill)
        score_covariance, weighted = posterior
        score_mean = observed @ weighted @ score_covariance
        remainder = observed - score_mean @ observed_loadings.T
        blocks = dense.target_weights(target_points, times.size) if dense is not None else \
            _neighbour_weights(observed_points, target_points, k, times.size, params, geographic)
        for part, neighbour_index, weights, covariance in blocks:
            corrected = target_loadings[part] - np.einsum("bk,bkl->bl", weights,
                                                          observed_loadings[neighbour_index])
            predicted[times, part] = (score_mean @ target_loadings[part].T
                                      + np.einsum("tbk,bk->tb", remainder[:, neighbour_index], weights))
            variance[times, part] = (
                params.partial_sill + nugget - np.einsum("bk,bk->b", weights, covariance)
                + np.einsum("bk,kl,bl->b", corrected, score_covariance, corrected)
            )
    np.maximum(variance, 0.0, out=variance)
    return predicted + target_mean, variance


def exact_krige(data, loadings, eigenvalues, params, coords, *, target_loadings=None,
                target_coords=None, mean=None, target_mean=None, include_noise=True,
                geographic=False, max_sites=EXACT_MAX_SITES):
    """Exact dense kriging with ``Sigma = B diag(lambda) B^T + C_fine + tau^2 I`` (small N).

    ``mean_P = Sigma_PO Sigma_OO^{-1} r_O`` and
    ``var_P = diag(Sigma_PP - Sigma_PO Sigma_OO^{-1} Sigma_OP)`` (``+ tau^2`` with
    ``include_noise``) per missingness pattern, with ``Sigma_PO`` and ``Sigma_PP``
    free of the nugget (the latent field at the targets). Forms and factorises the
    ``|O| x |O|`` covariance: the reference for :func:`krige_with_fine_scale`, and a
    usable method for a few thousand sites. Arguments as in
    :func:`krige_with_fine_scale`.

    Parameters
    ----------
    max_sites : int, default :data:`EXACT_MAX_SITES`
        Largest number of fitted sites accepted.

    Returns
    -------
    mean, variance : ndarray, shape (T, P)

    Raises
    ------
    ProblemTooLargeError
        When ``N > max_sites``.
    """
    params = _check_params(params)
    n_sites = np.shape(loadings)[0] if np.ndim(loadings) == 2 else None
    if n_sites is not None and n_sites > max_sites:
        raise ProblemTooLargeError(
            f"exact dense kriging forms an N x N covariance; N = {n_sites} exceeds max_sites = "
            f"{max_sites}. Use krige_with_fine_scale (local) for large N, or raise max_sites."
        )
    centred, loadings, eigenvalues, points, target_loadings, target_points, target_mean = _validate_model(
        data, loadings, eigenvalues, coords, target_loadings, target_coords, mean, target_mean, geographic
    )
    n_times, n_targets = centred.shape[0], target_points.shape[0]
    nugget = params.nugget if include_noise else 0.0
    prior = np.einsum("pk,k,pk->p", target_loadings, eigenvalues, target_loadings) + params.partial_sill
    predicted = np.zeros((n_times, n_targets))
    variance = np.broadcast_to(prior + nugget, (n_times, n_targets)).copy()
    for times, sites in observation_patterns(centred):
        observed_points = points[sites]
        observed_loadings = loadings[sites] * eigenvalues
        between = _distance_km(observed_points[:, None, :], observed_points[None, :, :], geographic)
        sigma = observed_loadings @ loadings[sites].T + params.covariance(between)
        sigma[np.diag_indices_from(sigma)] += _effective_nugget(params)
        factor = sla.cho_factor(sigma, lower=True, check_finite=False)
        solved_data = sla.cho_solve(factor, centred[np.ix_(times, sites)].T, check_finite=False)
        block = max(1, _BLOCK_ENTRIES // max(sites.size, 1))
        for start in range(0, n_targets, block):
            part = slice(start, start + block)
            cross = target_loadings[part] @ observed_loadings.T + params.covariance(
                _distance_km(target_points[part, None, :], observed_points[None, :, :], geographic))
            predicted[times, part] = (cross @ solved_data).T
            reduction = np.einsum("po,op->p", cross, sla.cho_solve(factor, cross.T, check_finite=False))
            variance[times, part] = prior[part] + nugget - reduction
    np.maximum(variance, 0.0, out=variance)
    return predicted + target_mean, variance
