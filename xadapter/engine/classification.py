"""Scores of probabilistic binary predictions: accuracy, AUC, Brier score, ECE.

Every function takes labels ``y`` (0 or 1) and predicted probabilities of the same
shape and ignores entries where either is NaN. Numbers only (numpy).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..exceptions import InputError

#: Equal-width probability bins of the expected calibration error.
ECE_BINS = 10


def _pairs(labels, probability):
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probability = np.asarray(probability, dtype=np.float64).ravel()
    if labels.shape != probability.shape:
        raise InputError(f"labels ({labels.size}) and probabilities ({probability.size}) differ in size.")
    valid = ~(np.isnan(labels) | np.isnan(probability))
    labels, probability = labels[valid], probability[valid]
    if labels.size == 0:
        raise InputError("no entry where both the label and the probability are given.")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise InputError("labels must be 0 or 1 (NaN where missing).")
    if probability.min() < 0 or probability.max() > 1:
        raise InputError("probabilities must be in [0, 1].")
    return labels, probability


def accuracy(labels, probability, threshold=0.5):
    """Fraction of labels equal to ``probability > threshold``."""
    labels, probability = _pairs(labels, probability)
    return float(np.mean((probability > threshold) == (labels == 1)))


def brier(labels, probability):
    """Brier score ``mean((p - y)^2)`` (lower is better)."""
    labels, probability = _pairs(labels, probability)
    return float(np.mean((probability - labels) ** 2))


def auc(labels, probability):
    """Area under the ROC curve (Mann-Whitney statistic; ties count one half)."""
    labels, probability = _pairs(labels, probability)
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError("AUC needs both classes among the labels.")
    ranks = rankdata(probability)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(labels, probability, bins=ECE_BINS):
    """Expected calibration error over equal-width bins of ``[0, 1]``.

    ``sum_b (n_b / n) |mean(y in b) - mean(p in b)|`` (lower is better).
    """
    labels, probability = _pairs(labels, probability)
    index = np.minimum((probability * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, labels, bins) - np.bincount(index, probability, bins))
    return float(gap.sum() / count.sum())
