"""Binary targets: the logit link, the logit-scale residual and the predictive probability.

A classifier's first stage gives a probability ``p`` (or its logit ``eta``) per site and
time; the label ``y`` is 0 or 1 (a proportion in ``[0, 1]`` is accepted too). The
adapter models a residual on the logit scale,

    eta_true = eta + r,        y ~ Bernoulli(sigmoid(eta_true)),

with ``r`` low rank plus noise like any residual field. Two observable residuals:

``"working"`` (default): the IRLS working residual ``(y - p) / (p (1 - p))``.
    To first order in ``r`` its expectation is ``r`` itself
    (``E[y] - p = p (1 - p) r + O(r^2)``), so kriging it estimates the latent logit
    offset without bias for moderate offsets. The denominator is floored at
    ``c (1 - c)`` (``c`` the clip) so a confident miss stays finite.
``"logit"``: ``logit(y_c) - eta`` with ``y`` clipped to ``[c, 1 - c]``.
    Bounded (``|logit(y_c)| <= logit(1 - c)``) but biased: its expectation is
    ``logit(1 - c) (2 q - 1) - eta`` (``q`` the true probability), not the offset; it
    suits proportions of many trials better than single labels.

Either way most of the residual's white part is Bernoulli noise, not a latent logit
variance: the predictive probability uses the kriged *latent* field (mean ``m``,
variance ``s^2``, without the white noise) through the logistic-normal mean
``E[sigmoid(Z)]``, ``Z ~ N(m, s^2)`` (Gauss-Hermite, or the probit approximation
``sigmoid(m / sqrt(1 + pi s^2 / 8))``), and the interval
``[sigmoid(m - q s), sigmoid(m + q s)]``.

Numbers only (numpy); NaN passes through as missing.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit

from ..exceptions import InputError

RESIDUAL_KINDS = ("working", "logit")
PREDICTION_SCALES = ("probability", "logit")
PROBABILITY_METHODS = ("gauss-hermite", "probit")

#: Default clip ``c`` (dimensionless): labels to ``[c, 1 - c]`` for the logit residual,
#: the working residual's weight floored at ``c (1 - c)``.
DEFAULT_CLIP = 0.01

#: Gauss-Hermite nodes of the logistic-normal mean: absolute error below 1e-9 for
#: latent standard deviations up to 5 (measured against adaptive quadrature; 40 nodes
#: give 2e-6, the logistic's poles limit the convergence).
HERMITE_NODES = 100

sigmoid = expit


def check_probability(values, name="prediction"):
    """``values`` as float64, or an InputError if any non-NaN entry is outside ``[0, 1]``."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise InputError(f"{name} must hold probabilities in [0, 1] (NaN where missing), got values in "
                         f"[{finite.min():.4g}, {finite.max():.4g}]; pass logits with prediction_scale='logit'.")
    return values


def first_stage_logit(prediction, scale="probability", clip=DEFAULT_CLIP):
    """Logit ``eta`` of a first-stage prediction given as probabilities or logits.

    Probabilities are clipped to ``[c, 1 - c]`` first (a prediction of exactly 0 or 1
    would have an infinite logit).
    """
    if scale not in PREDICTION_SCALES:
        raise InputError(f"unknown prediction scale {scale!r}; choose one of {PREDICTION_SCALES}.")
    if scale == "logit":
        values = np.asarray(prediction, dtype=np.float64)
        if np.isinf(values).any():
            raise InputError("first-stage logits must be finite (NaN where missing).")
        return values
    return logit(np.clip(check_probability(prediction), clip, 1.0 - clip))


def residual(labels, prediction, kind="working", scale="probability", clip=DEFAULT_CLIP):
    """Logit-scale residual of binary labels against a first-stage prediction.

    Parameters
    ----------
    labels : array_like
        ``y`` in ``[0, 1]`` (0/1 labels, or proportions), NaN where unobserved.
    prediction : array_like
        First-stage probabilities (``scale="probability"``) or logits, same shape.
    kind : {"working", "logit"}
        See the module docstring.
    scale : {"probability", "logit"}
    clip : float
        ``c`` in ``(0, 0.5)``.

    Returns
    -------
    ndarray
        Residual on the logit scale (dimensionless), NaN where either input is.
    """
    if kind not in RESIDUAL_KINDS:
        raise InputError(f"unknown binary residual {kind!r}; choose one of {RESIDUAL_KINDS}.")
    if not 0 < clip < 0.5:
        raise InputError(f"clip must be in (0, 0.5), got {clip!r}.")
    labels = check_probability(labels, "labels (target)")
    eta = first_stage_logit(prediction, scale, clip)
    if np.shape(labels) != np.shape(eta):
        raise InputError(f"labels {np.shape(labels)} and prediction {np.shape(eta)} must have the same shape.")
    if kind == "logit":
        return logit(np.clip(labels, clip, 1.0 - clip)) - eta
    p = sigmoid(eta)
    weight = np.maximum(p * (1.0 - p), clip * (1.0 - clip))
    return (labels - p) / weight


def logistic_normal_mean(mean, variance, method="gauss-hermite"):
    """``E[sigmoid(Z)]`` for ``Z ~ N(mean, variance)``, elementwise.

    Parameters
    ----------
    mean, variance : array_like
        Latent logit mean and variance (variance >= 0).
    method : {"gauss-hermite", "probit"}
        Quadrature with :data:`HERMITE_NODES` nodes, or the probit approximation
        ``sigmoid(m / sqrt(1 + pi v / 8))`` (error below 0.02).
    """
    mean = np.asarray(mean, dtype=np.float64)
    sd = np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64), 0.0))
    if method == "probit":
        return sigmoid(mean / np.sqrt(1.0 + np.pi * sd**2 / 8.0))
    if method != "gauss-hermite":
        raise InputError(f"unknown method {method!r}; choose one of {PROBABILITY_METHODS}.")
    nodes, weights = np.polynomial.hermite_e.hermegauss(HERMITE_NODES)
    weights = weights / weights.sum()
    out = np.zeros(np.broadcast(mean, sd).shape)
    for node, weight in zip(nodes, weights):
        out += weight * sigmoid(mean + sd * node)
    return out


def logistic_normal_interval(mean, variance, multiplier):
    """``[sigmoid(m - q s), sigmoid(m + q s)]``: the probability interval of a latent normal logit."""
    half = multiplier * np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64), 0.0))
    return sigmoid(mean - half), sigmoid(mean + half)
