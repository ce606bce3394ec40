"""Low-rank-plus-noise covariance with the rank chosen by spectral thresholding.

DESIGN section 1, "Covariance: low-rank plus noise". Given an orthonormal spatial basis
``Phi`` (N x K) and complete residuals ``D`` (T x N), with ``S = Dc^T Dc / T`` the sample
covariance of the time-centred data,

    Phi^T S Phi = V diag(d) V^T,        d_1 >= ... >= d_K
    sigma_L^2   = (tr(S) - sum_{k<=L} d_k + L * gamma) / (N - L)
    Sigma       = B diag(lambda) B^T + sigma^2 I,        B = Phi V

``S`` itself is never formed: only ``tr(S)`` (the sum of squares over ``T``) and the
K x K matrix ``Phi^T S Phi = (Dc Phi)^T (Dc Phi) / T`` are needed, so the cost is
``O(T N K)`` time and ``O(T N)`` memory, and no N x N array is ever allocated.

Two rank rules
--------------
``gamma`` a number (the paper's and SpatPCA's rule; ``gamma = 0`` is Wang's rule)
    ``L_hat`` is the largest ``L <= K`` with ``d_L - gamma >= sigma_L^2``; when there is
    none (or ``d_1 <= gamma``), ``sigma^2 = tr(S) / N``. Every eigenvalue is then
    ``lambda_k = max(d_k - sigma^2 - gamma, 0)``. This reproduces SpatPCA's
    ``spatialPrediction`` (which scans ``L`` down from ``K`` while
    ``d_L - gamma < sigma_L^2``) number for number. With ``gamma = 0`` and the exact top
    eigenvectors of ``S``, ``sigma_L^2`` is the mean of the trailing eigenvalues, so
    ``d_L > sigma_L^2`` always holds: the rule keeps every component, also on pure
    noise. SpatPCA relies on a cross-validated ``gamma > 0``.

``gamma=None`` (default): noise-calibrated
    Pure-noise sample eigenvalues spread up to the Marchenko-Pastur edge
    ``sigma^2 (1 + sqrt(N/T))^2``, not ``sigma^2``. ``L_hat`` is the largest ``L`` with
    ``d_L > sigma_L^2 * edge_L`` (``gamma = 0`` in ``sigma_L^2``), where ``edge_L`` is the
    largest-eigenvalue threshold of a white Wishart matrix (:func:`wishart_edge`):
    the Johnstone (2001) centring plus ``tw_units`` Tracy-Widom scale units. Then
    ``sigma^2 = sigma_{L_hat}^2`` (``tr(S) / N`` when ``L_hat = 0``) and
    ``lambda_k = max(d_k - sigma^2, 0)`` for ``k <= L_hat``, zero beyond.

    Degrees of freedom. ``S`` divides by ``T`` but the centred data carry ``T - 1``
    degrees of freedom; both ``d_L`` and ``sigma_L^2`` share the ``1/T``, so the edge is
    the Wishart edge for ``n = T - 1`` (``T`` when ``center=False``) relative to the
    mean noise eigenvalue. Time steps are rarely independent: ``n`` is scaled by
    ``n_eff / T`` with the effective sample size ``n_eff`` (:func:`effective_sample_size`),
    or persistent noise would look like signal.

    Test ``L``. ``edge_L`` is the edge of the white Wishart matrix left once ``L``
    leading directions are taken out: ``N - L`` sites and ``n (m - L) / m`` degrees of
    freedom, with ``m = T - 1`` (``T`` uncentred) the unscaled and
    ``n = m n_eff / T`` the effective degrees of freedom. For ``L`` small against ``N``
    and ``T`` it is the plain edge of DESIGN; without the reduction, the "largest L"
    scan would keep components on pure noise whenever ``K`` approaches ``T`` with
    ``T < N`` (the trailing ``sigma_L^2`` then averages over many exactly-zero
    eigenvalues). ``L`` is also capped at half of ``min(N, T')``: near the hard edge of
    a square Wishart matrix the smallest eigenvalues are not described by these
    approximations, and a rank above half the number of available eigenvalues is not
    identifiable from the spectrum.

    Default ``tw_units = 4``. The scan sees ``sigma_1^2`` (which leaves ``d_1`` out) a
    little below the true noise level, and Johnstone's approximation is rough for
    small ``T``; on white noise with ``K = 10`` and ``N / T`` from 0.1 to 10, 3 units
    kept a spurious component in 0.5-3 % of draws, 4 units in 0-1.5 %. One unit
    costs 1-4 % of the edge, so the loss of power is small.

Effective sample size
---------------------
When ``n_eff`` is not given, it comes from the lag-1 autocorrelation ``r`` of the
data outside the components already accepted (pooled over sites):
``n_eff = T (1 - r) / (1 + r)`` (an AR(1) long-run variance ratio, with ``r`` first
corrected for the bias of centring, clipped to ``[1, T]``). The largest sample eigenvalue of persistent noise, in units of the mean
one, is set by the spectral density at frequency zero, which is what this ratio
measures; it is conservative (edge on the high side) when ``T >> N``. The leading
components are accepted first on the whole data (persistent *signal* then lowers
``n_eff``, which only makes the test stricter), then ``n_eff`` is re-estimated with the
accepted components taken out, until the rank no longer changes. Taking out the
sample's own leading components *before* accepting them would bias ``r`` down on pure
persistent noise when ``T < N`` (they are its smoothest temporal modes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .checks import nonnegative
from .chunks import centred_moments, compute, is_lazy
from ..exceptions import InputError, ProblemTooLargeError

#: Default number of Tracy-Widom scale units added to the Johnstone centring.
DEFAULT_TW_UNITS = 4.0

#: Largest number of sites for which :meth:`LowRankCovariance.dense` builds the N x N
#: covariance (0.2 GB at 5000).
DENSE_MAX_SITES = 5000

#: Tolerance on ``max |Phi^T Phi - I|`` for a basis to count as orthonormal and be
#: used exactly as given.
ORTHONORMAL_ATOL = 1e-6

#: Largest ``max |Phi^T Phi - I|`` accepted at all. Between :data:`ORTHONORMAL_ATOL`
#: and this, the basis is orthonormal only approximately (an iterative solver such as
#: SpatPCA's ADMM stops at 1e-6-1e-4) and the covariance is computed on its
#: orthonormalised span (see :func:`low_rank_plus_noise`); above it the columns are
#: not an orthonormal basis at all (unnormalised, or not orthogonal) and are refused.
ORTHONORMAL_MAX_DEVIATION = 1e-3

#: Sample eigenvalues ``d_k <= ROUNDING_FLOOR * tr(S)`` are rounding, not signal: on a
#: field of lower rank than ``K`` (fewer distinct patterns than the nominal rank, or
#: a constant field) the trailing ``d_k`` are ``1e-30``-ish and the trailing noise
#: estimate can come out negative by rounding, which would keep every such
#: component. They are never kept, under either rule.
ROUNDING_FLOOR = 1e-10

#: The noise variance is at least ``NOISE_FLOOR * tr(S) / N`` (and positive): on exactly
#: low-rank data it is zero up to rounding, and kriging needs ``sigma^2 > 0``.
NOISE_FLOOR = 1e-12

# A lag-1 autocorrelation at 1 would give n_eff = 0; the clip keeps n_eff >= 1.
_MAX_AUTOCORRELATION = 0.999


@dataclass(frozen=True)
class LowRankCovariance:
    """Fitted low-rank-plus-noise covariance ``Sigma = B diag(lambda) B^T + sigma^2 I``.

    ``B = Phi V`` needs the basis ``Phi`` it was fitted with; the methods take it as an
    argument so this object stays small (``O(K^2)``).

    Attributes
    ----------
    eigenvalues : ndarray, shape (K,)
        Thresholded eigenvalues ``lambda``, decreasing, zero beyond the effective rank
        (units of the data, squared).
    rotation : ndarray, shape (K, K)
        ``V``: eigenvectors of ``Phi^T S Phi`` in the columns, ordered as
        ``sample_eigenvalues``; the largest-magnitude entry of each column is positive.
    noise_variance : float
        White-noise variance ``sigma^2`` (units squared).
    effective_rank : int
        Number of positive ``eigenvalues``.
    sample_eigenvalues : ndarray, shape (K,)
        ``d``: eigenvalues of ``Phi^T S Phi``, decreasing (units squared).
    total_variance : float
        ``tr(S)``, the summed variance over sites (units squared).
    n_sites, n_times : int
        ``N`` and ``T`` of the data.
    n_eff : float or None
        Effective number of independent time steps used by the noise-calibrated rule;
        None for a numeric ``gamma``.
    gamma : float or None
        The ``gamma`` of the paper's rule, or None for the noise-calibrated rule.
    edge : ndarray, shape (K,), or None
        Noise-calibrated rule: ``edge[L - 1]`` multiplies ``sigma_L^2`` in the test of
        component ``L`` (``inf`` above the identifiable rank). None for a numeric
        ``gamma``.
    """

    eigenvalues: np.ndarray
    rotation: np.ndarray
    noise_variance: float
    effective_rank: int
    sample_eigenvalues: np.ndarray
    total_variance: float
    n_sites: int
    n_times: int
    n_eff: float | None
    gamma: float | None
    edge: np.ndarray | None

    @property
    def rank(self):
        """Nominal rank ``K`` (an upper bound on the effective rank)."""
        return self.eigenvalues.shape[0]

    def with_eigenvalues(self, eigenvalues):
        """The same covariance with other thresholded eigenvalues (e.g. a rank cut by CV)."""
        eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        return dataclasses.replace(self, eigenvalues=eigenvalues, effective_rank=int((eigenvalues > 0).sum()))

    def loadings(self, basis):
        """Covariance eigenvectors ``B = Phi V`` on the sites.

        Parameters
        ----------
        basis : array_like, shape (N, K)
            The basis the covariance was fitted with.

        Returns
        -------
        ndarray, shape (N, K)
        """
        return self._check_basis(basis) @ self.rotation

    def variance(self, basis):
        """Model variance at every site, ``diag(Sigma)``, without an N x N array.

        Parameters
        ----------
        basis : array_like, shape (N, K)

        Returns
        -------
        ndarray, shape (N,)
            ``sum_k lambda_k B_ik^2 + sigma^2`` (units squared).
        """
        loadings = self.loadings(basis)
        return (loadings**2) @ self.eigenvalues + self.noise_variance

    def dense(self, basis, max_sites=DENSE_MAX_SITES):
        """Dense covariance ``B diag(lambda) B^T + sigma^2 I`` (small N only).

        Parameters
        ----------
        basis : array_like, shape (N, K)
        max_sites : int
            Refuse above this many sites.

        Returns
        -------
        ndarray, shape (N, N)

        Raises
        ------
        ProblemTooLargeError
            When ``N > max_sites``.
        """
        if self.n_sites > max_sites:
            raise ProblemTooLargeError(
                f"the dense covariance of {self.n_sites} sites would need "
                f"{self.n_sites**2 * 8 / 1e9:.1f} GB (limit {max_sites} sites); use "
                "variance(basis) for the diagonal or krige with the low-rank form instead."
            )
        loadings = self.loadings(basis)
        sigma = (loadings * self.eigenvalues) @ loadings.T
        sigma[np.diag_indices_from(sigma)] += self.noise_variance
        return sigma

    def _check_basis(self, basis):
        basis = np.asarray(basis, dtype=np.float64)
        if basis.shape != (self.n_sites, self.rank):
            raise InputError(
                f"basis has shape {basis.shape} but the covariance was fitted with "
                f"({self.n_sites}, {self.rank}); pass the basis used in the fit."
            )
        return basis


def wishart_edge(n_dof, n_sites, tw_units=DEFAULT_TW_UNITS):
    """Largest-eigenvalue threshold of a white Wishart matrix, per unit noise variance.

    For ``W = X^T X`` with ``X`` an ``n x p`` matrix of independent unit-variance
    Gaussians, Johnstone (2001) gives ``lambda_max(W) ~ mu + s * TW1`` with
    ``mu = (sqrt(n - 1/2) + sqrt(p - 1/2))^2`` and
    ``s = (sqrt(n - 1/2) + sqrt(p - 1/2)) (1/sqrt(n - 1/2) + 1/sqrt(p - 1/2))^(1/3)``.
    Dividing by ``n`` expresses the threshold in units of the mean eigenvalue of
    ``W / n``: a sample eigenvalue of pure noise stays below ``edge * sigma^2`` with
    high probability.

    Parameters
    ----------
    n_dof : float
        Degrees of freedom ``n`` (time steps, after centring and for dependence);
        values below 1 are treated as 1.
    n_sites : float
        Dimension ``p``; values below 1 are treated as 1.
    tw_units : float
        Number of Tracy-Widom scale units added to the centring (the 0.99 and 0.999
        quantiles of the TW1 law are about 2.02 and 3.27).

    Returns
    -------
    float
        The multiplier ``(mu + tw_units * s) / n`` (about ``(1 + sqrt(p / n))^2``).
    """
    n = max(float(n_dof), 1.0)
    p = max(float(n_sites), 1.0)
    root_n, root_p = np.sqrt(n - 0.5), np.sqrt(p - 0.5)
    centring = (root_n + root_p) ** 2
    scale = (root_n + root_p) * (1.0 / root_n + 1.0 / root_p) ** (1.0 / 3.0)
    return float((centring + tw_units * scale) / n)


def effective_sample_size(series, max_lag=1, *, center=True):
    """Effective number of independent time steps of a set of time series.

    The autocorrelation ``rho_k`` is pooled over the columns (sum of lag-k products
    over sum of squares). With ``max_lag = 1`` an AR(1) form is used:
    ``n_eff = T (1 - r) / (1 + r)`` with ``r = rho_1``, first corrected for the downward
    bias of a sample autocorrelation around an estimated mean,
    ``r -> (r T + 1) / (T - 3)`` (Marriott and Pope 1954), when ``center`` is true. With
    ``max_lag > 1``: ``n_eff = T / (1 + 2 sum_{k<=max_lag} rho_k)`` without bias
    correction. The result is clipped to ``[1, T]`` (negative autocorrelation gives T).

    Parameters
    ----------
    series : array_like, shape (T,) or (T, M)
        Time series in the columns, e.g. basis scores; complete (no NaN).
    max_lag : int
        Number of lags used, ``1 <= max_lag < T - 1``.
    center : bool
        Remove the column means first (and correct the bias that causes).

    Returns
    -------
    float
        ``n_eff`` in ``[1, T]``.
    """
    series = np.asarray(series, dtype=np.float64)
    if series.ndim == 1:
        series = series[:, None]
    if series.ndim != 2:
        raise InputError(f"series must have shape (T,) or (T, M), got {series.shape}.")
    n_times = series.shape[0]
    _check_max_lag(max_lag, n_times)
    if not np.isfinite(series).all():
        raise InputError("series contains NaN or infinite values; fill or drop those time steps.")
    if center:
        series = series - series.mean(axis=0)
    autocovariance = _pooled_autocovariance(series, max_lag)
    return _n_eff_from_autocovariance(autocovariance, n_times, center)


def low_rank_plus_noise(
    basis,
    data,
    gamma=None,
    *,
    center=True,
    n_eff=None,
    tw_units=DEFAULT_TW_UNITS,
    effective_sample_size=True,
):
    """Low-rank-plus-noise covariance of the data on a basis, rank by thresholding.

    See the module docstring for both rules; nothing of size N x N is formed.

    Parameters
    ----------
    basis : array_like, shape (N, K)
        Orthonormal spatial basis ``Phi`` (``Phi^T Phi = I``), ``K < N``. A basis
        orthonormal only to ``max |Phi^T Phi - I| <=``
        :data:`ORTHONORMAL_MAX_DEVIATION` (as iterative solvers return) is accepted:
        the covariance is then that of its orthonormalised span. With
        ``G = Phi^T Phi``, the returned ``rotation`` is ``G^{-1/2} V`` rather than an
        orthogonal ``V``, so that ``loadings(basis) = Phi G^{-1/2} V`` has exactly
        orthonormal columns (``Phi G^{-1/2}`` is the closest orthonormal matrix to
        ``Phi``); the change from using ``Phi`` as is is of the order of the deviation.
        Larger deviations are refused.
    data : array_like, shape (T, N)
        Complete residuals, time by sites (no NaN: fill them first, e.g. with the
        reconstruction of the fitting loop).
    gamma : float or None
        None: noise-calibrated rule. A number ``>= 0``: the paper's/SpatPCA's rule with
        this ``gamma`` (``0`` is Wang's rule; it keeps every component, even on noise).
    center : bool
        Remove the per-site time mean before forming ``S`` (SpatPCA's
        ``is_Y_centered``); ``S`` divides by ``T`` in both cases, as SpatPCA does.
    n_eff : float or None
        Effective number of independent time steps, ``1 <= n_eff <= T``, for the
        noise-calibrated rule. None: estimated (see ``effective_sample_size``).
    tw_units : float
        Tracy-Widom scale units above the Johnstone centring in the edge
        (default :data:`DEFAULT_TW_UNITS`).
    effective_sample_size : bool
        When ``n_eff`` is None, estimate it from the lag-1 autocorrelation of the data
        outside the accepted components (True) or take ``n_eff = T`` (False).

    Returns
    -------
    LowRankCovariance

    Raises
    ------
    InputError
        NaN or infinite data, shape mismatch, non-orthonormal basis, ``K >= N``,
        negative ``gamma``, or an ``n_eff`` outside ``[1, T]``.
    """
    estimate_n_eff = effective_sample_size
    basis, whitening = _check_basis(basis)
    data = _check_data(data, basis.shape[0])
    gamma = _check_gamma(gamma)
    n_times, n_sites = data.shape
    if n_eff is not None:
        n_eff = _check_n_eff(n_eff, n_times)
    if not np.isfinite(tw_units):
        raise InputError(f"tw_units must be a finite number, got {tw_units!r}.")

    # the mean first: a graph that needs it and then every chunk again would hold all chunks
    (mean,) = compute(data.mean(axis=0)) if center else (np.zeros(n_sites),)
    # one pass (blocks of rows, or the time chunks): scores, tr(S) and the lag-1 product
    scores, total, lag_one, finite = centred_moments(data, mean, basis if whitening is None else basis @ whitening)
    _check_finite(finite)
    data_autocovariance = np.array([total, lag_one])
    return spectral_rule(scores.T @ scores / n_times, float(total) / n_times, n_sites, n_times, scores=scores,
                         gamma=gamma, center=center, n_eff=n_eff, tw_units=tw_units,
                         estimate_n_eff=estimate_n_eff, data_autocovariance=data_autocovariance,
                         whitening=whitening)


def spectral_rule(projected, total_variance, n_sites, n_times, *, scores=None, gamma=None, center=True,
                  n_eff=None, tw_units=DEFAULT_TW_UNITS, estimate_n_eff=True, data_autocovariance=None,
                  whitening=None):
    """The low-rank-plus-noise covariance from its moments: the rank rules of the module docstring.

    Parameters
    ----------
    projected : ndarray, shape (K, K)
        ``Phi^T S Phi``, the sample covariance projected on the (orthonormalised) basis.
    total_variance : float
        ``tr(S)``.
    n_sites, n_times : int
    scores : ndarray, shape (T, K), optional
        Centred data times the basis (times ``whitening``); needed to estimate
        ``n_eff`` from the components' autocorrelation.
    gamma, center, n_eff, tw_units, estimate_n_eff
        As :func:`low_rank_plus_noise`.
    data_autocovariance : ndarray, shape (2,), optional
        ``[sum_t |x_t|^2, sum_t x_t . x_{t-1}]`` of the centred field, pooled over sites;
        needed when ``n_eff`` is estimated.
    whitening : ndarray, shape (K, K), optional
        ``G^{-1/2}`` of a basis orthonormal only to rounding (see :func:`low_rank_plus_noise`).

    Returns
    -------
    LowRankCovariance
    """
    sample_eigenvalues, rotation = _spectrum(projected)
    if whitening is not None:
        # B = Phi G^{-1/2} V: exactly orthonormal loadings from the basis as given
        rotation = whitening @ rotation

    common = dict(
        rotation=rotation,
        sample_eigenvalues=sample_eigenvalues,
        total_variance=total_variance,
        n_sites=n_sites,
        n_times=n_times,
    )
    signal = sample_eigenvalues > ROUNDING_FLOOR * total_variance
    noise_floor = max(NOISE_FLOOR * total_variance / n_sites, np.finfo(np.float64).tiny)
    if gamma is not None:
        noise_variance = _spatpca_noise_variance(sample_eigenvalues, total_variance, n_sites, gamma)
        noise_variance = max(noise_variance, noise_floor)
        eigenvalues = np.where(signal, np.maximum(sample_eigenvalues - noise_variance - gamma, 0.0), 0.0)
        return _result(eigenvalues, noise_variance, n_eff=None, gamma=gamma, edge=None, **common)

    n_dof = n_times - 1 if center else n_times
    if n_eff is None and not estimate_n_eff:
        n_eff = float(n_times)
    if n_eff is not None:
        rank, edge = _calibrated_rank(sample_eigenvalues, total_variance, n_sites, n_dof,
                                      n_eff * n_dof / n_times, tw_units)
    else:
        rank, edge, n_eff = _calibrated_rank_with_n_eff(
            sample_eigenvalues, total_variance, n_sites, n_dof, tw_units,
            data_autocovariance, scores @ rotation, center, n_times,
        )
    noise_variance = max(_trailing_noise_variance(sample_eigenvalues, total_variance, n_sites, rank), noise_floor)
    eigenvalues = np.zeros_like(sample_eigenvalues)
    eigenvalues[:rank] = np.maximum(sample_eigenvalues[:rank] - noise_variance, 0.0)
    return _result(eigenvalues, noise_variance, n_eff=float(n_eff), gamma=None, edge=edge, **common)


# --- the two rank rules -----------------------------------------------------------


def _trailing_noise_variance(sample_eigenvalues, total_variance, n_sites, rank, gamma=0.0):
    """``sigma_L^2 = (tr(S) - sum_{k<=L} d_k + L gamma) / (N - L)`` for one ``L``."""
    return (total_variance - sample_eigenvalues[:rank].sum() + rank * gamma) / (n_sites - rank)


def _spatpca_noise_variance(sample_eigenvalues, total_variance, n_sites, gamma):
    """Noise variance of SpatPCA's rule: scan L down from K while d_L - gamma < sigma_L^2."""
    fallback = total_variance / n_sites
    if not sample_eigenvalues[0] > gamma:
        return fallback
    rank = sample_eigenvalues.shape[0]
    noise = _trailing_noise_variance(sample_eigenvalues, total_variance, n_sites, rank, gamma)
    while sample_eigenvalues[rank - 1] - gamma < noise:
        if rank == 1:
            break
        rank -= 1
        noise = _trailing_noise_variance(sample_eigenvalues, total_variance, n_sites, rank, gamma)
    # reached only when no L passes: then d_1 - gamma < sigma_1^2
    if sample_eigenvalues[0] - gamma < noise:
        return fallback
    return noise


def _edges(n_sites, n_dof, n_dof_eff, rank, tw_units):
    """Per-test multipliers ``edge_L``, L = 1..K; ``inf`` above the identifiable rank."""
    edges = np.full(rank, np.inf)
    max_rank = min(rank, min(n_sites, n_dof) // 2)
    for test in range(1, max_rank + 1):
        dof_left = n_dof_eff * (n_dof - test) / n_dof
        edges[test - 1] = wishart_edge(dof_left, n_sites - test, tw_units)
    return edges


def _calibrated_rank(sample_eigenvalues, total_variance, n_sites, n_dof, n_dof_eff, tw_units):
    """Largest L with ``d_L > sigma_L^2 * edge_L`` (0 when none) and the edges."""
    rank = sample_eigenvalues.shape[0]
    edges = _edges(n_sites, n_dof, n_dof_eff, rank, tw_units)
    tests = np.arange(1, rank + 1)
    # clipped at 0: on data of lower rank than K, rounding can make it negative
    trailing = np.maximum(total_variance - np.cumsum(sample_eigenvalues), 0.0) / (n_sites - tests)
    signal = sample_eigenvalues > ROUNDING_FLOOR * total_variance
    # an infinite edge (above the identifiable rank) fails its test whatever the
    # trailing variance; multiplying it by a trailing variance of 0 would give NaN and
    # numpy's "invalid value" warning, so those thresholds are set to inf directly
    identifiable = np.isfinite(edges)
    thresholds = np.full(rank, np.inf)
    thresholds[identifiable] = trailing[identifiable] * edges[identifiable]
    passed = np.nonzero((sample_eigenvalues > thresholds) & signal)[0]
    return (int(passed[-1]) + 1 if passed.size else 0), edges


def _calibrated_rank_with_n_eff(sample_eigenvalues, total_variance, n_sites, n_dof, tw_units,
                                data_autocovariance, rotated_scores, center, n_times):
    """Noise-calibrated rank with ``n_eff`` re-estimated outside the accepted components.

    Starts from the whole data (rank 0 accepted) and repeats until the rank is stable;
    a rank that drops ends the search (the stricter answer).
    """
    component_autocovariance = np.array(
        [_pooled_autocovariance(rotated_scores[:, [k]], 1) for k in range(rotated_scores.shape[1])]
    )
    accepted = 0
    for _ in range(rotated_scores.shape[1] + 1):
        outside = data_autocovariance - component_autocovariance[:accepted].sum(axis=0)
        n_eff = _n_eff_from_autocovariance(outside, n_times, center)
        rank, edges = _calibrated_rank(sample_eigenvalues, total_variance, n_sites, n_dof,
                                       n_eff * n_dof / n_times, tw_units)
        if rank <= accepted:
            break
        accepted = rank
    return rank, edges, n_eff


# --- effective sample size ------------------------------------------------------------


def _pooled_autocovariance(series, max_lag):
    """Lag-0..max_lag sums of products ``sum_t <x_t, x_{t+k}>`` (no T x T or N x N array)."""
    n_times = series.shape[0]
    series = np.ascontiguousarray(series)
    return np.array([np.vdot(series[lag:], series[: n_times - lag]) for lag in range(max_lag + 1)])


def _n_eff_from_autocovariance(autocovariance, n_times, centred):
    if autocovariance[0] <= 0:
        return float(n_times)
    autocorrelation = autocovariance[1:] / autocovariance[0]
    if autocorrelation.shape[0] == 1:
        lag_one = autocorrelation[0]
        if centred and n_times > 3:
            lag_one = (lag_one * n_times + 1.0) / (n_times - 3.0)
        # negative autocorrelation would give n_eff > T, which the clip below removes
        lag_one = min(max(lag_one, 0.0), _MAX_AUTOCORRELATION)
        n_eff = n_times * (1.0 - lag_one) / (1.0 + lag_one)
    else:
        n_eff = n_times / max(1.0 + 2.0 * autocorrelation.sum(), 1.0 / n_times)
    return float(np.clip(n_eff, 1.0, n_times))


# --- spectrum and results ----------------------------------------------------------------


def _spectrum(gram):
    """Decreasing eigenvalues and sign-fixed eigenvectors of a symmetric ``gram`` (K, K)."""
    values, vectors = np.linalg.eigh((gram + gram.T) / 2.0)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    pivot = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return values, vectors * signs


def _result(eigenvalues, noise_variance, **fields):
    for key in ("rotation", "sample_eigenvalues", "edge"):
        if fields.get(key) is not None:
            fields[key].setflags(write=False)
    eigenvalues.setflags(write=False)
    return LowRankCovariance(
        eigenvalues=eigenvalues,
        noise_variance=float(noise_variance),
        effective_rank=int(np.count_nonzero(eigenvalues > 0)),
        **fields,
    )


# --- input checks --------------------------------------------------------------------------


def _check_basis(basis):
    basis = np.asarray(basis, dtype=np.float64)
    if basis.ndim != 2:
        raise InputError(f"basis must be a 2-D array (sites, rank), got shape {basis.shape}.")
    n_sites, rank = basis.shape
    if rank < 1 or rank >= n_sites:
        raise InputError(
            f"basis has shape {basis.shape}: the rank must be at least 1 and below the number "
            f"of sites ({n_sites}) so that a noise variance can be estimated."
        )
    if not np.isfinite(basis).all():
        raise InputError("basis contains NaN or infinite values.")
    gram = basis.T @ basis
    deviation = np.abs(gram - np.eye(rank)).max()
    if deviation <= ORTHONORMAL_ATOL:
        return basis, None
    if deviation > ORTHONORMAL_MAX_DEVIATION:
        raise InputError(
            f"basis columns are not orthonormal (max |Phi^T Phi - I| = {deviation:.2e}, accepted up to "
            f"{ORTHONORMAL_MAX_DEVIATION:g}); orthonormalise them first, e.g. with numpy.linalg.qr."
        )
    # G^{-1/2}, G = Phi^T Phi close to I (eigenvalues within 1 +- K * 1e-3)
    values, vectors = np.linalg.eigh((gram + gram.T) / 2.0)
    return basis, (vectors / np.sqrt(values)) @ vectors.T


def _check_data(data, n_sites):
    lazy = is_lazy(data)
    data = data.astype(np.float64) if lazy else np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(f"data must be a 2-D array (time, sites), got shape {data.shape}.")
    if data.shape[1] != n_sites:
        raise InputError(
            f"data has {data.shape[1]} sites (shape {data.shape}, time by sites) but the basis "
            f"has {n_sites}; pass data as (time, sites) on the basis' sites."
        )
    if data.shape[0] < 3:
        raise InputError(f"data has {data.shape[0]} time steps; at least 3 are needed.")
    if lazy:
        return data  # checked in the pass that computes the statistics
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(finite.size - finite.sum()) - n_nan
        raise InputError(
            f"data contain {n_nan} NaN and {n_inf} infinite values; the covariance needs "
            "complete data: fill missing entries first (e.g. with the fitted reconstruction)."
        )
    return data


def _check_finite(finite):
    if not finite:
        raise InputError("data contain NaN or infinite values; the covariance needs complete data: fill "
                         "missing entries first (e.g. with the fitted reconstruction).")


def _check_gamma(gamma):
    if gamma is None:
        return None
    return nonnegative("gamma (None or a number)", gamma)


def _check_n_eff(n_eff, n_times):
    n_eff = float(n_eff)
    if not (np.isfinite(n_eff) and 1.0 <= n_eff <= n_times):
        raise InputError(
            f"n_eff must be between 1 and the number of time steps ({n_times}), got {n_eff!r}."
        )
    return n_eff


def _check_max_lag(max_lag, n_times):
    if int(max_lag) != max_lag or not 1 <= max_lag < n_times - 1:
        raise InputError(
            f"max_lag must be an integer from 1 to {n_times - 2} for {n_times} time steps, "
            f"got {max_lag!r}."
        )
