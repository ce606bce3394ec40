"""Scores for kriged predictions: RMSE, MAE, Gaussian CRPS, interval coverage, width and score.

All functions are NaN-aware: an entry is ignored when any of the inputs is NaN
there (e.g. an unobserved truth). Inputs are array-likes of broadcastable shapes
(numpy arrays, or xarray DataArrays through ``np.asarray``, matched by position,
not by dimension name). ``axis=None`` averages over every entry and returns a
float; an int or tuple averages over those axes and returns an array. A slice
with no valid entry gives NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from ..exceptions import InputError

_INV_SQRT_PI = 1.0 / np.sqrt(np.pi)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def _arrays(*values, names):
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    try:
        arrays = np.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays))
        raise InputError(f"inputs must have the same (or broadcastable) shapes, got {shapes}.") from None
    valid = ~np.logical_or.reduce([np.isnan(a) for a in arrays])
    return arrays, valid


def _nanmean(values, valid, axis):
    """Mean of ``values`` over ``valid`` entries; NaN where nothing is valid."""
    total = np.where(valid, values, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(mean) if axis is None else mean


def rmse(truth, prediction, axis=None):
    """Root-mean-square error, in data units.

    Parameters
    ----------
    truth, prediction : array_like, broadcastable shapes
    axis : None, int or tuple of int

    Returns
    -------
    float or ndarray
    """
    (truth, prediction), valid = _arrays(truth, prediction, names=("truth", "prediction"))
    mse = _nanmean((prediction - truth) ** 2, valid, axis)
    return float(np.sqrt(mse)) if axis is None else np.sqrt(mse)


def mae(truth, prediction, axis=None):
    """Mean absolute error, in data units."""
    (truth, prediction), valid = _arrays(truth, prediction, names=("truth", "prediction"))
    return _nanmean(np.abs(prediction - truth), valid, axis)


def crps_gaussian(truth, mean, variance, axis=None):
    """Mean continuous ranked probability score of Gaussian predictions, closed form.

    For ``N(m, s^2)`` and outcome ``y``, with ``z = (y - m) / s``
    (Gneiting and Raftery 2007)::

        CRPS = s * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))

    which tends to ``|y - m|`` as ``s -> 0``. Lower is better; data units.

    Parameters
    ----------
    truth, mean : array_like
        Outcomes and predictive means, data units.
    variance : array_like
        Predictive variances (>= 0), data units squared.
    axis : None, int or tuple of int
    """
    (truth, mean, variance), valid = _arrays(truth, mean, variance, names=("truth", "mean", "variance"))
    if (variance[valid] < 0).any():
        raise InputError("variance has negative entries; pass predictive variances (>= 0).")
    spread = np.sqrt(np.where(valid, variance, 1.0))
    error = np.where(valid, truth - mean, 0.0)
    positive = spread > 0
    z = np.where(positive, error / np.where(positive, spread, 1.0), 0.0)
    score = spread * (z * (2.0 * ndtr(z) - 1.0) + 2.0 * _INV_SQRT_2PI * np.exp(-0.5 * z * z) - _INV_SQRT_PI)
    score = np.where(positive, score, np.abs(error))
    return _nanmean(score, valid, axis)


def coverage(truth, lower, upper, axis=None):
    """Share of outcomes inside ``[lower, upper]`` (bounds included), in [0, 1]."""
    (truth, lower, upper), valid = _arrays(truth, lower, upper, names=("truth", "lower", "upper"))
    inside = (truth >= lower) & (truth <= upper)
    return _nanmean(inside.astype(np.float64), valid, axis)


def interval_width(lower, upper, axis=None):
    """Mean interval width ``upper - lower``, in data units."""
    (lower, upper), valid = _arrays(lower, upper, names=("lower", "upper"))
    return _nanmean(upper - lower, valid, axis)


def interval_score(truth, lower, upper, level, axis=None):
    """Mean interval score of central intervals at nominal ``level`` (lower is better).

    With ``alpha = 1 - level`` (Gneiting and Raftery 2007, eq. 43)::

        (u - l) + (2 / alpha) (l - y) 1{y < l} + (2 / alpha) (y - u) 1{y > u}

    Parameters
    ----------
    truth, lower, upper : array_like
        Outcomes and interval bounds, data units.
    level : float
        Nominal coverage in (0, 1).
    axis : None, int or tuple of int
    """
    level = float(level)
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie strictly between 0 and 1, got {level}.")
    (truth, lower, upper), valid = _arrays(truth, lower, upper, names=("truth", "lower", "upper"))
    penalty = 2.0 / (1.0 - level)
    misses = np.maximum(lower - truth, 0.0) + np.maximum(truth - upper, 0.0)
    score = (upper - lower) + penalty * misses
    return _nanmean(score, valid, axis)
