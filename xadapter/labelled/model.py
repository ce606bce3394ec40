"""The :class:`SpatialAdapter` model: labelled data in, labelled results out.

The model stacks any residual DataArray to a ``(time, site)`` array, runs the
numerical core (:mod:`~xadapter.admm`, :mod:`~xadapter.covariance`,
:mod:`~xadapter.kriging`, :mod:`~xadapter.extend`, :mod:`~xadapter.finescale`) and turns
the arrays back into DataArrays/Datasets with the input's dims, coordinates and CF
attributes. Its whole fitted state is one :class:`xarray.Dataset` (``adapter.state``),
which is what :meth:`SpatialAdapter.to_netcdf` writes and :func:`load` reads.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import sys
import warnings

import numpy as np
import pandas as pd
import xarray as xr

from .._version import __version__
from ..engine.admm import fit_adapter
from ..engine.covariance import low_rank_plus_noise
from ..exceptions import InputError, NotFittedError, ProblemTooLargeError
from ..engine.extend import extend_basis
from ..engine.validation import (
    SiteModel,
    coverage_by_distance,
    cross_validate_sites,
    evenly_spaced_times,
    extend_to_held_out,
    site_folds,
    variance_ratio_at,
)
from ..engine.finescale import FineScaleParams, fit_fine_scale, krige_with_fine_scale
from ..io.netcdf import atomic_to_netcdf
from ..engine.kriging import KrigingResult, conformal_multiplier
from ..engine.kriging import krige as _krige_arrays
from ..engine.sites import Sites
from .labels import (
    LATITUDE_RULES,
    LONGITUDE_RULES,
    find_coordinate,
    find_time_dim,
    site_coordinates,
    space_dims_of,
    stack_space,
    target_sites,
)
from ..engine.penalty import PENALTY_KINDS, build_penalty
from ..engine.trend import evaluate_trend

FINE_SCALE_KINDS = (None, "exponential", "matern32")

#: Largest number of sites for which :meth:`SpatialAdapter.covariance` returns the
#: dense N x N matrix.
DENSE_COVARIANCE_MAX_SITES = 5000

#: Dask-backed inputs larger than this are refused rather than loaded whole.
MAX_LOAD_BYTES = 2 * 1024**3

_PARAMETER_NAMES = (
    "rank", "tau1", "tau2", "gamma", "penalty", "neighbors", "penalty_order", "fine_scale",
    "ridge", "rho", "batch_size", "phi_every", "phi_freeze", "momentum", "min_iter", "max_iter",
    "tol", "extension", "extension_neighbors", "extension_smoothing", "seed", "time_dim",
    "space_dims", "progress", "fine_neighbors", "site_folds", "cv_max_times", "cv_time_blocks",
)

#: Rounds of refilling the gaps before the spectral rule (see ``SpatialAdapter._covariance``).
GAP_REFILL_ROUNDS = 8

#: The fine scale is refitted on lags up to this many first-pass ranges.
FINE_FIT_RANGES = 5.0

#: Largest nominal rank tried by ``rank="auto"``.
AUTO_MAX_RANK = 20

#: Multipliers of the largest eigenvalue of ``Dc^T Dc`` tried by ``tau1="cv"`` (plus 0).
#: The penalty is normalised to a largest eigenvalue of 1 while smooth patterns have
#: roughness far below 1, so the penalty starts to matter only near and above the
#: data's leading eigenvalue.
TAU1_CV_FACTORS = (0.01, 0.1, 1.0, 10.0, 100.0)


class SpatialAdapter:
    """Spatial adapter on the residuals of a frozen first-stage predictor.

    Fits a smooth, optionally sparse, orthonormal spatial basis with per-time scores
    and an optional residual trend (three-block ADMM), the low-rank-plus-noise
    covariance they induce (effective rank by spectral thresholding), and kriges the
    residual at unobserved sites with predictive variances and intervals.

    Parameters
    ----------
    rank : int or "auto", default 10
        Nominal number of basis functions ``K``; an upper bound on the effective rank.
        ``"auto"``: ``K = min(20, N - 1, T - 2)`` and the effective rank chosen by
        cross-validation over sites on the kriging CRPS (never above the spectral
        threshold's rank).
    tau1 : float or "cv", default 0.0
        Smoothness weight (``tau1 * tr(Phi^T Omega Phi)``; the penalty is normalised
        to unit largest eigenvalue, so ``tau1`` is in units of the eigenvalues of
        ``Dc^T Dc``, residual units squared times time steps). ``"cv"``: chosen by
        cross-validation over sites on the kriging CRPS among 0 and
        :data:`TAU1_CV_FACTORS` times the largest eigenvalue of ``Dc^T Dc``.
    tau2 : float, default 0.0
        Sparsity weight (L1 norm of the basis).
    gamma : float or None, default None
        Spectral threshold. None: noise-calibrated (Marchenko-Pastur/Tracy-Widom edge
        with an effective sample size); a number: the paper's/SpatPCA's rule.
    penalty : {"auto", "graph", "tps"}, default "auto"
        Smoothness penalty: thin-plate bending energy (small N) or the kNN graph
        Laplacian (any N). ``"auto"``: thin-plate up to 1000 sites.
    neighbors : int, default 8
        Neighbours per site of the graph penalty.
    penalty_order : {1, 2}, default 2
        Graph penalty ``L`` or ``L @ L``.
    fine_scale : {"exponential", "matern32", None}, default "exponential"
        Short-range covariance of the remainder beyond the low rank (DESIGN
        "Fine-scale variation"); None keeps the paper's pure low-rank-plus-white-noise
        model.
    fine_neighbors : int, default 30
        Observed neighbours per target in the local kriging of the fine-scale part.
    site_folds : int or None, default 5
        Folds of the cross-validation over sites that calibrates the predictive
        variance at new sites (and scores ``rank="auto"``/``tau1="cv"``); None or 0
        switches it off (new-site variances are then the model's alone).
    cv_max_times : int, default 200
        Time steps (evenly spaced) used by the cross-validation over sites.
    cv_time_blocks : int, default 3
        Contiguous time blocks of the ``rank="auto"`` / ``tau1="cv"`` search: each
        block is scored at held-out sites after fitting on the other blocks (1: score
        on the fitted times).
    ridge : float
        Ridge weight of the residual trend.
    rho, batch_size, phi_every, phi_freeze, momentum, min_iter, max_iter, tol
        ADMM settings (see :func:`xadapter.admm.fit_adapter`).
    extension : {"auto", "global", "local"}
        Thin-plate extension of the basis to new sites.
    extension_neighbors : int
        Neighbours of the local extension.
    extension_smoothing : float, default 0.3
        Smoothing of the thin-plate extension (dimensionless, coordinates in units
        of the typical site spacing, see :mod:`xadapter.extend`). Estimated
        eigenvectors are rough at the scale of the site spacing; exact interpolation
        (0) carries that roughness to new sites.
    seed : int
        Seed of every random choice (mini-batch order, subsamples).
    time_dim : str, optional
        Name of the time dim (default: found by name or datetime dtype).
    space_dims : str or tuple of str, optional
        Space dims (default: every dim but time).
    progress : bool
        Report progress of long fits (ADMM iterations, cross-validation) on stderr;
        silent by default.
    """

    def __init__(
        self,
        rank=10,
        tau1=0.0,
        tau2=0.0,
        gamma=None,
        penalty="auto",
        neighbors=8,
        penalty_order=2,
        fine_scale="exponential",
        ridge=1e-6,
        rho=1.0,
        batch_size=None,
        phi_every=1,
        phi_freeze=None,
        momentum=0.0,
        min_iter=5,
        max_iter=200,
        tol=1e-4,
        extension="auto",
        extension_neighbors=50,
        extension_smoothing=0.3,
        seed=0,
        time_dim=None,
        space_dims=None,
        progress=False,
        fine_neighbors=30,
        site_folds=5,
        cv_max_times=200,
        cv_time_blocks=3,
    ):
        self.rank = rank
        self.tau1 = tau1
        self.tau2 = tau2
        self.gamma = gamma
        self.penalty = penalty
        self.neighbors = neighbors
        self.penalty_order = penalty_order
        self.fine_scale = fine_scale
        self.ridge = ridge
        self.rho = rho
        self.batch_size = batch_size
        self.phi_every = phi_every
        self.phi_freeze = phi_freeze
        self.momentum = momentum
        self.min_iter = min_iter
        self.max_iter = max_iter
        self.tol = tol
        self.extension = extension
        self.extension_neighbors = extension_neighbors
        self.extension_smoothing = extension_smoothing
        self.seed = seed
        self.time_dim = time_dim
        self.space_dims = space_dims
        self.progress = progress
        self.fine_neighbors = fine_neighbors
        self.site_folds = site_folds
        self.cv_max_times = cv_max_times
        self.cv_time_blocks = cv_time_blocks
        self._state = None

    # ------------------------------------------------------------------ parameters
    def get_params(self):
        """Hyperparameters as a dict (scikit-learn convention)."""
        return {name: getattr(self, name) for name in _PARAMETER_NAMES}

    def _validate_params(self):
        if not (self.rank == "auto" or (isinstance(self.rank, (int, np.integer)) and self.rank >= 1)):
            raise InputError(f"rank must be a positive integer or 'auto', got {self.rank!r}.")
        if self.tau1 == "cv" and not self.site_folds:
            raise InputError("tau1='cv' needs the cross-validation over sites: set site_folds >= 2.")
        if self.rank == "auto" and not self.site_folds:
            raise InputError("rank='auto' needs the cross-validation over sites: set site_folds >= 2.")
        for name in ("tau1", "tau2"):
            value = getattr(self, name)
            if name == "tau1" and value == "cv":
                continue
            if not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.gamma is not None and not (np.isfinite(self.gamma) and self.gamma >= 0):
            raise InputError(f"gamma must be None or a number >= 0, got {self.gamma!r}.")
        if self.penalty not in PENALTY_KINDS:
            raise InputError(f"unknown penalty {self.penalty!r}; choose one of {PENALTY_KINDS}.")
        if self.fine_scale not in FINE_SCALE_KINDS:
            raise InputError(f"unknown fine_scale {self.fine_scale!r}; choose one of {FINE_SCALE_KINDS}.")

    # ------------------------------------------------------------------ fitting
    def fit(self, residuals, covariates=None):
        """Fit the adapter on a residual field.

        Parameters
        ----------
        residuals : xarray.DataArray
            ``(time, space dims...)`` residuals of the first stage, NaN where missing.
            Station data: one space dim with ``lat``/``lon`` (or ``x``/``y``)
            coordinates; gridded data: ``lat``/``lon`` dims in any order.
        covariates : xarray.DataArray, optional
            Covariates of the residual trend with a ``feature`` dim and any of the
            time and space dims (missing dims broadcast).

        Returns
        -------
        self
        """
        self._validate_params()
        residuals = _as_dataarray(residuals, "residuals")
        time_dim = find_time_dim(residuals, self.time_dim)
        space_dims = space_dims_of(residuals, time_dim, self.space_dims)
        stacked, site_dim = stack_space(residuals, space_dims)
        stacked = stacked.transpose(time_dim, site_dim)
        sites = site_coordinates(stacked, site_dim, space_dims)
        data = _to_numpy(stacked, "residuals")
        n_times, n_sites = data.shape
        rank = min(AUTO_MAX_RANK, n_sites - 1, n_times - 2) if self.rank == "auto" else self.rank
        _check_data(data, stacked, site_dim, time_dim, rank)
        feature_values, covariate_array = _covariate_array(covariates, stacked, time_dim, site_dim, space_dims)

        omega = self._penalty(sites)
        selection = None
        if self.tau1 == "cv" or self.rank == "auto":
            fit, covariance, fine, selection = self._search(data, sites, covariate_array, rank, omega)
        else:
            fit = self._fit_core(data, rank, omega, covariate_array, float(self.tau1))
            covariance = self._covariance(data, fit)
            fine = self._fit_fine_scale(data, fit, covariance, sites)
        calibration = self._calibrate(data, fit, covariance, fine, sites)
        self._state = self._build_state(stacked, site_dim, space_dims, time_dim, sites, fit, covariance,
                                        feature_values, fine, selection, calibration)
        return self

    def _fit_core(self, data, rank, omega, covariates, tau1, init=None):
        return fit_adapter(
            data,
            rank,
            omega=omega,
            tau1=tau1,
            tau2=float(self.tau2),
            covariates=covariates,
            ridge=self.ridge,
            rho=self.rho,
            batch_size=self.batch_size,
            phi_every=self.phi_every,
            phi_freeze=self.phi_freeze,
            momentum=self.momentum,
            min_iter=self.min_iter,
            max_iter=self.max_iter,
            tol_rel=self.tol,
            seed=self.seed,
            init=init,
            progress=self.progress,
        )

    # ------------------------------------------------------------------ site CV
    def _report(self, message):
        if self.progress:
            print(f"xadapter: {message}", file=sys.stderr, flush=True)

    def _site_model(self, fit, covariance, fine, sites, eigenvalues=None):
        coords, geographic = sites.graph_coords()
        return SiteModel(
            basis=fit.basis, rotation=covariance.rotation,
            eigenvalues=covariance.eigenvalues if eigenvalues is None else eigenvalues,
            mean=fit.mean, noise_variance=covariance.noise_variance,
            planar=sites.planar_km(sites.centre()), graph_coords=coords, geographic=geographic,
            fine=fine, fine_neighbors=self.fine_neighbors,
            extension={"method": self.extension, "neighbors": self.extension_neighbors,
                       "smoothing": self.extension_smoothing},
        )

    def _site_folds(self, n_sites):
        return site_folds(n_sites, min(int(self.site_folds), n_sites), seed=self.seed)

    def _search(self, data, sites, covariates, rank, omega):
        """Choose tau1 and/or the effective rank on held-out sites x held-out times (CRPS).

        Times are split into :attr:`cv_time_blocks` contiguous blocks; for each block
        the adapter is fitted on the other times and every candidate kriges the
        block's times at held-out sites (cross-validation over sites, with the basis
        and mean re-extended), from the other sites' observations. The chosen setting
        is refitted on all times.
        """
        n_times, n_sites = data.shape
        base = self._fit_core(data, rank, omega, covariates, 0.0)
        if self.tau1 == "cv":
            centred = base.filled - base.mean
            gram_eigs = np.linalg.svd(centred, compute_uv=False) ** 2
            tau1_grid = [0.0] + [float(f * gram_eigs[0]) for f in TAU1_CV_FACTORS]
        else:
            tau1_grid = [float(self.tau1)]
        ranks = range(0, rank + 1) if self.rank == "auto" else [None]
        blocks = _time_blocks(data, int(self.cv_time_blocks or 1))
        folds = self._site_folds(n_sites)
        everything = np.arange(n_sites)
        totals = {}
        for tau1 in tau1_grid:
            for number, block in enumerate(blocks):
                if block is None:
                    train_data, train_covariates = data, covariates
                else:
                    train = np.setdiff1d(np.arange(n_times), block)
                    train_data, train_covariates = data[train], _rows(covariates, train, n_times, n_sites)
                fit = self._fit_core(train_data, rank, omega, train_covariates, tau1, init=base.basis)
                covariance = self._covariance(train_data, fit)
                if block is None:
                    target = _observed(data, fit)
                else:
                    target = data[block] - _trend(covariates, fit.trend_coef, block, n_times, n_sites)
                times = evenly_spaced_times(target.shape[0], self.cv_max_times)
                reference = self._site_model(fit, covariance, None, sites)
                extensions = [extend_to_held_out(reference, np.setdiff1d(everything, held), held) for held in folds]
                for candidate in ranks:
                    keep = covariance.effective_rank if candidate is None else min(candidate, covariance.effective_rank)
                    self._report(f"cross-validation: tau1={tau1:.4g}, rank {keep}, time block "
                                 f"{number + 1}/{len(blocks)}")
                    eigenvalues = np.where(np.arange(rank) < keep, covariance.eigenvalues, 0.0)
                    fine = self._fit_fine_scale(train_data, fit, covariance, sites, eigenvalues)
                    model = self._site_model(fit, covariance, fine, sites, eigenvalues)
                    cv = cross_validate_sites(model, target, folds, times=times, extensions=extensions)
                    count = float(cv.count.sum())
                    total = totals.setdefault((tau1, candidate), np.zeros(5))
                    total += (count * keep, count * cv.crps, count * cv.rmse**2, count * cv.coverage, count)
        # rank column: the candidate, or the mean effective rank over the blocks
        records = np.array([(tau1, t[0] / t[4] if candidate is None else candidate, t[1] / t[4],
                             np.sqrt(t[2] / t[4]), t[3] / t[4]) for (tau1, candidate), t in totals.items()])
        best_tau1, best_rank = records[np.argmin(records[:, 2]), :2]
        fit = base if best_tau1 == 0.0 else self._fit_core(data, rank, omega, covariates, best_tau1, init=base.basis)
        covariance = self._covariance(data, fit)
        if self.rank == "auto":
            keep = min(int(best_rank), covariance.effective_rank)
            covariance = _with_eigenvalues(covariance, np.where(np.arange(rank) < keep, covariance.eigenvalues, 0.0))
        fine = self._fit_fine_scale(data, fit, covariance, sites)
        return fit, covariance, fine, records

    def _calibrate(self, data, fit, covariance, fine, sites):
        """Site cross-validation of the final model: variance ratios and coverage by distance."""
        if not self.site_folds or data.shape[1] < 2 * int(self.site_folds):
            return None
        folds = self._site_folds(data.shape[1])
        times = evenly_spaced_times(data.shape[0], self.cv_max_times)
        model = self._site_model(fit, covariance, fine, sites)
        self._report(f"site cross-validation of the fitted model ({len(folds)} folds)")
        cv = cross_validate_sites(model, _observed(data, fit), folds, times=times)
        ratios = variance_ratio_at(model.planar, model.planar, cv.squared_error, cv.model_variance, cv.count)
        return cv, coverage_by_distance(cv, ratios)

    def _covariance(self, data, fit):
        """Low-rank-plus-noise covariance of the fit, honest about the gaps.

        Gaps are filled from the rank-K reconstruction, which carries no noise and
        reinforces the K fitted directions: the spectral rule then reads noise
        components as signal (measured: true rank 3 read as 10 with 10 % of entries
        missing). With gaps, the gaps are refilled with a draw from the kriging
        predictive distribution of the current covariance (shrunken scores plus noise,
        seeded) and the covariance re-estimated, until the effective rank settles.
        """
        covariance = low_rank_plus_noise(fit.basis, fit.filled, gamma=self.gamma)
        missing = np.isnan(data)
        if not missing.any():
            return covariance
        rng = np.random.default_rng(self.seed)
        draws = rng.standard_normal(data.shape)
        for _ in range(GAP_REFILL_ROUNDS):
            if covariance.effective_rank == 0:
                break
            result = _krige_arrays(np.where(missing, np.nan, fit.filled), covariance.loadings(fit.basis),
                                   covariance.eigenvalues, covariance.noise_variance, mean=fit.mean)
            refilled = np.where(missing, result.mean + np.sqrt(result.variance) * draws, fit.filled)
            updated = low_rank_plus_noise(fit.basis, refilled, gamma=self.gamma)
            settled = updated.effective_rank == covariance.effective_rank
            covariance = updated
            if settled:
                break
        return covariance

    def _fit_fine_scale(self, data, fit, covariance, sites, eigenvalues=None):
        """Fit the fine-scale covariance on the remainders beyond the kept low rank."""
        if self.fine_scale is None:
            return None
        eigenvalues = covariance.eigenvalues if eigenvalues is None else eigenvalues
        loadings = covariance.loadings(fit.basis)[:, np.asarray(eigenvalues) > 0]
        centred = fit.filled - fit.mean
        remainders = centred - (centred @ loadings) @ loadings.T
        remainders[np.isnan(data)] = np.nan
        coords, geographic = sites.graph_coords()
        first = fit_fine_scale(remainders, coords, self.fine_scale, geographic=geographic, seed=self.seed)
        if first.partial_sill <= 0.05 * first.sill:
            return first  # spatially white remainders: the range is not identified
        # the kept low rank takes the long-wave part of the fine-scale field and lowers the
        # remainders' plateau; fitting lags up to a few ranges keeps that out of ell and tau^2
        try:
            return fit_fine_scale(remainders, coords, self.fine_scale, geographic=geographic,
                                  seed=self.seed, max_distance=FINE_FIT_RANGES * first.range_km)
        except InputError:
            return first

    def _penalty(self, sites):
        if self.tau1 != "cv" and float(self.tau1) == 0.0:
            return None
        kind = self.penalty
        if kind == "auto":
            kind = "tps" if sites.size <= 1000 else "graph"
        if kind == "tps":
            return build_penalty(sites.planar_km(), "tps")
        coords, geographic = sites.graph_coords()
        return build_penalty(coords, "graph", k=self.neighbors, order=self.penalty_order, geographic=geographic)

    def _build_state(self, stacked, site_dim, space_dims, time_dim, sites, fit, covariance, feature_values, fine,
                     selection=None, calibration=None):
        rank = fit.basis.shape[1]
        site_coords = _site_coords(stacked, site_dim)
        units = stacked.attrs.get("units", "")
        squared = _squared_units(units)
        history = {key: np.asarray(value) for key, value in fit.history.items() if np.ndim(value) == 1}
        n_hist = len(next(iter(history.values()))) if history else 0
        data_vars = {
            "basis": ((site_dim, "mode"), fit.basis, {"long_name": "orthonormal spatial basis", "units": "1"}),
            "scores": ((time_dim, "mode"), fit.scores, {"long_name": "basis scores", "units": units}),
            "mean": ((site_dim,), fit.mean, {"long_name": "per-site time mean of training residuals",
                                              "units": units}),
            "eigenvalues": (("mode",), covariance.eigenvalues,
                            {"long_name": "thresholded eigenvalues of the low-rank covariance", "units": squared}),
            "sample_eigenvalues": (("mode",), covariance.sample_eigenvalues,
                                   {"long_name": "eigenvalues of Phi^T S Phi", "units": squared}),
            "rotation": (("mode", "component"), covariance.rotation,
                         {"long_name": "rotation V of the basis to covariance eigenvectors", "units": "1"}),
            "noise_variance": ((), float(covariance.noise_variance if fine is None else fine.nugget),
                               {"long_name": "white-noise variance", "units": squared}),
            "low_rank_noise_variance": ((), float(covariance.noise_variance),
                                        {"long_name": "noise variance of the low-rank spectral rule "
                                                      "(everything beyond the effective rank)", "units": squared}),
            "effective_rank": ((), int(covariance.effective_rank),
                               {"long_name": "number of positive eigenvalues", "units": "1"}),
        }
        if fine is not None:
            data_vars["fine_partial_sill"] = ((), float(fine.partial_sill),
                                              {"long_name": "partial sill eta^2 of the fine-scale covariance",
                                               "units": squared})
            data_vars["fine_range"] = ((), float(fine.range_km),
                                       {"long_name": "range ell of the fine-scale covariance", "units": "km"})
        if fit.trend_coef is not None:
            data_vars["trend_coefficients"] = (("feature",), np.asarray(fit.trend_coef),
                                               {"long_name": "residual trend coefficients"})
        for key, values in history.items():
            data_vars[f"history_{key}"] = (("iteration",), values.astype(np.float64))
        if selection is not None:
            for column, (name, long_name, var_units) in enumerate((
                    ("tau1", "smoothness weight tried", ""), ("rank", "effective rank tried", "1"),
                    ("crps", "site cross-validated CRPS", units), ("rmse", "site cross-validated RMSE", units),
                    ("coverage", "site cross-validated coverage of 90 % intervals", "1"))):
                data_vars[f"selection_{name}"] = (("candidate",), selection[:, column],
                                                  {"long_name": long_name, "units": var_units})
        if calibration is not None:
            cv, by_distance = calibration
            data_vars["cv_squared_error"] = ((site_dim,), cv.squared_error, {
                "long_name": "sum over times of squared site-cross-validated kriging error", "units": squared})
            data_vars["cv_model_variance"] = ((site_dim,), cv.model_variance, {
                "long_name": "sum over the same times of the model predictive variance", "units": squared})
            data_vars["cv_count"] = ((site_dim,), cv.count.astype(np.int64), {"long_name": "times summed"})
            data_vars["cv_distance"] = ((site_dim,), cv.distance_km, {
                "long_name": "distance to the nearest site kept in the cross-validation fold", "units": "km"})
            for key in ("coverage_model", "coverage_calibrated", "count"):
                data_vars[f"calibration_{key}"] = (("distance_bin",), by_distance[key])
            data_vars["calibration_distance"] = (("distance_bin",), by_distance["distance_km"], {
                "long_name": "upper edge of the distance bin", "units": "km"})
        coords = dict(site_coords)
        coords[time_dim] = stacked[time_dim].values
        coords["mode"] = np.arange(rank)
        coords["component"] = np.arange(rank)
        if feature_values is not None:
            coords["feature"] = feature_values
        if n_hist:
            coords["iteration"] = np.arange(n_hist)
        attrs = {
            "xadapter_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parameters": json.dumps(_jsonable(self.get_params())),
            "time_dim": str(time_dim),
            "site_dim": str(site_dim),
            "space_dims": json.dumps([str(d) for d in _stack_order(stacked, site_dim, space_dims)]),
            "geographic": int(sites.geographic),
            "units": units,
            "n_times": int(fit.scores.shape[0]),
            "n_sites": int(fit.basis.shape[0]),
            "converged": int(fit.converged),
            "n_iter": int(fit.n_iter),
            "skipped_loop": int(fit.skipped_loop),
            "n_eff": np.nan if covariance.n_eff is None else float(covariance.n_eff),
            "fine_scale": "none" if fine is None else fine.kind,
        }
        centre = sites.centre()
        if centre is not None:
            attrs["projection_centre"] = json.dumps(list(centre))
        if calibration is not None:
            attrs["cv_crps"] = float(calibration[0].crps)
            attrs["cv_rmse"] = float(calibration[0].rmse)
            attrs["cv_coverage"] = float(calibration[0].coverage)
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    # ------------------------------------------------------------------ fitted state
    @property
    def state(self):
        """The fitted state as one Dataset (what is saved to NetCDF)."""
        if self._state is None:
            raise NotFittedError("this SpatialAdapter is not fitted yet; call fit(residuals) first.")
        return self._state

    @property
    def is_fitted(self):
        return self._state is not None

    @property
    def _site_dim(self):
        return self.state.attrs["site_dim"]

    @property
    def _time_dim(self):
        return self.state.attrs["time_dim"]

    @property
    def _space_dims(self):
        return tuple(json.loads(self.state.attrs["space_dims"]))

    def _unstack(self, obj):
        """Unstack a stacked site dim back to the fitted space dims."""
        site_dim = self._site_dim
        space_dims = self._space_dims
        if len(space_dims) == 1 or site_dim not in obj.dims:
            return obj
        order = []
        for dim in obj.dims:
            order.extend(space_dims if dim == site_dim else [dim])
        return obj.set_index({site_dim: list(space_dims)}).unstack(site_dim).transpose(*order)

    @property
    def basis(self):
        """Spatial basis ``Phi``, DataArray (space dims..., mode), orthonormal columns."""
        return self._unstack(self.state["basis"])

    @property
    def scores(self):
        """Per-time scores ``a_t = Phi^T (z_t - mean)``, DataArray (time, mode)."""
        return self.state["scores"]

    @property
    def mean(self):
        """Per-site time mean of the training residuals (minus trend), DataArray (space dims...)."""
        return self._unstack(self.state["mean"])

    @property
    def eigenvalues(self):
        """Thresholded covariance eigenvalues ``lambda``, DataArray (mode), units squared."""
        return self.state["eigenvalues"]

    @property
    def noise_variance(self):
        """White-noise variance ``sigma^2`` (units squared), float."""
        return float(self.state["noise_variance"])

    @property
    def effective_rank(self):
        """Number of positive eigenvalues (<= rank)."""
        return int(self.state["effective_rank"])

    @property
    def selection(self):
        """Results of the ``rank="auto"`` / ``tau1="cv"`` search, Dataset over ``candidate``, or None."""
        names = [n for n in self.state.data_vars if n.startswith("selection_")]
        if not names:
            return None
        return self.state[names].rename({n: n[len("selection_"):] for n in names})

    @property
    def calibration(self):
        """Coverage of 90 % intervals at held-out sites by distance, Dataset over ``distance_bin``.

        ``coverage_model`` uses the model variance alone; ``coverage_calibrated`` the
        variance scaled by the cross-validated ratios applied at new sites (in-sample
        for those ratios). None when the site cross-validation was switched off.
        """
        names = [n for n in self.state.data_vars if n.startswith("calibration_")]
        if not names:
            return None
        ds = self.state[names].rename({n: n[len("calibration_"):] for n in names})
        return ds.set_coords("distance")

    @property
    def fine_scale_params(self):
        """Fitted fine-scale covariance (:class:`~xadapter.finescale.FineScaleParams`) or None."""
        state = self.state
        if state.attrs.get("fine_scale", "none") == "none":
            return None
        return FineScaleParams(state.attrs["fine_scale"], float(state["fine_partial_sill"]),
                               float(state["fine_range"]), float(state["noise_variance"]))

    @property
    def trend_coefficients(self):
        """Residual trend coefficients ``theta``, DataArray (feature), or None."""
        return self.state.get("trend_coefficients")

    @property
    def history(self):
        """Per-iteration convergence record, Dataset over ``iteration``."""
        names = [n for n in self.state.data_vars if n.startswith("history_") and n != "history_iteration"]
        ds = self.state[names].rename({n: n[len("history_"):] for n in names})
        if "history_iteration" in self.state:
            # 1-based iteration numbers of the driver (0 for the skipped loop)
            ds = ds.assign_coords(iteration=self.state["history_iteration"].values.astype(int))
        return ds.assign_attrs(converged=bool(self.state.attrs["converged"]),
                               skipped_loop=bool(self.state.attrs["skipped_loop"]))

    def _loadings(self):
        return self.state["basis"].values @ self.state["rotation"].values

    def covariance(self):
        """Dense model covariance ``B diag(lambda) B^T + sigma^2 I`` (small N only).

        Returns
        -------
        xarray.DataArray
            (site, site_) in residual units squared.

        Raises
        ------
        ProblemTooLargeError
            Above :data:`DENSE_COVARIANCE_MAX_SITES` sites.
        """
        n_sites = self.state.sizes[self._site_dim]
        if n_sites > DENSE_COVARIANCE_MAX_SITES:
            raise ProblemTooLargeError(
                f"the dense covariance of {n_sites} sites would need {n_sites**2 * 8 / 1e9:.1f} GB; "
                "use basis, eigenvalues and noise_variance (low-rank form) or krige() instead."
            )
        loadings = self._loadings()
        matrix = (loadings * self.state["eigenvalues"].values) @ loadings.T
        matrix[np.diag_indices_from(matrix)] += self.noise_variance
        fine = self.fine_scale_params
        if fine is not None:
            matrix += fine.covariance(self._fitted_sites().pairwise_km())
        site_dim = self._site_dim
        other = f"{site_dim}_"
        coords = {}
        for name, coord in self.state[site_dim].coords.items():
            coords[name] = (site_dim, coord.values)
            coords[f"{name}_"] = (other, coord.values)
        out = xr.DataArray(matrix, dims=(site_dim, other), coords=coords)
        return out.assign_attrs(long_name="model covariance of the residual", units=self.state["eigenvalues"].attrs["units"])

    # ------------------------------------------------------------------ kriging
    def krige(self, observed, at=None, level=0.9, include_noise=True, calibrate=None, covariates=None,
              first_stage=None):
        """Krige the residual at unobserved sites.

        Parameters
        ----------
        observed : xarray.DataArray
            Observed residuals ``(time, space dims...)`` on (a subset of) the fitted
            sites, NaN where unobserved; same units as the fitted residuals.
        at : xarray.Dataset or DataArray, optional
            Target locations (stations with lat/lon or x/y coordinates, or a lat/lon
            grid). Default: the fitted sites, filling the ones missing in ``observed``.
        level : float, default 0.9
            Central probability of the intervals.
        include_noise : bool, default True
            Predict a new observation (adds the white-noise variance) rather than the
            latent field.
        calibrate : float or tuple, optional
            Interval multiplier: a number, or ``(truth, result)`` of a calibration
            run from which a split-conformal multiplier is computed.
        covariates : xarray.DataArray, optional
            Covariates of the residual trend over the times of ``observed`` and every
            observed and target site (matched by space labels).
        first_stage : xarray.DataArray, optional
            First-stage prediction at the targets; added to ``mean``/``lower``/``upper``.

        Returns
        -------
        xarray.Dataset
            ``mean``, ``variance``, ``lower``, ``upper`` with dims (time, target dims).
        """
        state = self.state
        observed = _as_dataarray(observed, "observed")
        time_dim, site_dim = self._time_dim, self._site_dim
        if time_dim not in observed.dims:
            raise InputError(f"observed has no {time_dim!r} dim (dims: {tuple(observed.dims)}); it must match the fitted adapter.")
        self._check_units(observed)
        obs_stacked = self._align_observed(observed)
        data = _to_numpy(obs_stacked, "observed")
        n_times = data.shape[0]
        mean_fit = state["mean"].values

        trend_obs = self._trend_at(covariates, obs_stacked, site_dim, time_dim)
        if trend_obs is not None:
            data = data - trend_obs

        multiplier = _multiplier(calibrate, level)
        loadings = self._loadings()
        eigenvalues = state["eigenvalues"].values
        fitted = self._fitted_sites()
        if at is None:
            template = obs_stacked.isel({time_dim: 0}, drop=True)
            target_loadings, target_mean = loadings, mean_fit
            trend_target = trend_obs
        else:
            template, targets = target_sites(at)
            fitted_planar, target_planar = self._planar_pair(fitted, targets)
            target_basis, target_mean = self._extend(fitted_planar, target_planar)
            target_loadings = target_basis @ state["rotation"].values
            trend_target = self._trend_at(covariates, template.expand_dims({time_dim: obs_stacked[time_dim].values}),
                                          template.dims[0], time_dim)
        fine = self.fine_scale_params
        if fine is None:
            result = _krige_arrays(
                data, loadings, eigenvalues, self.noise_variance,
                target_loadings=target_loadings, mean=mean_fit, target_mean=target_mean,
                include_noise=include_noise, level=level, multiplier=multiplier,
            )
        else:
            coords, geographic = fitted.graph_coords()
            target_coords = None if at is None else targets.graph_coords()[0]
            mean_values, variance = krige_with_fine_scale(
                data, loadings, eigenvalues, fine, coords,
                target_loadings=None if at is None else target_loadings, target_coords=target_coords,
                mean=mean_fit, target_mean=target_mean, include_noise=include_noise,
                k=self.fine_neighbors, geographic=geographic,
            )
            result = KrigingResult.from_moments(mean_values, variance, level, multiplier)
        if at is not None and "cv_squared_error" in state:
            ratio = variance_ratio_at(target_planar, fitted_planar, state["cv_squared_error"].values,
                                      state["cv_model_variance"].values, state["cv_count"].values)
            result = KrigingResult.from_moments(result.mean, result.variance * ratio[None, :], level, multiplier)
        shift = np.zeros((n_times, target_loadings.shape[0]))
        if trend_target is not None:
            shift = shift + trend_target
        if first_stage is not None:
            shift = shift + self._first_stage_at(first_stage, template, obs_stacked[time_dim])
        return self._kriging_dataset(result, shift, template, obs_stacked[time_dim], level, include_noise, at is None)

    def _check_units(self, observed):
        fitted = self.state.attrs.get("units", "")
        given = observed.attrs.get("units")
        if given is not None and fitted and str(given) != str(fitted):
            raise InputError(
                f"observed has units {given!r} but the adapter was fitted on {fitted!r}; "
                "convert the observations to the fitted units first."
            )

    def _align_observed(self, observed):
        site_dim, time_dim = self._site_dim, self._time_dim
        space_dims = self._space_dims
        missing = [d for d in space_dims if d not in observed.dims]
        if missing:
            raise InputError(
                f"observed lacks the fitted space dims {missing} (dims: {tuple(observed.dims)}); "
                "give observations on the fitted sites (NaN where unobserved)."
            )
        stacked, dim = stack_space(observed, space_dims)
        stacked = stacked.transpose(time_dim, dim)
        fitted_index = self._site_index()
        given_index = _stacked_index(stacked, dim, space_dims)
        positions = fitted_index.get_indexer(given_index)
        if np.any(positions < 0):
            unknown = [given_index[i] for i in np.flatnonzero(positions < 0)[:5]]
            raise InputError(
                f"observed has sites that the adapter was not fitted on, e.g. {unknown}; "
                "krige new locations with at=... and give observations on fitted sites only."
            )
        values = np.full((stacked.sizes[time_dim], len(fitted_index)), np.nan)
        values[:, positions] = np.asarray(stacked.values, dtype=np.float64)
        coords = {time_dim: stacked[time_dim].values}
        coords.update({k: (site_dim, v.values) for k, v in self.state[site_dim].coords.items()})
        return xr.DataArray(values, dims=(time_dim, site_dim), coords=coords, attrs=observed.attrs)

    def _site_index(self):
        site = self.state[self._site_dim]
        space_dims = self._space_dims
        if len(space_dims) == 1:
            return pd.Index(site.values)
        return pd.MultiIndex.from_arrays([self.state[d].values for d in space_dims], names=list(space_dims))

    def _planar_pair(self, fitted, targets):
        """Planar km coordinates of fitted sites and targets, projected about the same centre."""
        if fitted.geographic != targets.geographic:
            raise InputError(
                "`at` and the fitted sites use different coordinate systems (lat/lon vs x/y); "
                "give target locations in the fitted system."
            )
        centre = fitted.centre()
        return fitted.planar_km(centre), targets.planar_km(centre)

    def _extend(self, fitted_planar, target_planar):
        """Basis rows and site mean at the targets (thin-plate extension)."""
        values = np.column_stack([self.state["basis"].values, self.state["mean"].values])
        extended = extend_basis(target_planar, fitted_planar, values, method=self.extension,
                                neighbors=self.extension_neighbors, smoothing=self.extension_smoothing)
        return extended[:, :-1], extended[:, -1]

    def _fitted_sites(self):
        state = self.state
        site_dim = self._site_dim
        if bool(state.attrs["geographic"]):
            lat = state[find_coordinate(state, LATITUDE_RULES)].values
            lon = state[find_coordinate(state, LONGITUDE_RULES)].values
            return Sites(True, lat=lat, lon=lon)
        stacked = state["mean"]
        return site_coordinates(stacked, site_dim, self._space_dims)

    def _trend_at(self, covariates, stacked, site_dim, time_dim):
        if "trend_coefficients" not in self.state:
            return None
        if covariates is None:
            raise InputError(
                "the adapter has a residual trend: pass covariates=... covering the observed "
                "times and every observed and target site."
            )
        space_dims = self._space_dims if site_dim == self._site_dim else tuple(
            d for d in covariates.dims if d not in (time_dim, "feature"))
        features, array = _covariate_array(covariates, stacked, time_dim, site_dim, space_dims)
        expected = self.state["feature"].values
        if features is None or len(features) != len(expected) or np.any(np.asarray(features) != expected):
            raise InputError(f"covariates must have the fitted features {list(expected)}, got {features}.")
        return evaluate_trend(array, self.state["trend_coefficients"].values, stacked.sizes[time_dim],
                              stacked.sizes[site_dim])

    def _first_stage_at(self, first_stage, template, times):
        first_stage = _as_dataarray(first_stage, "first_stage")
        dims = [d for d in first_stage.dims if d != self._time_dim]
        stacked, dim = stack_space(first_stage, tuple(dims))
        stacked = stacked.transpose(self._time_dim, dim)
        if stacked.shape != (len(times), template.size):
            raise InputError(
                f"first_stage has shape {stacked.shape}; it must cover the kriging times "
                f"({len(times)}) and targets ({template.size})."
            )
        return np.asarray(stacked.values, dtype=np.float64)

    def _kriging_dataset(self, result, shift, template, times, level, include_noise, fitted_targets):
        time_dim = self._time_dim
        dim = template.dims[0]
        units = self.state.attrs.get("units", "")
        coords = {time_dim: times.values}
        coords.update({k: (dim, v.values) for k, v in template.coords.items() if v.dims == (dim,)})
        out = xr.Dataset(coords=coords)
        what = "new observation" if include_noise else "latent residual field"
        specs = {
            "mean": (result.mean + shift, units, f"kriged mean of the {what}"),
            "variance": (result.variance, _squared_units(units), f"kriging variance of the {what}"),
            "lower": (result.lower + shift, units, f"lower bound of the {level:.0%} interval"),
            "upper": (result.upper + shift, units, f"upper bound of the {level:.0%} interval"),
        }
        for name, (values, var_units, long_name) in specs.items():
            out[name] = ((time_dim, dim), values, {"units": var_units, "long_name": long_name})
        if isinstance(template.indexes.get(dim), pd.MultiIndex):
            out = out.assign_coords(xr.Coordinates.from_pandas_multiindex(template.indexes[dim], dim)).unstack(dim)
        elif fitted_targets:
            out = self._unstack(out)
        out.attrs.update(level=level, include_noise=int(include_noise), multiplier=float(result.multiplier),
                         xadapter_version=__version__,
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return out

    # ------------------------------------------------------------------ persistence
    def to_netcdf(self, path):
        """Write the fitted adapter to one CF-style NetCDF file, atomically."""
        atomic_to_netcdf(self.state, path)

    def __repr__(self):
        params = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("rank", "tau1", "tau2", "penalty", "fine_scale"))
        if self._state is None:
            return f"<SpatialAdapter (not fitted) {params}>"
        state = self.state
        status = "skipped (exact)" if state.attrs["skipped_loop"] else (
            f"{'converged' if state.attrs['converged'] else 'NOT converged'} in {state.attrs['n_iter']} iterations")
        units = _squared_units(state.attrs.get("units", ""))
        lines = [
            f"<SpatialAdapter {params}>",
            f"  sites: {state.attrs['n_sites']}   times: {state.attrs['n_times']}",
            f"  rank: {state.sizes['mode']}   effective rank: {self.effective_rank}",
            f"  noise variance: {self.noise_variance:.4g} {units}".rstrip(),
            f"  ADMM: {status}",
        ]
        fine = self.fine_scale_params
        if fine is not None:
            lines.insert(4, f"  fine scale: {fine.kind}, partial sill {fine.partial_sill:.4g} {units}, "
                            f"range {fine.range_km:.4g} km")
        if "cv_crps" in state.attrs:
            lines.append(f"  site CV: CRPS {state.attrs['cv_crps']:.4g}, RMSE {state.attrs['cv_rmse']:.4g}, "
                         f"90 % coverage {state.attrs['cv_coverage']:.3f}")
        return "\n".join(lines)


def load(path):
    """Restore a :class:`SpatialAdapter` written by :meth:`SpatialAdapter.to_netcdf`."""
    with xr.open_dataset(path) as ds:
        state = ds.load()
    if "parameters" not in state.attrs:
        raise InputError(f"{path} is not an xadapter file (no 'parameters' attribute).")
    params = json.loads(state.attrs["parameters"])
    if isinstance(params.get("space_dims"), list):
        params["space_dims"] = tuple(params["space_dims"])
    adapter = SpatialAdapter(**params)
    adapter._state = state
    return adapter


# ---------------------------------------------------------------------- helpers
def _as_dataarray(obj, what):
    if not isinstance(obj, xr.DataArray):
        raise InputError(f"{what} must be an xarray.DataArray, got {type(obj).__name__}.")
    return obj


def _to_numpy(stacked, what):
    data = stacked.data
    if hasattr(data, "dask") or type(data).__module__.startswith("dask"):
        if stacked.nbytes > MAX_LOAD_BYTES:
            raise InputError(
                f"{what} is a dask array of {stacked.nbytes / 1e9:.1f} GB; this version fits in memory. "
                "Subset or coarsen the data, or load a part of it explicitly."
            )
        warnings.warn(f"loading the dask-backed {what} ({stacked.nbytes / 1e6:.0f} MB) into memory.",
                      stacklevel=3)
    return np.array(stacked.values, dtype=np.float64)


def _check_data(data, stacked, site_dim, time_dim, rank):
    n_times, n_sites = data.shape
    if n_times < 3:
        raise InputError(f"need at least 3 time steps to fit an adapter, got {n_times}.")
    if rank >= n_sites:
        raise InputError(f"rank={rank} must be smaller than the number of sites ({n_sites}); lower rank.")
    if np.isinf(data).any():
        raise InputError("residuals contain infinite values; replace them with NaN (missing) or fix them.")
    empty = np.flatnonzero(np.isnan(data).all(axis=0))
    if empty.size:
        labels = [_site_label(stacked, site_dim, i) for i in empty[:5]]
        raise InputError(
            f"site(s) {labels} have no observation at any time (all NaN); drop them before fitting "
            f"({empty.size} in all)."
        )


def _stack_order(stacked, site_dim, space_dims):
    index = stacked.indexes.get(site_dim)
    if index is not None and hasattr(index, "levels"):
        return tuple(index.names)
    return tuple(space_dims)


def _site_label(stacked, site_dim, index):
    value = stacked[site_dim].values[index]
    return value.item() if hasattr(value, "item") else value


def _site_coords(stacked, site_dim):
    """Coordinates along the site dim, with a stacked MultiIndex flattened to variables."""
    obj = stacked
    if site_dim in obj.indexes and hasattr(obj.indexes[site_dim], "levels"):
        obj = obj.reset_index(site_dim)
    coords = {}
    for name, coord in obj.coords.items():
        if coord.dims == (site_dim,):
            coords[name] = (site_dim, coord.values, coord.attrs)
    if site_dim not in coords:
        coords[site_dim] = np.arange(stacked.sizes[site_dim])
    return coords


def _stacked_index(stacked, dim, space_dims):
    if len(space_dims) == 1:
        return pd.Index(stacked[dim].values)
    index = stacked.indexes[dim]
    return pd.MultiIndex.from_arrays([index.get_level_values(d) for d in space_dims])


def _covariate_array(covariates, stacked, time_dim, site_dim, space_dims):
    """Covariates as (T, N, p), (T, p) or (N, p) aligned with ``stacked``."""
    if covariates is None:
        return None, None
    covariates = _as_dataarray(covariates, "covariates")
    if "feature" not in covariates.dims:
        raise InputError(f"covariates need a 'feature' dim (dims: {tuple(covariates.dims)}).")
    has_time = time_dim in covariates.dims
    has_space = all(d in covariates.dims for d in space_dims)
    if has_time:
        covariates = covariates.sel({time_dim: stacked[time_dim].values}) if time_dim in covariates.indexes else covariates
        if covariates.sizes[time_dim] != stacked.sizes[time_dim]:
            raise InputError("covariates do not cover the times of the residuals.")
    if has_space:
        cov_stacked, dim = stack_space(covariates, space_dims)
        index = _stacked_index(cov_stacked, dim, space_dims)
        wanted = _stacked_index(stacked, site_dim, space_dims) if site_dim in stacked.indexes else None
        if wanted is not None:
            positions = index.get_indexer(wanted)
            if np.any(positions < 0):
                raise InputError("covariates do not cover every site of the residuals (matched by space labels).")
            cov_stacked = cov_stacked.isel({dim: positions})
        order = ((time_dim,) if has_time else ()) + (dim, "feature")
        array = np.asarray(cov_stacked.transpose(*order).values, dtype=np.float64)
    elif has_time:
        array = np.asarray(covariates.transpose(time_dim, "feature").values, dtype=np.float64)
    else:
        raise InputError("covariates must vary along time, space or both (besides 'feature').")
    n_times, n_sites = stacked.sizes[time_dim], stacked.sizes[site_dim]
    if array.ndim == 2 and n_times == n_sites:
        # (T, p) and (N, p) cannot be told apart by shape when T == N: broadcast explicitly
        array = np.broadcast_to(array[:, None, :] if has_time else array[None, :, :],
                                (n_times, n_sites, array.shape[-1])).copy()
    return covariates["feature"].values if "feature" in covariates.coords else np.arange(covariates.sizes["feature"]), array


def _observed(data, fit):
    """The residual minus trend at the observed entries, NaN at the gaps."""
    return np.where(np.isnan(data), np.nan, fit.filled)


def _time_blocks(data, n_blocks):
    """Contiguous time blocks whose complement observes every site ([None]: no split)."""
    n_times = data.shape[0]
    if n_blocks < 2 or n_times < 3 * n_blocks:
        return [None]
    blocks = np.array_split(np.arange(n_times), n_blocks)
    observed = ~np.isnan(data)
    for block in blocks:
        rest = np.ones(n_times, bool)
        rest[block] = False
        if not observed[rest].any(axis=0).all():
            return [None]  # some site is seen only inside one block
    return blocks


def _rows(covariates, rows, n_times, n_sites):
    """Covariates restricted to some times (space-only covariates are unchanged)."""
    if covariates is None:
        return None
    if covariates.ndim == 3 or (covariates.shape[0] == n_times and n_times != n_sites):
        return covariates[rows]
    return covariates


def _trend(covariates, theta, rows, n_times, n_sites):
    """Residual trend at some times, zeros without covariates."""
    if covariates is None or theta is None:
        return 0.0
    return evaluate_trend(_rows(covariates, rows, n_times, n_sites), theta, len(rows), n_sites)


def _with_eigenvalues(covariance, eigenvalues):
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    return dataclasses.replace(covariance, eigenvalues=eigenvalues, effective_rank=int((eigenvalues > 0).sum()))


def _multiplier(calibrate, level):
    if calibrate is None:
        return None
    if isinstance(calibrate, (int, float, np.floating)):
        if not calibrate > 0:
            raise InputError(f"calibrate must be a positive interval multiplier, got {calibrate}.")
        return float(calibrate)
    try:
        truth, result = calibrate
    except (TypeError, ValueError):
        raise InputError("calibrate must be a multiplier or a (truth, kriging result) pair.") from None
    return conformal_multiplier(np.asarray(truth), np.asarray(result["mean"]), np.asarray(result["variance"]), level)


def _squared_units(units):
    if not units:
        return ""
    return f"({units})^2" if " " in units or "/" in units else f"{units}^2"


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
