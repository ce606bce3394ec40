"""Cross-validation over sites: the error of kriging at unseen locations.

At a fitted site the basis row and the site mean are known; at a new site they are
estimated by extension, and on persistent fields that error dominates the predictive
error. This module holds fitted sites out fold by fold, extends the basis and mean to
them from the remaining sites, kriges them from the remaining sites' observations and
compares with the truth. From that it derives

* the kriging score (CRPS, RMSE, coverage) of each candidate model, to choose the rank
  and the smoothness weight on the score that matters (DESIGN, issue "data-driven
  choices");
* per-site ratios of cross-validated squared error to model variance, which scale
  the predictive variance at new sites (:func:`variance_ratio_at`);
* coverage of the intervals by distance to the nearest observed site, reported to
  the user.

Numerical core: plain arrays, no xarray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import norm

from ..exceptions import InputError
from .extend import extend_basis
from .finescale import krige_with_fine_scale, nearest_sites
from .kriging import krige
from .metrics import crps_gaussian
from .progress import progress_bar

#: Effective site-times of the shrinkage of local variance ratios towards the network-wide
#: scale (:func:`variance_ratio_at`). Measured on persistent networks (N = 40-60,
#: T = 60-100) and on the ozone grid: 10-40 give the same coverage within 0.005.
RATIO_PRIOR_COUNT = 20.0

#: Fitted sites whose pooled ratio sets the variance scale at a new site.
RATIO_NEIGHBOURS = 8


def site_folds(n_sites, n_folds=5, seed=0):
    """Random partition of site indices into ``n_folds`` folds of near-equal size."""
    if n_folds < 2 or n_folds > n_sites:
        raise InputError(f"n_folds must be between 2 and the number of sites ({n_sites}), got {n_folds}.")
    order = np.random.default_rng(seed).permutation(n_sites)
    return [np.sort(fold) for fold in np.array_split(order, n_folds)]


def extend_to_held_out(model, kept, held):
    """Basis and mean at ``held`` re-extended from ``kept``: ``(basis (H, K), mean (H,))``."""
    values = np.column_stack([model.basis[kept], model.mean[kept]])
    extended = extend_basis(model.planar[held], model.planar[kept], values, **(model.extension or {}))
    return extended[:, :-1], extended[:, -1]


def krige_held_out(model, data, kept, held, include_noise=True, extended=None):
    """Krige sites ``held`` from sites ``kept`` as if ``held`` were never fitted.

    The basis and the mean at ``held`` are re-extended from ``kept``.

    Parameters
    ----------
    model : FittedModel
        The fitted model (:class:`xadapter.engine.fitted.FittedModel`).
    data : ndarray (T, N)
        Centred nowhere: raw residuals (minus trend), NaN where unobserved.
    kept, held : ndarray of int
    extended : (ndarray, ndarray), optional
        Output of :func:`extend_to_held_out` for this split (it depends only on the
        basis, the mean and the sites, so candidates that differ in eigenvalues or
        fine scale share it).

    Returns
    -------
    mean, variance : ndarray (T, len(held))
    """
    target_basis, target_mean = extend_to_held_out(model, kept, held) if extended is None else extended
    target_loadings = target_basis @ model.rotation
    loadings = model.basis[kept] @ model.rotation
    observed = data[:, kept]
    if model.fine is None:
        result = krige(observed, loadings, model.eigenvalues, model.noise_variance,
                       target_loadings=target_loadings, mean=model.mean[kept], target_mean=target_mean,
                       include_noise=include_noise)
        return result.mean, result.variance
    return krige_with_fine_scale(
        observed, loadings, model.eigenvalues, model.fine, model.graph_coords[kept],
        target_loadings=target_loadings, target_coords=model.graph_coords[held],
        mean=model.mean[kept], target_mean=target_mean, include_noise=include_noise,
        k=model.fine_neighbors, geographic=model.geographic,
    )


@dataclass
class SiteCV:
    """Cross-validated kriging at held-out sites.

    Attributes
    ----------
    squared_error : ndarray (N,)
        Sum over times of the squared kriging error at each site (held out once).
    model_variance : ndarray (N,)
        Sum over the same times of the model's predictive variance.
    count : ndarray (N,)
        Number of (observed) times summed.
    crps, rmse, coverage : float
        Pooled scores (coverage of the Gaussian ``level`` intervals).
    distance_km : ndarray (N,)
        Distance of each site to the nearest site kept in its fold, km (planar).
    z_scores : ndarray (T', N)
        Standardised errors ``(truth - mean) / sqrt(variance)`` of the held-out values
        (NaN where unobserved).
    """

    squared_error: np.ndarray
    model_variance: np.ndarray
    count: np.ndarray
    crps: float
    rmse: float
    coverage: float
    distance_km: np.ndarray
    z_scores: np.ndarray


def cross_validate_sites(model, data, folds, *, level=0.9, times=None, extensions=None, progress=False):
    """Hold each fold of sites out, krige it from the others, and score.

    Parameters
    ----------
    model : FittedModel
        The fitted model (:class:`xadapter.engine.fitted.FittedModel`).
    data : ndarray (T, N)
        Training residuals (minus trend), NaN where missing.
    folds : list of ndarray of int
        From :func:`site_folds`.
    times : ndarray of int, optional
        Subset of time indices to use (bounds the cost on long records).
    extensions : list, optional
        Per-fold output of :func:`extend_to_held_out`, reused across candidates.
    progress : bool or None, default False
        A bar over the folds: True always, False never, None only when stderr is a
        terminal (:mod:`xadapter.engine.progress`).

    Returns
    -------
    SiteCV
    """
    data = np.asarray(data, dtype=np.float64)
    if times is not None:
        data = data[times]
    n_times, n_sites = data.shape
    prediction = np.full((n_times, n_sites), np.nan)
    variance = np.full((n_times, n_sites), np.nan)
    distance = np.zeros(n_sites)
    everything = np.arange(n_sites)
    with progress_bar(progress, len(folds), "xadapter site CV", unit="fold") as bar:
        for index, held in enumerate(folds):
            kept = np.setdiff1d(everything, held)
            extended = None if extensions is None else extensions[index]
            prediction[:, held], variance[:, held] = krige_held_out(model, data, kept, held, extended=extended)
            distance[held], _ = cKDTree(model.planar[kept]).query(model.planar[held])
            bar.update()
    valid = np.isfinite(data)
    error = np.where(valid, data - prediction, np.nan)
    z = error / np.sqrt(variance)
    q = norm.ppf(0.5 + level / 2)
    return SiteCV(
        squared_error=np.nansum(error**2, axis=0),
        model_variance=np.where(valid, variance, 0.0).sum(axis=0),
        count=valid.sum(axis=0),
        crps=crps_gaussian(data, prediction, variance),
        rmse=float(np.sqrt(np.nanmean(error**2))),
        coverage=float(np.nanmean(np.where(valid, np.abs(z) <= q, np.nan))),
        distance_km=distance,
        z_scores=z,
    )


def variance_ratio_at(target_planar, site_planar, squared_error, model_variance, count, *,
                      neighbours=RATIO_NEIGHBOURS, prior_count=RATIO_PRIOR_COUNT):
    """Scale of the predictive variance at new sites from cross-validation.

    Two parts (docs/design-notes.md, "Variance ratios at new sites"):

    * a network-wide scale: the pooled ratio ``sum squared_error / sum model_variance``
      over all fitted sites (every site-time of the cross-validation);
    * a local factor: the pooled ratio of the ``neighbours`` nearest fitted sites
      relative to the network-wide pooled ratio, shrunk towards 1 with
      ``prior_count`` pseudo-observations, ``(n r + n0) / (n + n0)``, where ``n``
      counts *effective* site-times: each site's count divided by the over-dispersion
      of the site ratios about their neighbourhood (:func:`ratio_overdispersion`).
      On a persistent network a site's errors at its ``T`` times are nearly one
      draw, so its count says little, and the local factor leans on the network.

    Parameters
    ----------
    target_planar : ndarray (P, d)
        New sites, planar km.
    site_planar : ndarray (N, d)
        Fitted sites, planar km.
    squared_error, model_variance : ndarray (N,)
        Sums over the cross-validated times of squared error and model variance
        (units squared).
    count : ndarray (N,)
        Times summed per site.
    neighbours : int
        Fitted sites pooled per target.
    prior_count : float
        Effective site-times of the shrinkage towards the network-wide scale.

    Returns
    -------
    ndarray (P,)
        Multiplier of the model variance (dimensionless, > 0).
    """
    squared_error, model_variance = np.asarray(squared_error, float), np.asarray(model_variance, float)
    count = np.asarray(count, float)
    total_variance = model_variance.sum()
    pooled = squared_error.sum() / total_variance if total_variance > 0 else 0.0
    if not pooled > 0:  # no model variance or no error to compare: nothing to rescale
        return np.ones(len(target_planar))
    effective = count / ratio_overdispersion(site_planar, squared_error, model_variance, count, neighbours)
    index = nearest_sites(site_planar, target_planar, min(int(neighbours), len(site_planar)))
    error, var = squared_error[index].sum(axis=1), model_variance[index].sum(axis=1)
    n = effective[index].sum(axis=1)
    relative = np.where(var > 0, error / np.where(var > 0, var, 1.0), pooled) / pooled
    return pooled * (n * relative + prior_count) / (n + prior_count)


def ratio_overdispersion(site_planar, squared_error, model_variance, count, neighbours=RATIO_NEIGHBOURS):
    """How many times noisier the site ratios are than independent errors would make them.

    With independent Gaussian errors at a site's ``n`` times, its ratio of squared
    error to model variance scatters about the local ratio with variance about
    ``2 r^2 / n``. Persistent errors (a site's own level) make the ``n`` times nearly
    one draw and the scatter far larger. The over-dispersion is the mean of
    ``n_i (r_i - r_loc)^2 / (2 r_loc^2)`` over sites, with ``r_loc`` pooled over each
    site's nearest *other* sites, so smooth regional differences of the ratio do not
    count as noise. At least 1.

    The terms are computed as ``n_i (r_i / r_loc - 1)^2 / 2``, with ``r_i / r_loc``
    formed in logarithms from the sums of errors and variances: it depends on them
    only through ratios of ratios (scaling both by any factor changes nothing) and
    never overflows on the way. A field at rounding level (a constant field:
    cross-validated errors of 1e-30 against a model variance at its floor of 1e-307,
    ratios near 1e277) therefore gives a finite value, without numpy warnings.

    * Sites without model variance (or whose neighbours have none) or without counted
      times are left out; 1 when none is left.
    * A site without error among neighbours without error has no scatter (term 0).
    * A site with errors among neighbours without any (``r_loc = 0 < r_i``), or whose
      term is beyond the float range, is infinitely over-dispersed: the result is then
      ``inf``, and :func:`variance_ratio_at` falls back on the network-wide scale
      (every effective count 0).

    Returns
    -------
    float
        At least 1, possibly ``inf``; never NaN.
    """
    n_sites = len(site_planar)
    if n_sites < 3:
        return 1.0
    index = nearest_sites(site_planar, site_planar, min(int(neighbours), n_sites - 1) + 1)[:, 1:]
    local_var = model_variance[index].sum(axis=1)
    usable = (local_var > 0) & (model_variance > 0) & (count > 0)
    if not usable.any():
        return 1.0
    error, variance = squared_error[usable], model_variance[usable]
    local_error, local_var = squared_error[index].sum(axis=1)[usable], local_var[usable]
    # r_i / r_loc: 1 where neither the site nor its neighbours have errors, 0 where only
    # the neighbours have, inf where only the site has
    relative = np.where(error > 0, np.inf, np.where(local_error > 0, 0.0, 1.0))
    both = (error > 0) & (local_error > 0)
    # in logarithms: r_i and r_loc themselves may lie beyond the float range
    log_relative = ((np.log(error[both]) - np.log(variance[both]))
                    - (np.log(local_error[both]) - np.log(local_var[both])))
    # a quotient or a term beyond the float range is an infinite scatter, as intended
    with np.errstate(over="ignore"):
        relative[both] = np.exp(log_relative)
        scatter = count[usable] * (relative - 1.0) ** 2 / 2.0
    return float(max(1.0, np.mean(scatter)))


def coverage_by_distance(cv, ratios=None, *, level=0.9, n_bins=4):
    """Interval coverage of the held-out sites by distance to the nearest kept site.

    Parameters
    ----------
    cv : SiteCV
    ratios : ndarray (N,), optional
        Variance multipliers per site (as applied at new sites); coverage is then
        also reported with them.

    Returns
    -------
    dict of ndarray
        ``distance_km`` (bin upper edges), ``coverage_model``, ``coverage_calibrated``
        (NaN without ``ratios``) and ``count`` per bin.
    """
    q = norm.ppf(0.5 + level / 2)
    edges = np.unique(np.quantile(cv.distance_km, np.linspace(0, 1, n_bins + 1)))
    if edges.size == 1:
        # every site equally far from its fold (e.g. a regular grid): one bin, not none
        edges = np.repeat(edges, 2)
    bins = np.clip(np.searchsorted(edges, cv.distance_km, side="right") - 1, 0, len(edges) - 2)
    z = cv.z_scores
    valid = np.isfinite(z)
    inside = np.abs(z) <= q
    inside_cal = np.abs(z) <= q * np.sqrt(ratios)[None, :] if ratios is not None else inside
    out = {"distance_km": edges[1:], "coverage_model": [], "coverage_calibrated": [], "count": []}
    for b in range(len(edges) - 1):
        cols = bins == b
        mask = valid[:, cols]
        out["count"].append(int(mask.sum()))
        out["coverage_model"].append(float(inside[:, cols][mask].mean()) if mask.any() else np.nan)
        out["coverage_calibrated"].append(
            float(inside_cal[:, cols][mask].mean()) if mask.any() and ratios is not None else np.nan)
    return {k: np.asarray(v) for k, v in out.items()}


def evenly_spaced_times(n_times, max_times):
    """At most ``max_times`` time indices spread over the record (None: all)."""
    if max_times is None or n_times <= max_times:
        return None
    return np.unique(np.linspace(0, n_times - 1, max_times).round().astype(int))
