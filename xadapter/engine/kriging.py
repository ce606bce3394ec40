"""Kriging with the low-rank-plus-noise covariance (DESIGN "Kriging at unobserved locations").

For one time with observed sites ``O`` and targets ``P``, with ``B`` the loadings
(rows of ``Phi V``) and ``Lambda`` the positive eigenvalues only::

    Lambda_cond = (Lambda^{-1} + B_O^T B_O / sigma^2)^{-1}          (K x K)
    mean_P      = B_P Lambda_cond B_O^T r_O / sigma^2
    var_P       = rowsum((B_P Lambda_cond) * B_P) [+ sigma^2]

the Woodbury form of ``Sigma_PO Sigma_OO^{-1} r_O`` and of
``diag(Sigma_PP - Sigma_PO Sigma_OO^{-1} Sigma_OP)`` with ``Sigma = B Lambda B^T +
sigma^2 I``. Neither an ``|O| x |O|`` nor a ``|P| x |P|`` matrix is formed: cost
``O(|O| K^2 + |P| K^2)`` per missingness pattern, and times that share a pattern
share one factorisation.

``Lambda_cond`` is also the posterior covariance of the scores ``a_t`` given the
observations, and ``Lambda_cond B_O^T r_O / sigma^2`` their posterior mean, which
is what ``_low_rank_krige`` returns next to the kriged field so that a
fine-scale term (simple kriging of the observed remainders ``r_O - B_O a_hat``)
can be added on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.stats import norm

from ..exceptions import InputError

# Entries of a (times x targets) block computed at once (bounds temporaries at ~32 MB).
_BLOCK_ENTRIES = 4_000_000

#: Entries of the sites' outer-product table formed at a time by :func:`masked_grams`.
_GRAM_TABLE_ENTRIES = 2**20


@dataclass(frozen=True)
class KrigingResult:
    """Kriged field with predictive variance and intervals.

    Attributes
    ----------
    mean : ndarray, shape (T, P)
        Predictive mean at the targets, in data units (target mean added back).
    variance : ndarray, shape (T, P)
        Predictive variance, data units squared (latent signal, or a new noisy
        observation when ``include_noise``).
    lower, upper : ndarray, shape (T, P)
        ``mean -/+ multiplier * sqrt(variance)``.
    level : float
        Nominal coverage of the intervals.
    multiplier : float
        The ``q`` of the intervals: Gaussian quantile at ``level`` unless given
        (e.g. from :func:`conformal_multiplier`).
    """

    mean: np.ndarray
    variance: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    multiplier: float

    @classmethod
    def from_moments(cls, mean, variance, level=0.9, multiplier=None):
        """Intervals ``mean -/+ q sqrt(variance)`` around given predictive moments.

        ``q`` is the Gaussian quantile at ``level`` unless ``multiplier`` is given.
        """
        level, multiplier = _interval_multiplier(level, multiplier)
        half_width = multiplier * np.sqrt(np.maximum(variance, 0.0))
        return cls(mean=mean, variance=variance, lower=mean - half_width, upper=mean + half_width,
                   level=level, multiplier=multiplier)


@dataclass(frozen=True)
class _LowRankPrediction:
    """Low-rank part of a kriging prediction, on centred residuals.

    ``mean`` and ``variance`` (T, P) exclude the target mean and the white noise;
    ``scores`` (T, L) are the posterior means of the scores on the positive
    components; ``remainders`` (T, N) are ``r_O - B_O scores`` at observed entries
    and NaN elsewhere (None unless requested).
    """

    mean: np.ndarray
    variance: np.ndarray
    scores: np.ndarray
    remainders: np.ndarray | None


def _as_matrix(values, name, shape_text):
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D array of shape {shape_text}, got shape {array.shape}.")
    return array


def _as_site_vector(values, name, n_sites, what):
    if values is None:
        return np.zeros(n_sites)
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n_sites,):
        raise InputError(f"{name} must have shape ({n_sites},), one value per {what}; got {array.shape}.")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values; it must be finite at every {what}.")
    return array


def _check_level(level):
    level = float(level)
    if not 0.0 < level < 1.0:
        raise InputError(
            f"level must lie strictly between 0 and 1 (e.g. 0.9 for 90 % intervals), got {level}."
        )
    return level


def check_low_rank(data, loadings, eigenvalues):
    """Validate kriging inputs shared by the low-rank and fine-scale kriging.

    Returns
    -------
    data (T, N), loadings (N, K), eigenvalues (K,) as float64 arrays.
    """
    data = _as_matrix(data, "data", "(T, N): times by fitted sites")
    loadings = _as_matrix(loadings, "loadings", "(N, K): one row per fitted site")
    n_sites, rank = loadings.shape
    if data.shape[1] != n_sites:
        raise InputError(
            f"data has {data.shape[1]} sites (columns) but loadings has {n_sites} rows; data must be "
            "(T, N) with columns in the order of the loadings rows."
        )
    if np.isinf(data).any():
        raise InputError("data contains infinite values; use NaN for unobserved entries.")
    if not np.isfinite(loadings).all():
        raise InputError("loadings contain NaN or infinite values.")
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    if eigenvalues.shape != (rank,):
        raise InputError(
            f"eigenvalues must have shape ({rank},), one per loadings column; got {eigenvalues.shape}."
        )
    if not np.isfinite(eigenvalues).all() or (eigenvalues < 0).any():
        raise InputError(f"eigenvalues must be finite and >= 0 (variances); got {eigenvalues}.")
    return data, loadings, eigenvalues


def check_kriging_inputs(data, loadings, eigenvalues, target_loadings, mean, target_mean):
    """Validate the inputs every kriging shares (low-rank and fine-scale).

    Targets default to the fitted sites (``target_mean`` then defaults to ``mean``);
    with new targets a ``mean`` needs its ``target_mean``.

    Returns
    -------
    data (T, N), loadings (N, K), eigenvalues (K,), target_loadings (P, K), mean (N,),
    target_mean (P,) as float64 arrays (zeros for a missing mean).
    """
    data, loadings, eigenvalues = check_low_rank(data, loadings, eigenvalues)
    n_sites, rank = loadings.shape
    if target_loadings is None:
        target_loadings = loadings
        if target_mean is None:
            target_mean = mean
    else:
        target_loadings = _as_matrix(target_loadings, "target_loadings", "(P, K): one row per target")
        if target_loadings.shape[1] != rank:
            raise InputError(
                f"target_loadings has {target_loadings.shape[1]} columns but loadings has {rank}; "
                "extend the same basis to the targets."
            )
        if not np.isfinite(target_loadings).all():
            raise InputError("target_loadings contain NaN or infinite values.")
        if mean is not None and target_mean is None:
            raise InputError(
                "mean is given for the fitted sites but target_mean is missing for the new targets; "
                "extend the site mean to the targets (or pass zeros explicitly)."
            )
    mean = _as_site_vector(mean, "mean", n_sites, "fitted site")
    target_mean = _as_site_vector(target_mean, "target_mean", target_loadings.shape[0], "target")
    return data, loadings, eigenvalues, target_loadings, mean, target_mean


def score_posterior(observed_loadings, eigenvalues, precision):
    """Posterior of the scores given observations with precision ``Q``.

    ``G = (Lambda^{-1} + B^T Q B)^{-1}``, computed stably as ``D (I + D B^T Q B D)^{-1} D``
    with ``D = Lambda^{1/2}``: the matrix factored has eigenvalues >= 1, so tiny
    eigenvalues do not spoil it. The posterior mean of the scores of observations
    ``r`` (rows) is ``r (Q B) G``.

    Parameters
    ----------
    observed_loadings : ndarray (n, L)
        ``B`` at the observed sites, positive components only.
    eigenvalues : ndarray (L,)
        Positive eigenvalues ``Lambda``.
    precision : float or (n, n) array or sparse matrix
        ``Q``: a number ``q`` for white noise (``Q = q I``, e.g. ``1 / sigma^2``), else the
        (approximate) inverse covariance of what the low rank leaves.

    Returns
    -------
    (G (L, L), Q B (n, L)), or None when ``I + D B^T Q B D`` is not positive definite
    (an approximate ``Q`` that is not).
    """
    if eigenvalues.size == 0:
        return np.zeros((0, 0)), np.zeros((observed_loadings.shape[0], 0))
    if np.ndim(precision) == 0:
        weighted = observed_loadings * float(precision)
    else:
        weighted = precision @ observed_loadings
    root = np.sqrt(eigenvalues)
    inner = root[:, None] * (observed_loadings.T @ weighted) * root[None, :]
    inner = 0.5 * (inner + inner.T)
    inner[np.diag_indices_from(inner)] += 1.0
    try:
        factor = sla.cho_factor(inner, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    return root[:, None] * sla.cho_solve(factor, np.diag(root), check_finite=False), weighted


def observation_patterns(data, skip_empty=True):
    """Group times by which sites they observe, so each group shares one factorisation.

    Parameters
    ----------
    data : ndarray (T, N)
        NaN where unobserved.
    skip_empty : bool
        Leave out the pattern with no observed site (its times keep their prior).

    Yields
    ------
    times, sites : ndarray of int
        The times sharing one pattern and the sites it observes.
    """
    observed = ~np.isnan(data)
    if observed.all():
        # the common case of complete data: one pattern, without sorting the rows
        if data.shape[0] and (data.shape[1] or not skip_empty):
            yield np.arange(data.shape[0]), np.arange(data.shape[1])
        return
    patterns, inverse = unique_rows(observed)
    for index, pattern in enumerate(patterns):
        sites = np.flatnonzero(pattern)
        if sites.size or not skip_empty:
            yield np.flatnonzero(inverse == index), sites


def prefers_posterior_by_time(centred):
    """Whether the scores' posterior is better solved time by time than pattern by pattern.

    Per pattern it costs one ``L x L`` system and a Python round per distinct pattern of
    gaps; per time, a batched product and inverse over blocks of times. Gaps at random
    give nearly as many patterns as times (a daily network: ~670 systems in a
    cross-validation), complete data one pattern.
    """
    observed = ~np.isnan(centred)
    if observed.all():
        return False
    n_patterns = unique_rows(observed)[0].shape[0]
    return n_patterns > centred.shape[0] // 4


def unique_rows(mask):
    """The distinct rows of a boolean array, sorted as ``np.unique(mask, axis=0)`` sorts
    them, and the index of each row among them.

    Rows are packed into bytes (first column in the most significant bit), so the
    comparison of two rows is one of their bytes: about 30 times faster than
    ``np.unique(..., axis=0)``, which compares field by field.
    """
    mask = np.asarray(mask, dtype=bool)
    packed = np.ascontiguousarray(np.packbits(mask, axis=1))
    rows = packed.view(np.dtype((np.void, max(packed.shape[1], 1)))).reshape(-1) if packed.shape[1] else \
        np.zeros(mask.shape[0], dtype=np.uint8)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return mask[first], np.asarray(inverse).reshape(-1)


def masked_grams(mask, loadings):
    """``B^T diag(m_t) B`` for each row ``m_t`` of ``mask`` (R, N); shape (R, L, L).

    One matrix product of the mask with the table of the sites' outer products
    ``b_i b_i^T`` (N, L^2), taken over slabs of sites so that at most
    :data:`_GRAM_TABLE_ENTRIES` table entries exist at a time: a few times cheaper than
    the batched product ``(m_t * B)^T B``, which also forms an ``R x N x L`` temporary.
    """
    n_rows, n_sites = mask.shape
    rank = loadings.shape[1]
    weights = np.asarray(mask, dtype=loadings.dtype)
    grams = np.zeros((n_rows, rank * rank), dtype=np.result_type(loadings.dtype, np.float64))
    step = max(1, _GRAM_TABLE_ENTRIES // max(1, rank * rank))
    for start in range(0, n_sites, step):
        part = loadings[start:start + step]
        table = (part[:, :, None] * part[:, None, :]).reshape(part.shape[0], rank * rank)
        grams += weights[:, start:start + step] @ table
    return grams.reshape(n_rows, rank, rank)


def white_posterior_by_time(centred, loadings, eigenvalues, precision):
    """The scores' posterior under white noise of precision ``q``, for every time.

    Per time ``t`` with observed sites ``O_t``: covariance
    ``G_t = D (I + q D B_O^T B_O D)^{-1} D`` (``D = Lambda^{1/2}``, as
    :func:`score_posterior`) and mean ``q r_O B_O G_t``. ``B_O^T B_O`` of every time is one
    batched product over a block of times (:func:`masked_grams`). A time with no
    observation keeps the prior (``G_t = Lambda``, mean 0).

    Parameters
    ----------
    centred : ndarray, shape (T, N)
        NaN where unobserved.
    loadings : ndarray, shape (N, L)
    eigenvalues : ndarray, shape (L,)
        Positive.
    precision : float
        ``q = 1 / sigma^2``.

    Yields
    ------
    rows : slice
        Consecutive times.
    observed : ndarray of bool, shape (B, N)
    scores : ndarray, shape (B, L)
        Posterior means.
    covariance : ndarray, shape (B, L, L)
        Posterior covariances.
    """
    n_times, n_sites = centred.shape
    rank = eigenvalues.size
    root = np.sqrt(eigenvalues)
    scaled = loadings * root  # B D
    identity = np.eye(rank)
    step = max(1, _BLOCK_ENTRIES // max(1, n_sites * rank + rank * rank))
    for start in range(0, n_times, step):
        rows = slice(start, min(start + step, n_times))
        observed = ~np.isnan(centred[rows])
        gram = masked_grams(observed, scaled)
        # symmetric positive definite (>= I): the inverse needs no pivoting care
        inverse = np.linalg.inv(identity + precision * gram)
        projected = precision * (np.where(observed, centred[rows], 0.0) @ scaled)
        scores = np.einsum("tk,tkl->tl", projected, inverse) * root
        yield rows, observed, scores, root[:, None] * inverse * root[None, :]


def _low_rank_krige(centred, loadings, eigenvalues, white_variance, target_loadings,
                    *, return_remainders=False):
    """Woodbury kriging of centred residuals on the positive-eigenvalue components.

    Parameters
    ----------
    centred : ndarray, shape (T, N)
        Residuals minus the site mean, NaN where unobserved.
    loadings : ndarray, shape (N, L)
        Rows of ``B`` at the fitted sites, positive components only.
    eigenvalues : ndarray, shape (L,)
        Positive eigenvalues.
    white_variance : float
        Variance of the part treated as white noise (``sigma^2``).
    target_loadings : ndarray, shape (P, L)
    return_remainders : bool
        Also return ``r_O - B_O scores`` at the observed entries.

    Returns
    -------
    _LowRankPrediction
        Latent mean and variance at the targets (no target mean, no noise).
    """
    n_times, n_sites = centred.shape
    n_targets, rank = target_loadings.shape
    mean = np.zeros((n_times, n_targets))
    variance = np.zeros((n_times, n_targets))
    scores = np.zeros((n_times, rank))
    remainders = np.full((n_times, n_sites), np.nan) if return_remainders else None
    if rank == 0 or n_times == 0:
        if return_remainders:
            remainders = centred.copy()
        return _LowRankPrediction(mean, variance, scores, remainders)

    if prefers_posterior_by_time(centred):
        for rows, observed, row_scores, covariance in white_posterior_by_time(
                centred, loadings, eigenvalues, 1.0 / white_variance):
            scores[rows] = row_scores
            mean[rows] = row_scores @ target_loadings.T
            variance[rows] = np.einsum("pk,tkl,pl->tp", target_loadings, covariance, target_loadings)
            if return_remainders:
                remainders[rows] = np.where(observed, centred[rows] - row_scores @ loadings.T, np.nan)
        np.maximum(variance, 0.0, out=variance)
        return _LowRankPrediction(mean, variance, scores, remainders)
    for times, sites in observation_patterns(centred, skip_empty=False):
        observed_loadings = loadings[sites]
        cond, weighted = score_posterior(observed_loadings, eigenvalues, 1.0 / white_variance)
        observed = centred[np.ix_(times, sites)]
        scores[times] = (observed @ weighted) @ cond
        if return_remainders:
            remainders[np.ix_(times, sites)] = observed - scores[times] @ observed_loadings.T
        block = max(1, _BLOCK_ENTRIES // max(len(times), rank))
        for start in range(0, n_targets, block):
            part = target_loadings[start:start + block]
            mean[times, start:start + block] = scores[times] @ part.T
            variance[times, start:start + block] = np.einsum("pk,pk->p", part @ cond, part)
    np.maximum(variance, 0.0, out=variance)
    return _LowRankPrediction(mean, variance, scores, remainders)


def gaussian_multiplier(level):
    """Half-width, in standard deviations, of a central Gaussian interval at ``level``."""
    return float(norm.ppf(0.5 + 0.5 * _check_level(level)))


def krige(data, loadings, eigenvalues, noise_variance, *, target_loadings=None, mean=None,
          target_mean=None, include_noise=True, level=0.9, multiplier=None):
    """Krige residual fields with the low-rank-plus-noise covariance.

    ``Sigma = B diag(lambda) B^T + sigma^2 I``; each time is predicted from its own
    observed sites. Times are grouped by missingness pattern and each pattern is
    factorised once; no ``|O| x |O|`` or ``|P| x |P|`` matrix is formed.

    Parameters
    ----------
    data : array_like, shape (T, N)
        Residuals at the N fitted sites, NaN where unobserved. A time with nothing
        observed gets the prior (target mean, prior variance).
    loadings : array_like, shape (N, K)
        ``B = Phi V`` at the fitted sites (dimensionless, orthonormal columns in
        practice, not required).
    eigenvalues : array_like, shape (K,)
        ``lambda``, data units squared, >= 0; only the positive ones are used.
    noise_variance : float
        ``sigma^2 > 0``, data units squared.
    target_loadings : array_like, shape (P, K), optional
        ``B`` at the targets (e.g. extended to new sites with
        :func:`xadapter.engine.extend.extend_basis`). Default: the fitted sites
        themselves, so unobserved entries are filled and observed ones come back
        smoothed (the latent signal, not the observation).
    mean : array_like, shape (N,), optional
        Site mean subtracted at the observed sites (default 0).
    target_mean : array_like, shape (P,), optional
        Mean added back at the targets. Defaults to ``mean`` when the targets are the
        fitted sites, else 0; required with new targets when ``mean`` is given.
    include_noise : bool, default True
        Add ``sigma^2``: variance of a new observation rather than of the latent
        signal.
    level : float, default 0.9
        Nominal interval coverage, in (0, 1).
    multiplier : float, optional
        Interval half-width in standard deviations; default the Gaussian quantile
        at ``level``. Use :func:`conformal_multiplier` for a calibrated one.

    Returns
    -------
    KrigingResult
        ``mean``, ``variance``, ``lower``, ``upper`` of shape (T, P).
    """
    data, loadings, eigenvalues, target_loadings, mean, target_mean = check_kriging_inputs(
        data, loadings, eigenvalues, target_loadings, mean, target_mean
    )
    noise_variance = float(noise_variance)
    if not (np.isfinite(noise_variance) and noise_variance > 0):
        raise InputError(
            f"noise_variance must be a positive finite number (data units squared), got {noise_variance}."
        )
    level, multiplier = _interval_multiplier(level, multiplier)

    positive = eigenvalues > 0
    low_rank = _low_rank_krige(
        data - mean, loadings[:, positive], eigenvalues[positive], noise_variance,
        target_loadings[:, positive],
    )
    predicted = low_rank.mean + target_mean
    variance = low_rank.variance + noise_variance if include_noise else low_rank.variance
    return KrigingResult.from_moments(predicted, variance, level, multiplier)


def _interval_multiplier(level, multiplier=None):
    """Checked ``level`` and interval multiplier (Gaussian quantile unless given)."""
    level = _check_level(level)
    if multiplier is None:
        multiplier = gaussian_multiplier(level)
    multiplier = float(multiplier)
    if not (np.isfinite(multiplier) and multiplier > 0):
        raise InputError(f"multiplier must be a positive finite number, got {multiplier}.")
    return level, multiplier


def conformal_multiplier(truth, mean, variance, level=0.9):
    """Split-conformal interval multiplier from a calibration set.

    Scores ``|y - m| / sqrt(v)`` over the calibration entries; the multiplier is the
    ``ceil((n + 1) level)``-th smallest of the ``n`` scores, so intervals
    ``m +- q sqrt(v)`` cover at least ``level`` on fresh data exchangeable with the
    calibration entries (e.g. the same sites at new times). Entries where any input
    is NaN are ignored.

    Parameters
    ----------
    truth, mean, variance : array_like, same shape
        Held-out values, their kriged mean and predictive variance (data units,
        units squared), e.g. from :func:`krige` on a calibration period.
    level : float, default 0.9

    Returns
    -------
    float
        The multiplier ``q`` to pass to :func:`krige`.
    """
    level = _check_level(level)
    truth, mean, variance = (np.asarray(a, dtype=np.float64) for a in (truth, mean, variance))
    if not truth.shape == mean.shape == variance.shape:
        raise InputError(
            f"truth, mean and variance must have the same shape, got {truth.shape}, {mean.shape}, "
            f"{variance.shape}."
        )
    valid = ~(np.isnan(truth) | np.isnan(mean) | np.isnan(variance))
    if (variance[valid] < 0).any():
        raise InputError("variance has negative entries; pass predictive variances (>= 0).")
    error = np.abs(truth[valid] - mean[valid])
    spread = np.sqrt(variance[valid])
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(spread > 0, error / np.where(spread > 0, spread, 1.0),
                          np.where(error == 0, 0.0, np.inf))
    n_scores = scores.size
    rank = math.ceil((n_scores + 1) * level)
    if rank > n_scores:
        needed = math.ceil(level / (1.0 - level))
        raise InputError(
            f"calibration set too small: {n_scores} usable entries, split-conformal calibration at "
            f"level {level} needs at least {needed}."
        )
    return float(np.partition(scores, rank - 1)[rank - 1])
