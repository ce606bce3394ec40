"""Penalty (and rank) selection by K-fold cross-validation over contiguous time blocks.

The times are cut into ``n_folds`` contiguous blocks. For each block, the basis is
fitted on the other times (:func:`xadapter.admm.fit_adapter`, which is one exact
Phi-step for complete data) and scored on the held-out block, centred by the
*training* per-site mean:

``score="projection"`` (the default)
    Held-out reconstruction error ``||D_val_c (I - Phi Phi^T)||^2 / size``: each held-
    out time is projected on the basis (by least squares on its observed sites when
    some are missing) and the error is taken on the same entries. Smoother bases that
    match the truth generalise to new times better than bases fitted to the noise, so
    this chooses ``tau1`` (and ``tau2``). Since the top-``K`` eigenvectors are nested,
    a larger rank never scores worse: do not use it to choose the rank.
``score="interpolation"``
    The sites are split in two halves (a seeded random split); the scores of a
    held-out time are estimated from one half and the field is predicted at the
    other, both ways. Components fitted to noise now hurt the prediction, so this
    score also chooses the rank.

Scores are in residual units squared per entry. Along the grid, each fit is warm-
started from the previous fit of the same rank in the same fold (give ``tau1_grid`` in
increasing order for the best effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .admm import fit_adapter
from ..exceptions import InputError

SCORES = ("projection", "interpolation")
RULES = ("min", "one_se")


@dataclass
class CVResult:
    """Result of :func:`select_penalty_cv`.

    Attributes
    ----------
    grid : list of dict
        Grid points in the order they were fitted, each ``{"rank", "tau1", "tau2"}``.
    scores : ndarray, shape (n_grid, n_folds)
        Held-out error per grid point and fold (residual units squared per entry).
    mean, std : ndarray, shape (n_grid,)
        Mean and standard deviation over the folds.
    best : dict
        Chosen parameters ``{"rank", "tau1", "tau2"}``.
    best_index : int
        Position of ``best`` in ``grid``.
    folds : list of tuple
        ``(start, stop)`` time indices of each held-out block.
    score : str
        The score used.
    rule : str
        The selection rule used.
    basis : ndarray, shape (N, rank), or None
        Basis refitted on all times with ``best`` (None when ``refit=False``).
    """

    grid: list
    scores: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    best: dict
    best_index: int
    folds: list
    score: str
    rule: str
    basis: np.ndarray | None = None

    @property
    def table(self):
        """Dict of equal-length 1-D arrays (``rank``, ``tau1``, ``tau2``, ``mean``, ``std``)."""
        return {
            "rank": np.array([p["rank"] for p in self.grid]),
            "tau1": np.array([p["tau1"] for p in self.grid], dtype=np.float64),
            "tau2": np.array([p["tau2"] for p in self.grid], dtype=np.float64),
            "mean": self.mean.copy(),
            "std": self.std.copy(),
        }


def _grid_values(name, values):
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise InputError(f"{name} must be a non-empty 1-D sequence of numbers.")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError(f"{name} must hold finite values >= 0, got {values.tolist()}.")
    return [float(v) for v in values]


def _ranks(rank, rank_grid, n_sites):
    ranks = [rank] if rank_grid is None else list(np.atleast_1d(rank_grid))
    if not ranks:
        raise InputError("rank_grid must not be empty.")
    for value in ranks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value < n_sites:
            raise InputError(f"ranks must be integers with 1 <= rank < number of sites ({n_sites}), got {value!r}.")
    return [int(v) for v in ranks]


def _folds(n_times, n_folds):
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise InputError(f"n_folds must be an integer >= 2, got {n_folds!r}.")
    blocks = np.array_split(np.arange(n_times), n_folds)
    if min(len(b) for b in blocks) < 1 or n_times - max(len(b) for b in blocks) < 3:
        raise InputError(f"{n_times} time steps are too few for {n_folds} folds (each training set needs "
                         "at least 3 times); lower n_folds.")
    return [(int(b[0]), int(b[-1]) + 1) for b in blocks]


def _held_out_error(basis, centred, fit_mask, eval_mask):
    """Sum of squared errors on ``eval_mask`` when each row's scores come from ``fit_mask``.

    Rows sharing a ``fit_mask`` pattern share one least-squares factorisation. A row
    with no fitting entry is predicted by the training mean (zero here).
    """
    patterns, inverse = np.unique(fit_mask, axis=0, return_inverse=True)
    inverse = np.ravel(inverse)
    total = 0.0
    for index, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse == index)
        block = centred[rows]
        prediction = np.zeros_like(block)
        if pattern.any():
            coef = np.linalg.lstsq(basis[pattern], block[:, pattern].T, rcond=None)[0]
            prediction = (basis @ coef).T
        error = np.where(eval_mask[rows], block - prediction, 0.0)
        total += float(np.sum(error * error))
    return total


def _fold_score(basis, mean, validation, score, halves):
    centred = validation - mean
    observed = np.isfinite(centred)
    centred = np.where(observed, centred, 0.0)
    if score == "projection":
        count = observed.sum()
        return _held_out_error(basis, centred, observed, observed) / max(count, 1)
    total = 0.0
    for half in (halves, ~halves):
        fit_mask = observed & ~half
        eval_mask = observed & half
        total += _held_out_error(basis, centred, fit_mask, eval_mask)
    return total / max(observed.sum(), 1)


def _choose(grid, mean, std, n_folds, rule):
    best = int(np.nanargmin(mean))
    if rule == "min":
        return best
    # one standard error: the simplest model (smallest rank, then strongest penalties)
    # whose mean score is within one standard error of the best.
    limit = mean[best] + std[best] / np.sqrt(n_folds)
    candidates = [i for i in range(len(grid)) if mean[i] <= limit]
    return min(candidates, key=lambda i: (grid[i]["rank"], -grid[i]["tau1"], -grid[i]["tau2"]))


def select_penalty_cv(data, rank, tau1_grid, *, omega, tau2_grid=(0.0,), rank_grid=None, n_folds=5,
                      score="projection", rule="min", refit=True, seed=0, fit_options=None):
    """Choose ``tau1`` (and ``tau2``, ``rank``) by K-fold cross-validation over time blocks.

    Parameters
    ----------
    data : array_like, shape (T, N)
        Residuals (time rows, space columns), NaN where missing (a site needs an
        observation in every training set).
    rank : int
        Rank of the basis (ignored when ``rank_grid`` is given).
    tau1_grid : sequence of float
        Smoothness weights to try (units of :func:`xadapter.basis.solve_basis`).
    omega : ndarray or sparse matrix, shape (N, N), or None
        Smoothness penalty; None only when every ``tau1`` is 0.
    tau2_grid : sequence of float, default (0.0,)
        Sparsity weights to try.
    rank_grid : sequence of int, optional
        Ranks to try (use ``score="interpolation"``: the projection score never
        prefers a smaller rank).
    n_folds : int, default 5
        Number of contiguous time blocks.
    score : {"projection", "interpolation"}
        Held-out score; see the module docstring.
    rule : {"min", "one_se"}
        ``"min"``: the lowest mean score. ``"one_se"``: the simplest grid point
        (smallest rank, then largest ``tau1``, then largest ``tau2``) within one
        standard error (``std / sqrt(n_folds)``) of the lowest.
    refit : bool, default True
        Refit the basis on all times with the chosen parameters.
    seed : int
        Seed of the site split of ``score="interpolation"``.
    fit_options : dict, optional
        Extra keyword arguments of :func:`xadapter.admm.fit_adapter` (e.g.
        ``max_iter`` for data with missing entries).

    Returns
    -------
    CVResult
        Grid, per-fold scores, their mean and standard deviation, the choice, and the
        refitted basis.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise InputError(f"data must be a 2-D (time, space) array, got shape {data.shape}.")
    n_times, n_sites = data.shape
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of {SCORES}.")
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}; choose one of {RULES}.")
    tau1_values = _grid_values("tau1_grid", tau1_grid)
    tau2_values = _grid_values("tau2_grid", tau2_grid)
    ranks = _ranks(rank, rank_grid, n_sites)
    folds = _folds(n_times, n_folds)
    options = dict(fit_options or {})
    for reserved in ("omega", "tau1", "tau2", "init", "covariates"):
        if reserved in options:
            raise InputError(f"fit_options cannot set {reserved!r}; it is set by the search "
                             "(covariates are not supported: fit on the residual minus the trend).")
    grid = [{"rank": r, "tau1": t1, "tau2": t2} for r in ranks for t2 in tau2_values for t1 in tau1_values]
    halves = np.zeros(n_sites, dtype=bool)
    halves[np.random.default_rng(seed).permutation(n_sites)[: n_sites // 2]] = True

    scores = np.empty((len(grid), len(folds)))
    for fold, (start, stop) in enumerate(folds):
        train = np.concatenate([data[:start], data[stop:]])
        validation = data[start:stop]
        previous = {}
        for index, params in enumerate(grid):
            fit = fit_adapter(train, params["rank"], omega=omega, tau1=params["tau1"], tau2=params["tau2"],
                              init=previous.get(params["rank"]), **options)
            previous[params["rank"]] = fit.basis
            scores[index, fold] = _fold_score(fit.basis, fit.mean, validation, score, halves)

    mean = scores.mean(axis=1)
    std = scores.std(axis=1, ddof=1)
    best_index = _choose(grid, mean, std, len(folds), rule)
    best = dict(grid[best_index])
    basis = None
    if refit:
        basis = fit_adapter(data, best["rank"], omega=omega, tau1=best["tau1"], tau2=best["tau2"], **options).basis
    return CVResult(grid=grid, scores=scores, mean=mean, std=std, best=best, best_index=best_index,
                    folds=folds, score=score, rule=rule, basis=basis)
