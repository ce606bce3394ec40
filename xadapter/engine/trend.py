"""Residual trend ``mu_theta = X theta``: ridge regression on user covariates.

The trend of DESIGN section 1 is linear in covariates ``X`` with a ``feature`` axis
and one coefficient vector ``theta`` shared over space and time. Three layouts are
understood (``T`` times, ``N`` sites, ``p`` features):

``(T, N, p)``  ``"time-space"``
    A value per time, site and feature.
``(T, p)``     ``"time"``
    The same value at every site (e.g. seasonal harmonics), broadcast over space.
``(N, p)``     ``"space"``
    The same value at every time (e.g. elevation), broadcast over time.

The closed-form theta-step solves ``(X^T M X + ridge I) theta = X^T M y`` where ``M``
is the mask of observed entries of ``y`` (missing entries carry no data). For the
broadcast layouts the ``(T, N, p)`` design is never materialised: with ``n_t`` the
number of observed sites at time ``t``, ``X^T M X = sum_t n_t x_t x_t^T`` and
``X^T M y = sum_t x_t (sum_s M y)_t`` (and the same over sites for ``"space"``).

No covariates means no trend: callers pass ``None`` around these functions rather than
an empty design (a ``p = 0`` array is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .checks import nonnegative
from ..exceptions import InputError

LAYOUTS = ("time-space", "time", "space")

#: Elements of a ``(T, N, p)`` design processed at once when accumulating ``X^T M X``.
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Covariates:
    """Validated covariates of the residual trend.

    Attributes
    ----------
    values : ndarray
        float64 array of shape ``(T, N, p)``, ``(T, p)`` or ``(N, p)`` (see ``layout``).
    layout : {"time-space", "time", "space"}
        Which axes ``values`` varies along; the missing axis is broadcast.
    n_times, n_sites : int
        Shape ``(T, N)`` of the residual field the covariates describe.
    """

    values: np.ndarray
    layout: str
    n_times: int
    n_sites: int

    @property
    def n_features(self):
        """Number of features ``p``."""
        return self.values.shape[-1]

    def rows(self, rows):
        """Covariates of a subset of times.

        Parameters
        ----------
        rows : slice or array of int
            Times to keep (a contiguous window is a slice: no copy is made).

        Returns
        -------
        Covariates
            With ``n_times`` the number of selected times; ``"space"`` covariates are
            shared and returned unchanged apart from ``n_times``.
        """
        n_rows = len(range(self.n_times)[rows]) if isinstance(rows, slice) else len(rows)
        values = self.values if self.layout == "space" else self.values[rows]
        return Covariates(values, self.layout, n_rows, self.n_sites)

    def gram(self, mask=None):
        """``X^T M X`` over the observed entries, shape ``(p, p)``.

        Parameters
        ----------
        mask : ndarray of bool, shape (T, N), optional
            True where the target is observed; None: every entry.
        """
        x = self.values
        if self.layout == "time":
            weights = np.full(self.n_times, float(self.n_sites)) if mask is None else mask.sum(axis=1)
            return x.T @ (x * weights[:, None])
        if self.layout == "space":
            weights = np.full(self.n_sites, float(self.n_times)) if mask is None else mask.sum(axis=0)
            return x.T @ (x * weights[:, None])
        p = self.n_features
        gram = np.zeros((p, p))
        step = max(1, _CHUNK_ELEMENTS // max(1, self.n_sites * p))
        for start in range(0, self.n_times, step):
            block = x[start:start + step].reshape(-1, p)
            if mask is not None:
                weights = mask[start:start + step].reshape(-1)
                gram += block.T @ (block * weights[:, None])
            else:
                gram += block.T @ block
        return gram

    def project(self, target, mask=None):
        """``X^T M y``, shape ``(p,)``.

        Parameters
        ----------
        target : ndarray, shape (T, N)
            Values at masked-out entries are ignored (they may be NaN).
        mask : ndarray of bool, shape (T, N), optional
        """
        y = target if mask is None else np.where(mask, target, 0.0)
        if self.layout == "time":
            return self.values.T @ y.sum(axis=1)
        if self.layout == "space":
            return self.values.T @ y.sum(axis=0)
        return np.einsum("tnp,tn->p", self.values, y)

    def evaluate(self, theta):
        """Trend ``X theta`` as a ``(T, N)`` array (a new array, never a view)."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_features,):
            raise InputError(f"theta must have shape ({self.n_features},) to match the covariates' "
                             f"{self.n_features} features, got {theta.shape}.")
        trend = self.values @ theta
        if self.layout == "time":
            return np.repeat(trend[:, None], self.n_sites, axis=1)
        if self.layout == "space":
            return np.repeat(trend[None, :], self.n_times, axis=0)
        return trend


def _layout_of(shape, n_times, n_sites, layout):
    if layout is not None:
        if layout not in LAYOUTS:
            raise InputError(f"unknown covariate layout {layout!r}; choose one of {LAYOUTS}.")
        expected = {"time-space": (n_times, n_sites), "time": (n_times,), "space": (n_sites,)}[layout]
        if shape[:-1] != expected:
            raise InputError(f"covariates with layout {layout!r} must have shape {expected + ('p',)}, "
                             f"got {shape}.")
        return layout
    if len(shape) == 3:
        if shape[:2] != (n_times, n_sites):
            raise InputError(f"3-D covariates must have shape (T, N, p) = ({n_times}, {n_sites}, p), "
                             f"got {shape}.")
        return "time-space"
    if len(shape) == 2:
        if n_times == n_sites and shape[0] == n_times:
            raise InputError(f"2-D covariates of shape {shape} are ambiguous with {n_times} times and "
                             f"{n_sites} sites; pass layout='time' or layout='space', or a (T, N, p) array.")
        if shape[0] == n_times:
            return "time"
        if shape[0] == n_sites:
            return "space"
        raise InputError(f"2-D covariates must have shape (T, p) = ({n_times}, p) or (N, p) = "
                         f"({n_sites}, p), got {shape}.")
    raise InputError(f"covariates must have a trailing feature axis: shape (T, N, p), (T, p) or (N, p); "
                     f"got {len(shape)} dimension(s) {shape}. Add a feature axis for a single covariate "
                     "(e.g. x[..., None]).")


def as_covariates(covariates, n_times, n_sites, layout=None):
    """Validate covariates of the residual trend.

    Parameters
    ----------
    covariates : array_like or Covariates
        Shape ``(T, N, p)``, ``(T, p)`` (broadcast over space) or ``(N, p)``
        (broadcast over time); the last axis is the ``feature`` axis. Units are the
        user's; ``theta`` is in residual units per covariate unit.
    n_times, n_sites : int
        Shape ``(T, N)`` of the residual field.
    layout : {"time-space", "time", "space"}, optional
        Needed only when ``T == N`` and the array is 2-D, where the shape alone does
        not say which axis it varies along.

    Returns
    -------
    Covariates

    Raises
    ------
    InputError
        Wrong shape, no feature, ambiguous shape, non-numeric values, NaN or infinite
        values (covariates cannot be missing: the trend must be known wherever the
        residual is).
    """
    if isinstance(covariates, Covariates):
        if (covariates.n_times, covariates.n_sites) != (n_times, n_sites):
            raise InputError(f"covariates describe a ({covariates.n_times}, {covariates.n_sites}) field, "
                             f"expected ({n_times}, {n_sites}).")
        return covariates
    values = np.asarray(covariates)
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool) or np.iscomplexobj(values):
        raise InputError(f"covariates must be real numbers, got dtype {values.dtype}.")
    values = np.asarray(values, dtype=np.float64)
    layout = _layout_of(values.shape, int(n_times), int(n_sites), layout)
    if values.shape[-1] == 0:
        raise InputError("covariates have no feature (last axis of length 0); pass covariates=None "
                         "for no trend.")
    finite = np.isfinite(values)
    if not finite.all():
        bad_features = np.flatnonzero(~finite.reshape(-1, values.shape[-1]).all(axis=0))
        raise InputError(f"covariates contain {int(np.sum(~finite))} NaN or infinite value(s) (features "
                         f"{bad_features.tolist()}); covariates cannot be missing: fill them or drop the "
                         "affected times/sites.")
    return Covariates(values, layout, int(n_times), int(n_sites))


class RidgeTrend:
    """Closed-form ridge solver for a fixed design and observation mask.

    ``X^T M X + ridge I`` is factorised once, so repeated theta-steps (one per ADMM
    iteration) cost one ``X^T M y`` each.

    Parameters
    ----------
    covariates : Covariates
    ridge : float
        Non-negative ridge weight, added to ``X^T M X`` (units of ``X^T X``: covariate
        units squared times observed entries).
    mask : ndarray of bool, shape (T, N), optional
        Observed entries; None: every entry.
    gram : ndarray, shape (p, p), optional
        ``X^T M X`` when it was accumulated elsewhere (over blocks of times); then
        ``mask`` is not used and targets come as projections (:meth:`solve_projected`).
    """

    def __init__(self, covariates, ridge, mask=None, gram=None):
        self.covariates = covariates
        self.mask = mask
        gram = covariates.gram(mask) if gram is None else np.array(gram, dtype=np.float64)
        gram[np.diag_indices_from(gram)] += ridge
        try:
            self._factor = sla.cho_factor(gram, lower=True)
        except np.linalg.LinAlgError:
            raise InputError("the covariates are collinear (or a feature is zero on every observed "
                             "entry) and ridge is 0; drop redundant features or pass ridge > 0.") from None
        scale = np.abs(np.diag(gram)).max()
        if np.min(np.abs(np.diag(self._factor[0]))) ** 2 <= 1e-13 * scale:
            raise InputError("the covariates are numerically collinear; drop redundant features or "
                             "raise ridge.")

    def solve(self, target):
        """``theta`` (p,) for a ``(T, N)`` target (entries outside the mask ignored)."""
        return self.solve_projected(self.covariates.project(target, self.mask))

    def solve_projected(self, projection):
        """``theta`` (p,) for a target given by its projection ``X^T M y`` (p,)."""
        return sla.cho_solve(self._factor, projection)


def _check_target(target, covariates, mask):
    target = np.asarray(target, dtype=np.float64)
    if target.shape != (covariates.n_times, covariates.n_sites):
        raise InputError(f"target must have shape (T, N) = ({covariates.n_times}, {covariates.n_sites}), "
                         f"got {target.shape}.")
    if mask is None:
        mask = np.isfinite(target)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != target.shape:
            raise InputError(f"mask must have the shape of the target {target.shape}, got {mask.shape}.")
        if not np.isfinite(target[mask]).all():
            raise InputError("target has NaN or infinite values at entries the mask marks as observed.")
    if not mask.any():
        raise InputError("target has no observed entry; the trend cannot be fitted.")
    return target, (None if mask.all() else mask)


def _check_ridge(ridge):
    return nonnegative("ridge", ridge)


def fit_trend(target, covariates, ridge=1e-6, mask=None, layout=None):
    """Ridge regression of a residual field on covariates, over observed entries only.

    Solves ``(X^T M X + ridge I) theta = X^T M y``.

    Parameters
    ----------
    target : array_like, shape (T, N)
        Residuals (time rows, space columns); NaN where missing.
    covariates : array_like or Covariates
        ``(T, N, p)``, ``(T, p)`` or ``(N, p)``; see :func:`as_covariates`.
    ridge : float, default 1e-6
        Ridge weight added to ``X^T M X`` (not rescaled).
    mask : array_like of bool, shape (T, N), optional
        True where the target is observed; default ``isfinite(target)``.
    layout : str, optional
        Passed to :func:`as_covariates`.

    Returns
    -------
    theta : ndarray, shape (p,)
        Coefficients, in residual units per covariate unit.
    """
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 2:
        raise InputError(f"target must be a 2-D (time, space) array, got shape {target.shape}.")
    covariates = as_covariates(covariates, target.shape[0], target.shape[1], layout)
    target, mask = _check_target(target, covariates, mask)
    return RidgeTrend(covariates, _check_ridge(ridge), mask).solve(target)


def evaluate_trend(covariates, theta, n_times, n_sites, layout=None):
    """Residual trend ``mu_theta = X theta`` on a ``(T, N)`` field.

    Parameters
    ----------
    covariates : array_like or Covariates
        ``(T, N, p)``, ``(T, p)`` or ``(N, p)``.
    theta : array_like, shape (p,)
    n_times, n_sites : int
    layout : str, optional
        Passed to :func:`as_covariates`.

    Returns
    -------
    ndarray, shape (T, N)
        In residual units.
    """
    return as_covariates(covariates, n_times, n_sites, layout).evaluate(theta)
