"""The fitted adapter as arrays: one frozen object that kriging and cross-validation share.

:class:`FittedModel` is what :func:`xadapter.engine.pipeline.fit` returns and what
:func:`xadapter.engine.pipeline.krige` and the cross-validation over sites take. The
labelled model's state Dataset (what ``to_netcdf`` writes) is only a serialisation of
it with labels added.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .sites import Sites


@dataclass(frozen=True)
class Calibration:
    """Cross-validation over sites of a fitted model (see :mod:`xadapter.engine.validation`).

    Attributes
    ----------
    squared_error, model_variance : ndarray (N,)
        Sums over times of the squared held-out kriging error and of the model's
        predictive variance at each fitted site (units squared).
    count : ndarray (N,)
        Times summed per site.
    distance_km : ndarray (N,)
        Distance of each site to the nearest site kept in its fold.
    by_distance : dict of ndarray
        Coverage of the held-out intervals by distance bin
        (:func:`xadapter.engine.validation.coverage_by_distance`).
    crps, rmse, coverage : float
        Pooled held-out scores.
    """

    squared_error: np.ndarray
    model_variance: np.ndarray
    count: np.ndarray
    distance_km: np.ndarray
    by_distance: dict
    crps: float
    rmse: float
    coverage: float


@dataclass(frozen=True)
class FittedModel:
    """A fitted spatial adapter on ``N`` sites, ``T`` training times, nominal rank ``K``.

    Attributes
    ----------
    basis : ndarray (N, K)
        Orthonormal spatial basis ``Phi``.
    scores : ndarray (T, K)
        ``Phi^T (z_t - mean)`` per training time.
    mean : ndarray (N,)
        Per-site time mean of the training residuals minus trend.
    rotation : ndarray (K, K)
        ``V``: ``B = Phi V`` are the covariance eigenvectors.
    eigenvalues : ndarray (K,)
        Thresholded covariance eigenvalues ``lambda`` (zero beyond the kept rank), units
        squared.
    sample_eigenvalues : ndarray (K,)
        Eigenvalues of ``Phi^T S Phi``.
    low_rank_noise_variance : float
        Noise variance of the spectral rule (everything beyond the effective rank).
    fine : FineScaleParams or None
        Short-range covariance of the remainder (its nugget is the white noise).
    sites : Sites
        Coordinates of the fitted sites.
    trend_coefficients : ndarray (p,) or None
    n_eff : float or None
        Effective sample size of the noise-calibrated rule.
    history : dict of ndarray
        Per-iteration record of the ADMM.
    converged, n_iter, skipped_loop
        ADMM outcome.
    calibration : Calibration or None
        Cross-validation over sites of this model (scales new-site variances).
    selection : ndarray (candidates, 5) or None
        ``tau1, rank, crps, rmse, coverage`` of the rank/smoothness search.
    fine_neighbors : int
        Observed neighbours of the local fine-scale kriging.
    extension : dict
        Options of :func:`xadapter.engine.extend.extend_basis`.
    var : VarModel or None
        Vector autoregression of the kept component scores
        (:mod:`xadapter.engine.forecast`); None when not fitted.
    stream : RunningStatistics or None
        Running statistics of every time fitted so far, kept for streaming updates
        (:mod:`xadapter.engine.streaming`); None when the fit does not keep them.
    """

    basis: np.ndarray
    scores: np.ndarray
    mean: np.ndarray
    rotation: np.ndarray
    eigenvalues: np.ndarray
    sample_eigenvalues: np.ndarray
    low_rank_noise_variance: float
    fine: object
    sites: Sites
    trend_coefficients: np.ndarray | None = None
    n_eff: float | None = None
    history: dict = field(default_factory=dict)
    converged: bool = True
    n_iter: int = 0
    skipped_loop: bool = True
    calibration: Calibration | None = None
    selection: np.ndarray | None = None
    fine_neighbors: int = 30
    extension: dict = field(default_factory=dict)
    var: object = None
    stream: object = None

    def __post_init__(self):
        # projected once: the site CV and every kriging call at new sites use it
        object.__setattr__(self, "_planar", self.sites.planar_km(self.sites.centre()))

    @property
    def n_sites(self):
        return self.basis.shape[0]

    @property
    def rank(self):
        """Nominal rank ``K``."""
        return self.basis.shape[1]

    @property
    def effective_rank(self):
        return int(np.count_nonzero(self.eigenvalues > 0))

    @property
    def noise_variance(self):
        """White-noise variance: the fine-scale nugget, else the spectral rule's noise."""
        return float(self.fine.nugget) if self.fine is not None else float(self.low_rank_noise_variance)

    @property
    def loadings(self):
        """``B = Phi V`` (N, K)."""
        return self.basis @ self.rotation

    @property
    def planar(self):
        """Planar km coordinates of the fitted sites (local projection about their centre)."""
        return self._planar

    @property
    def graph_coords(self):
        """Neighbour-search coordinates of the fitted sites (``[lat, lon]`` or km)."""
        return self.sites.graph_coords()[0]

    @property
    def geographic(self):
        return self.sites.geographic

    def target_planar(self, targets):
        """Planar km coordinates of ``targets`` in the projection of the fitted sites."""
        return targets.planar_km(self.sites.centre())

    @property
    def kept_loadings(self):
        """Loadings of the kept components (positive eigenvalues), (N, L)."""
        return self.loadings[:, self.eigenvalues > 0]

    @property
    def remainder_variance(self):
        """Variance of what the kept low rank leaves at a site: fine-scale sill, else the white noise."""
        return float(self.fine.sill) if self.fine is not None else float(self.low_rank_noise_variance)

    def replace(self, **changes):
        """A copy with some fields changed (e.g. other eigenvalues for a rank candidate)."""
        return dataclasses.replace(self, **changes)
