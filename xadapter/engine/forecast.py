"""Forecasting the residual field ahead: a ridge-regularised VAR on the per-time scores.

The fitted field is ``r_t = mean + B c_t + e_t`` with ``B`` the loadings of the kept
components (positive eigenvalues, ``L`` of them, ``B = Phi V``), ``c_t = B^T (r_t - mean)``
the component scores and ``e_t`` what the kept span leaves. The scores follow a vector
autoregression of order ``p``::

    c_t = A_1 c_{t-1} + ... + A_p c_{t-p} + eps_t,       eps_t ~ (0, Q)

fitted by ridge regression (no intercept: the scores are centred by the site mean).
``h`` steps ahead, the companion form ``s_t = [c_t, ..., c_{t-p+1}]`` gives the mean
``F^h s_T`` and the covariance ``P_h = F P_{h-1} F^T + Q`` (``P_0 = 0``: the start is
known). At a site with loading row ``b`` the forecast of a new observation is::

    mean_h(s) = mean(s) + b^T c_h,     var_h(s) = b^T P_h b + w (1 - |b|^2)_+

where ``w`` is the variance of what the low rank leaves (the fine-scale sill, or the
white noise). The scores are projections of the data, so ``Q`` already holds the part
of the noise inside the kept span; ``w (1 - |b|^2)`` adds the part outside it (the
diagonal of ``w (I - B B^T)``). The remainder is taken as independent in time, so it
carries no forecast skill.

Numbers only; the labelled face (:meth:`xadapter.SpatialAdapter.forecast`) adds times,
sites and targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..exceptions import InputError

#: Default order of the VAR.
DEFAULT_ORDER = 1

#: Default ridge weight, relative to the mean diagonal of the lagged Gram matrix
#: (dimensionless): small enough to leave a well-determined VAR alone, large enough to
#: keep a short or collinear record solvable.
DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True)
class VarModel:
    """A vector autoregression of the ``L`` kept component scores.

    Attributes
    ----------
    coefficients : ndarray (p, L, L)
        ``A_j``: ``c_t = sum_j A_j @ c_{t-j} + eps_t`` (dimensionless).
    innovation_covariance : ndarray (L, L)
        ``Q``, residual units squared.
    """

    coefficients: np.ndarray
    innovation_covariance: np.ndarray

    @property
    def order(self):
        return int(self.coefficients.shape[0])

    @property
    def n_components(self):
        return int(self.coefficients.shape[1])

    def companion(self):
        """Companion matrix ``F`` (pL, pL) of the state ``[c_t, ..., c_{t-p+1}]``."""
        p, n = self.order, self.n_components
        matrix = np.zeros((p * n, p * n))
        matrix[:n] = np.concatenate(list(self.coefficients), axis=1)
        matrix[n:, :-n] = np.eye((p - 1) * n)
        return matrix

    def spectral_radius(self):
        """Largest eigenvalue modulus of the companion matrix (< 1: stationary)."""
        if self.n_components == 0:
            return 0.0
        return float(np.max(np.abs(np.linalg.eigvals(self.companion()))))


def component_scores(scores, rotation, eigenvalues):
    """Scores ``(T, L)`` of the kept components: ``scores @ V[:, lambda > 0]``.

    Parameters
    ----------
    scores : ndarray (T, K)
        Basis scores ``Phi^T (r_t - mean)``.
    rotation : ndarray (K, K)
        ``V`` of ``B = Phi V``.
    eigenvalues : ndarray (K,)
        Thresholded eigenvalues; the positive ones are kept.
    """
    kept = np.asarray(eigenvalues) > 0
    return np.asarray(scores, dtype=np.float64) @ np.asarray(rotation)[:, kept]


def fit_var(series, order=DEFAULT_ORDER, ridge=DEFAULT_RIDGE):
    """Fit a ridge-regularised VAR(p) on a multivariate series.

    Parameters
    ----------
    series : ndarray (T, L)
        Component scores, oldest first, no NaN.
    order : int
        ``p >= 1``.
    ridge : float
        Ridge weight relative to the mean diagonal of the lagged Gram matrix.

    Returns
    -------
    VarModel

    Raises
    ------
    InputError
        Fewer than ``p + 2`` times, a non-finite series, bad ``order`` or ``ridge``.
    """
    series = np.asarray(series, dtype=np.float64)
    if series.ndim != 2:
        raise InputError(f"series must be (T, L), got shape {series.shape}.")
    order = _order(order)
    ridge = float(ridge)
    if not (np.isfinite(ridge) and ridge >= 0):
        raise InputError(f"the VAR ridge must be a number >= 0, got {ridge!r}.")
    n_times, n_components = series.shape
    if n_times < order + 2:
        raise InputError(f"a VAR of order {order} needs at least {order + 2} time steps, got {n_times}.")
    if not np.isfinite(series).all():
        raise InputError("the scores contain NaN or infinite values.")
    if n_components == 0:
        return VarModel(np.zeros((order, 0, 0)), np.zeros((0, 0)))
    target = series[order:]
    lagged = np.concatenate([series[order - j:n_times - j] for j in range(1, order + 1)], axis=1)
    gram = lagged.T @ lagged
    alpha = ridge * np.trace(gram) / gram.shape[0]
    solution = np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), lagged.T @ target)  # (pL, L)
    coefficients = solution.T.reshape(n_components, order, n_components).transpose(1, 0, 2)
    innovations = target - lagged @ solution
    # degrees of freedom: each equation spends p L coefficients
    dof = max(target.shape[0] - order * n_components, 1)
    innovation_covariance = innovations.T @ innovations / dof
    return VarModel(coefficients, 0.5 * (innovation_covariance + innovation_covariance.T))


def _order(order):
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
        raise InputError(f"the VAR order must be an integer >= 1, got {order!r}.")
    return int(order)


def forecast_scores(var, history, steps):
    """Mean and covariance of the component scores ``1..steps`` ahead.

    Parameters
    ----------
    var : VarModel
    history : ndarray (p', L)
        The latest scores, oldest first, ``p' >= p`` (only the last ``p`` are used).
    steps : int
        Forecast horizon, ``>= 1``.

    Returns
    -------
    mean : ndarray (steps, L)
    covariance : ndarray (steps, L, L)
        Residual units squared.
    """
    steps = check_steps(steps)
    history = np.asarray(history, dtype=np.float64)
    p, n = var.order, var.n_components
    if history.ndim != 2 or history.shape[1] != n or history.shape[0] < p:
        raise InputError(f"the start needs the last {p} score vectors of length {n}, got shape {history.shape}.")
    companion = var.companion()
    state = history[::-1][:p].reshape(-1)  # [c_T, c_{T-1}, ...]
    noise = np.zeros((p * n, p * n))
    noise[:n, :n] = var.innovation_covariance
    covariance = np.zeros_like(noise)
    means = np.empty((steps, n))
    covariances = np.empty((steps, n, n))
    for step in range(steps):
        state = companion @ state
        covariance = companion @ covariance @ companion.T + noise
        means[step] = state[:n]
        covariances[step] = covariance[:n, :n]
    return means, covariances


def check_steps(steps):
    """``steps`` as an int ``>= 1``, else an InputError."""
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be an integer >= 1 (time steps ahead), got {steps!r}.")
    return int(steps)


def field_moments(score_mean, score_covariance, loadings, site_mean, remainder_variance):
    """Forecast mean and variance of the field at ``P`` sites.

    Parameters
    ----------
    score_mean : ndarray (H, L)
    score_covariance : ndarray (H, L, L)
        From :func:`forecast_scores`.
    loadings : ndarray (P, L)
        Kept loadings ``B`` at the targets (extended to new sites as for kriging).
    site_mean : ndarray (P,)
        Site mean at the targets.
    remainder_variance : float
        ``w``: variance of what the kept span leaves (units squared).

    Returns
    -------
    mean, variance : ndarray (H, P)
        Units and units squared.
    """
    mean = site_mean[None, :] + score_mean @ loadings.T
    spread = np.einsum("pl,hlm,pm->hp", loadings, score_covariance, loadings)
    outside = float(remainder_variance) * np.maximum(1.0 - np.sum(loadings * loadings, axis=1), 0.0)
    return mean, spread + outside[None, :]


def target_geometry(model, targets=None):
    """Kept loadings, site mean and new-site variance ratio at the forecast targets.

    Targets off the fitted sites are handled as in kriging: the basis and the site
    mean are extended by the smoothed thin-plate spline of the fit, and the variance
    is scaled by the cross-validated ratio of the nearest fitted sites (the extension
    error).

    Parameters
    ----------
    model : FittedModel
    targets : Sites, optional
        New locations; default the fitted sites.

    Returns
    -------
    loadings : ndarray (P, L)
    site_mean : ndarray (P,)
    ratio : ndarray (P,) or None
        Multiplier of the variance at new sites (None: at the fitted sites, or no
        calibration).
    """
    from .extend import extend_basis
    from .validation import variance_ratio_at

    kept = model.eigenvalues > 0
    if targets is None:
        return model.kept_loadings, model.mean, None
    if targets.geographic != model.geographic:
        raise InputError("`at` and the fitted sites use different coordinate systems (lat/lon vs x/y); "
                         "give target locations in the fitted system.")
    planar = model.target_planar(targets)
    extended = extend_basis(planar, model.planar, np.column_stack([model.basis, model.mean]), **model.extension)
    loadings = extended[:, :-1] @ model.rotation[:, kept]
    ratio = None
    if model.calibration is not None:
        c = model.calibration
        ratio = variance_ratio_at(planar, model.planar, c.squared_error, c.model_variance, c.count)
    return loadings, extended[:, -1], ratio


def forecast_field(model, history, steps, targets=None):
    """Forecast mean and variance of a new observation of the residual field.

    Parameters
    ----------
    model : FittedModel
        With a fitted :class:`VarModel` (``model.var``).
    history : ndarray (p', L)
        Latest component scores, oldest first (:func:`component_scores`).
    steps : int
        Horizon.
    targets : Sites, optional
        New locations; default the fitted sites.

    Returns
    -------
    mean, variance : ndarray (steps, P)
        Residual units and units squared.
    """
    if model.var is None:
        raise InputError("the adapter has no fitted VAR of its scores; refit it with this version.")
    score_mean, score_covariance = forecast_scores(model.var, history, steps)
    loadings, site_mean, ratio = target_geometry(model, targets)
    mean, variance = field_moments(score_mean, score_covariance, loadings, site_mean, model.remainder_variance)
    if ratio is not None:
        variance = variance * ratio[None, :]
    return mean, variance
