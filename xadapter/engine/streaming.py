"""Streaming updates: fold new time steps into a fitted adapter without the old data.

A fit with no gaps, no trend and ``tau2 = 0`` depends on the data only through

* the number of times ``n``, the per-site sum and the ``N x N`` Gram matrix of the
  residuals (the centred Gram ``Dc^T Dc`` of the basis step, ``tr(S)`` and
  ``Phi^T S Phi`` of the spectral rule), and
* the lag-one sum ``sum_t <r_t, r_(t-1)>`` with the first and the latest residual (the
  effective sample size of the noise-calibrated rule),

all of which are sums over times (:class:`RunningStatistics`). An update adds the new
times to these sums and recomputes the basis (top-``K`` eigenvectors of
``Dc^T Dc - tau1 Omega``, a dense subset eigendecomposition: 0.4 s at 1200 sites), the
site mean and the covariance, exactly as a full refit on all the data would. A block
eigensolver warm-started at the previous basis (LOBPCG) was tried and dropped: it was
slower at 1200 sites and stalled when the trailing kept eigenvalues sit close to the
noise ones.

What is not exact (documented limits):

* the scores of the old times are re-expressed in the new basis through the old span,
  ``a_new = Phi_new^T (Phi_old a_old + mean_old - mean_new)``: the part of an old
  residual outside the old span is gone. The error is of the order of the noise
  projected on the change of span; it enters the effective sample size of the rank
  rule (through the component autocorrelations) and the VAR of the scores;
* the fine-scale covariance and the site cross-validation (calibration at new sites)
  are those of the last full fit: they need the data themselves.

Unsupported (an :class:`~xadapter.exceptions.InputError`): gaps (at the fit or in an
update), a residual trend, ``tau2 > 0``, the rank/smoothness search, and more than
:data:`STREAM_MAX_SITES` sites (the Gram matrix is kept in memory and in the file:
``8 N^2`` bytes). Refit from the full record in those cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from ..exceptions import InputError
from . import covariance as cov
from .forecast import component_scores, fit_var

#: Most sites whose Gram matrix a streaming adapter keeps (72 MB at 3000).
STREAM_MAX_SITES = 3000


@dataclass(frozen=True)
class RunningStatistics:
    """Sums over the fitted times that determine a complete-data fit.

    Sums are taken about a fixed ``reference`` (the site mean of the first fit), so
    that the centred Gram does not lose digits to a large mean.

    Attributes
    ----------
    n_times : int
    reference : ndarray (N,)
        Units.
    total : ndarray (N,)
        ``sum_t (r_t - reference)``, units.
    gram : ndarray (N, N)
        ``sum_t (r_t - reference)(r_t - reference)^T``, units squared.
    lag_one : float
        ``sum_(t>=2) <r_t - reference, r_(t-1) - reference>``, units squared.
    first, last : ndarray (N,)
        First and latest residual, units.
    """

    n_times: int
    reference: np.ndarray
    total: np.ndarray
    gram: np.ndarray
    lag_one: float
    first: np.ndarray
    last: np.ndarray

    @property
    def n_sites(self):
        return int(self.reference.shape[0])

    @property
    def mean(self):
        """Per-site mean of every time summed (N,)."""
        return self.reference + self.total / self.n_times

    def centred_gram(self):
        """``Dc^T Dc`` (N, N) of the time-centred residuals."""
        return self.gram - np.outer(self.total, self.total) / self.n_times

    def centred_lag_one(self):
        """``sum_(t>=2) <r_t - m, r_(t-1) - m>`` with ``m`` the mean."""
        shift = self.total / self.n_times
        first, last = self.first - self.reference, self.last - self.reference
        return float(self.lag_one - shift @ (self.total - first) - shift @ (self.total - last)
                     + (self.n_times - 1) * (shift @ shift))

    def add(self, data):
        """The statistics with the rows of ``data`` (t, N) appended in time order."""
        data = np.asarray(data, dtype=np.float64)
        x = data - self.reference
        lag_one = self.lag_one + float(x[0] @ (self.last - self.reference)) + float(np.vdot(x[1:], x[:-1]))
        return RunningStatistics(n_times=self.n_times + data.shape[0], reference=self.reference,
                                 total=self.total + x.sum(axis=0), gram=self.gram + x.T @ x, lag_one=lag_one,
                                 first=self.first, last=data[-1].copy())


def running_statistics(data, reference=None):
    """:class:`RunningStatistics` of complete residuals ``(T, N)`` (numpy or dask)."""
    from .chunks import compute

    n_times, n_sites = data.shape
    check_streamable_size(n_sites)
    if reference is None:
        (reference,) = compute(data.mean(axis=0))
    reference = np.asarray(reference, dtype=np.float64)
    x = data - reference
    total, gram, lag_one, first, last = compute(x.sum(axis=0), x.T @ x, (x[1:] * x[:-1]).sum(), data[0], data[-1])
    return RunningStatistics(n_times=int(n_times), reference=reference, total=np.asarray(total),
                             gram=np.asarray(gram), lag_one=float(lag_one), first=np.asarray(first, dtype=np.float64),
                             last=np.asarray(last, dtype=np.float64))


def check_streamable_size(n_sites):
    if n_sites > STREAM_MAX_SITES:
        raise InputError(
            f"streaming updates keep the {n_sites} x {n_sites} Gram matrix of the sites "
            f"({8 * n_sites**2 / 1e9:.1f} GB); they are limited to {STREAM_MAX_SITES} sites. Refit on the "
            "full record instead (streaming=False)."
        )


def check_streamable(settings, has_gaps, has_trend):
    """Refuse fits whose result the running statistics cannot reproduce."""
    reasons = []
    if has_gaps:
        reasons.append("the residuals have gaps (NaN)")
    if has_trend:
        reasons.append("the adapter has a residual trend (covariates)")
    if settings.tau2 > 0:
        reasons.append("tau2 > 0 (the sparse basis step needs the data)")
    if settings.searching:
        reasons.append("rank='auto' or tau1='cv' (the search needs the data)")
    if reasons:
        raise InputError("streaming updates need complete residuals, no trend, tau2=0 and a fixed rank and "
                         f"tau1, but {'; '.join(reasons)}. Fit with streaming=False and refit on the full "
                         "record to add data.")


def update(model, data, settings, omega=None):
    """Fold new complete residuals ``(t, N)`` into a fitted model.

    Parameters
    ----------
    model : FittedModel
        With running statistics (``model.stream``).
    data : ndarray (t, N)
        New residuals at the fitted sites (fitted order), later than every fitted time,
        no NaN.
    settings : Settings
        The model's settings (``tau1``, ``gamma``, ``var_order``, ``var_ridge``).
    omega : ndarray or sparse matrix (N, N), optional
        Smoothness penalty of the fit (needed when ``tau1 > 0``).

    Returns
    -------
    FittedModel
        Basis, scores (old ones re-expressed, new ones appended), mean, covariance,
        VAR and statistics updated; fine scale and calibration kept.
    """
    stats = model.stream
    if stats is None:
        raise InputError("this adapter keeps no running statistics: fit it with streaming=True to update it.")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != model.n_sites:
        raise InputError(f"new residuals must be (time, {model.n_sites} sites), got shape {data.shape}.")
    if data.shape[0] == 0:
        raise InputError("new residuals have no time step.")
    if not np.isfinite(data).all():
        raise InputError("new residuals must be complete (no NaN or infinite values) at every fitted site: "
                         "streaming updates do not fill gaps; krige the gaps first or refit.")
    stats = stats.add(data)
    centred_gram = stats.centred_gram()
    objective = centred_gram if not float(settings.tau1) else centred_gram - float(settings.tau1) * _dense(omega)
    basis = top_eigenvectors(objective, model.rank)
    basis = _canonical(basis, centred_gram)
    mean = stats.mean
    old_scores = model.scores @ (model.basis.T @ basis) + (model.mean - mean) @ basis
    scores = np.concatenate([old_scores, (data - mean) @ basis])
    covariance = covariance_from_statistics(basis, centred_gram, stats, scores, settings.gamma)
    updated = model.replace(basis=basis, scores=scores, mean=mean, stream=stats, **covariance)
    var = fit_var(component_scores(scores, updated.rotation, updated.eigenvalues), settings.var_order,
                  settings.var_ridge)
    return updated.replace(var=var)


def _dense(omega):
    if omega is None:
        raise InputError("tau1 > 0 needs the smoothness penalty of the fit.")
    return omega.toarray() if hasattr(omega, "toarray") else np.asarray(omega)


def top_eigenvectors(matrix, rank):
    """Top-``rank`` eigenvectors (N, rank) of a symmetric matrix (N, N), decreasing eigenvalues.

    Dense (LAPACK's subset driver): exact, and on the sizes a streaming adapter keeps
    as fast as a block eigensolver warm-started at the previous basis, which stalls
    when the trailing kept eigenvalues are close to the next ones (noise components).
    """
    n_sites = matrix.shape[0]
    _, vectors = sla.eigh(matrix, subset_by_index=[n_sites - rank, n_sites - 1])
    return vectors[:, ::-1]


def _canonical(basis, centred_gram):
    """Columns by decreasing ``phi^T Dc^T Dc phi``, largest-magnitude entry positive (as the fit)."""
    variance = np.einsum("nk,nm,mk->k", basis, centred_gram, basis)
    basis = basis[:, np.argsort(-variance, kind="stable")]
    rows = np.argmax(np.abs(basis), axis=0)
    return basis * np.where(basis[rows, np.arange(basis.shape[1])] < 0, -1.0, 1.0)


def covariance_from_statistics(basis, centred_gram, stats, scores, gamma=None,
                               tw_units=cov.DEFAULT_TW_UNITS):
    """The low-rank-plus-noise covariance of :func:`xadapter.engine.covariance.low_rank_plus_noise`.

    From the centred Gram rather than the data: ``tr(S) = tr(Dc^T Dc) / T`` and
    ``Phi^T S Phi = Phi^T Dc^T Dc Phi / T`` are exact; the effective sample size uses
    the running lag-one sum for the whole field and ``scores`` (T, K) for the
    components.

    Returns
    -------
    dict
        ``rotation``, ``eigenvalues``, ``sample_eigenvalues``,
        ``low_rank_noise_variance``, ``n_eff`` (fields of a FittedModel).
    """
    n_times, n_sites = stats.n_times, stats.n_sites
    total = float(np.trace(centred_gram))
    covariance = cov.spectral_rule(
        basis.T @ centred_gram @ basis / n_times, total / n_times, n_sites, n_times, scores=scores, gamma=gamma,
        tw_units=tw_units, data_autocovariance=np.array([total, stats.centred_lag_one()]))
    return {"rotation": np.array(covariance.rotation), "eigenvalues": np.array(covariance.eigenvalues),
            "sample_eigenvalues": np.array(covariance.sample_eigenvalues),
            "low_rank_noise_variance": covariance.noise_variance,
            "n_eff": None if covariance.n_eff is None else float(covariance.n_eff)}
