"""The :class:`SpatialAdapter` model: labels in, engine, labels out.

The model stacks any residual DataArray to a ``(time, site)`` array (numpy or dask),
hands it to the engine (:func:`xadapter.engine.pipeline.fit`), and turns the
:class:`~xadapter.engine.fitted.FittedModel` and the kriged arrays back into
DataArrays/Datasets with the input's dims, coordinates and CF attributes. Its fitted
state is saved as one :class:`xarray.Dataset` (``adapter.state``,
:mod:`xadapter.labelled.state`), which :meth:`SpatialAdapter.to_netcdf` writes and
:func:`load` reads.
"""

from __future__ import annotations

import datetime as _dt
import json

import numpy as np
import pandas as pd
import xarray as xr

from .._version import __version__
from ..engine import binary as binary_engine
from ..engine import forecast as forecast_engine
from ..engine import pipeline, streaming
from ..engine.kriging import KrigingResult
from ..engine.kriging import conformal_multiplier
from ..engine.settings import Settings
from ..engine import chunks
from ..exceptions import InputError, NotFittedError, ProblemTooLargeError, warn
from ..io.netcdf import atomic_to_netcdf
from . import state as state_io
from .labels import (
    align_to_sites,
    check_time_index,
    covariate_array,
    find_time_dim,
    site_coordinates,
    site_coords,
    space_dims_of,
    stack_order,
    stack_space,
    stacked_index,
    target_sites,
    unstack,
)
from .state import squared_units

#: Largest number of sites for which :meth:`SpatialAdapter.covariance` returns the
#: dense N x N matrix.
DENSE_COVARIANCE_MAX_SITES = 5000

#: Constructor parameters that are labels, not numbers: checked by the labelled face.
_LABEL_PARAMETERS = ("time_dim", "space_dims")

_PARAMETER_NAMES = (
    "rank", "tau1", "tau2", "gamma", "penalty", "neighbors", "penalty_order", "fine_scale",
    "ridge", "rho", "batch_size", "phi_every", "phi_freeze", "momentum", "min_iter", "max_iter",
    "tol", "extension", "extension_neighbors", "extension_smoothing", "seed", "time_dim",
    "space_dims", "progress", "fine_neighbors", "site_folds", "cv_max_times", "cv_time_blocks",
    "task", "binary_residual", "binary_clip", "prediction_scale", "var_order", "var_ridge", "streaming",
)


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
        ``"auto"``: the effective rank chosen by cross-validation over sites on the
        kriging CRPS (never above the spectral threshold's rank), at ``K = 10``, or
        at ``K = min(20, N - 1, T - 2)`` when at 10 the spectral rule keeps every
        component and the held-out score is still falling (``K`` is capped by the
        same bounds throughout).
    tau1 : float or "cv", default 0.0
        Smoothness weight (``tau1 * tr(Phi^T Omega Phi)``; the penalty is normalised
        to unit largest eigenvalue, so ``tau1`` is in units of the eigenvalues of
        ``Dc^T Dc``, residual units squared times time steps). ``"cv"``: chosen by
        cross-validation over sites on the kriging CRPS among 0 and
        :data:`xadapter.engine.pipeline.TAU1_CV_FACTORS` times the largest eigenvalue of ``Dc^T Dc``;
        with ``rank="auto"`` as well, each ``tau1 > 0`` is scored at the rank chosen
        without smoothing.
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
        Time steps (evenly spaced) used by the cross-validation over sites; on very
        large networks fewer, so that the subsample holds at most
        :data:`xadapter.engine.pipeline.SUBSAMPLE_MAX_ENTRIES` entries.
    cv_time_blocks : int, default 3
        Contiguous time blocks of the ``rank="auto"`` / ``tau1="cv"`` search: each
        block is scored at held-out sites after fitting on the other blocks (1: score
        on the fitted times).
    ridge : float
        Ridge weight of the residual trend.
    rho, batch_size, phi_every, phi_freeze, momentum, min_iter, max_iter, tol
        ADMM settings (see :func:`xadapter.engine.admm.fit_adapter`); ``tol`` is its
        relative tolerance.
    extension : {"auto", "global", "local"}
        Thin-plate extension of the basis to new sites.
    extension_neighbors : int
        Neighbours of the local extension.
    extension_smoothing : float, default 0.3
        Smoothing of the thin-plate extension (dimensionless, coordinates in units
        of the typical site spacing, see :mod:`xadapter.engine.extend`). Estimated
        eigenvectors are rough at the scale of the site spacing; exact interpolation
        (0) carries that roughness to new sites.
    seed : int
        Seed of every random choice (mini-batch order, subsamples).
    time_dim : str, optional
        Name of the time dim (default: found by name or datetime dtype).
    space_dims : str or tuple of str, optional
        Space dims (default: every dim but time).
    progress : bool or None, default None
        Progress bars (tqdm) over the ADMM iterations and the site cross-validation
        folds on stderr: True always, False never, None only when stderr is a
        terminal (so scripts and CI stay silent).
    task : {"gaussian", "binary"}, default "gaussian"
        ``"binary"``: the targets are 0/1 labels and the first stage gives
        probabilities (or logits); the residual lives on the logit scale
        (:meth:`residual`), :meth:`krige` takes labels and returns the latent logit and
        the predictive ``probability`` (:mod:`xadapter.engine.binary`).
    binary_residual : {"working", "logit"}, default "working"
        Logit-scale residual of a binary target: the IRLS working residual
        ``(y - p) / (p (1 - p))`` (unbiased for the logit offset to first order), or
        ``logit(y_c) - logit(p)`` with ``y`` clipped to ``[c, 1 - c]``.
    binary_clip : float, default 0.01
        ``c``: clip of labels and probabilities (dimensionless, in (0, 0.5)).
    prediction_scale : {"probability", "logit"}, default "probability"
        Scale of a binary first-stage prediction.
    var_order : int, default 1
        Order of the vector autoregression of the scores used by :meth:`forecast`.
    var_ridge : float, default 1e-3
        Ridge weight of the VAR, relative to the mean diagonal of its lagged Gram
        matrix (dimensionless).
    streaming : bool, default False
        Keep the running statistics (the ``N x N`` Gram matrix of the sites, at most
        :data:`xadapter.engine.streaming.STREAM_MAX_SITES`) that :meth:`update` needs.
        Needs complete residuals, no trend, ``tau2=0`` and a fixed rank and ``tau1``.
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
        max_iter=Settings.max_iter,
        tol=1e-4,
        extension="auto",
        extension_neighbors=50,
        extension_smoothing=0.3,
        seed=0,
        time_dim=None,
        space_dims=None,
        progress=None,
        fine_neighbors=30,
        site_folds=5,
        cv_max_times=200,
        cv_time_blocks=3,
        task="gaussian",
        binary_residual="working",
        binary_clip=0.01,
        prediction_scale="probability",
        var_order=1,
        var_ridge=1e-3,
        streaming=False,
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
        self.task = task
        self.binary_residual = binary_residual
        self.binary_clip = binary_clip
        self.prediction_scale = prediction_scale
        self.var_order = var_order
        self.var_ridge = var_ridge
        self.streaming = streaming
        self._state = None
        self._fitted = None

    # ------------------------------------------------------------------ parameters
    def get_params(self):
        """Hyperparameters as a dict (scikit-learn convention)."""
        return {name: getattr(self, name) for name in _PARAMETER_NAMES}

    def settings(self):
        """The numerical parameters as validated engine :class:`~xadapter.engine.settings.Settings`."""
        params = {k: v for k, v in self.get_params().items() if k not in _LABEL_PARAMETERS}
        return Settings(**params)

    # ------------------------------------------------------------------ fitting
    def fit(self, residuals, covariates=None):
        """Fit the adapter on a residual field.

        Parameters
        ----------
        residuals : xarray.DataArray
            ``(time, space dims...)`` residuals of the first stage, NaN where missing.
            Station data: one space dim with ``lat``/``lon`` (or ``x``/``y``)
            coordinates; gridded data: ``lat``/``lon`` dims in any order. A dask-backed
            array (``xr.open_dataset(..., chunks={"time": n})``) is fitted chunk by
            chunk along time. Integer input is converted to float64; float32 input
            is converted to float64 too and every statistic is computed in float64,
            so the fit is as precise as the float32 data themselves (about 7
            significant digits).

            Time steps with no observation at all (every site NaN) carry no
            information: they are dropped from the fit with a warning (``scores``
            and ``state`` then cover the other times only). The time labels must be
            unique and ordered (increasing or decreasing); duplicated or unordered
            times are an error.
        covariates : xarray.DataArray or xarray.Dataset, optional
            Covariates of the residual trend: a DataArray with a ``feature`` dim, or a
            Dataset of one variable per covariate (named by the variable), each on any
            of the time and space dims (missing dims broadcast).

        Returns
        -------
        self
        """
        settings = self.settings()
        residuals = _as_dataarray(residuals, "residuals")
        time_dim = find_time_dim(residuals, self.time_dim)
        check_time_index(residuals, time_dim)
        space_dims = space_dims_of(residuals, time_dim, self.space_dims)
        stacked, site_dim = stack_space(residuals, space_dims)
        stacked = stacked.transpose(time_dim, site_dim)
        sites = site_coordinates(stacked, site_dim, space_dims)
        stacked = _drop_empty_times(stacked, time_dim)
        features, covariates = covariate_array(covariates, stacked, time_dim, site_dim, space_dims)
        if settings.streaming:
            streaming.check_streamable_size(stacked.shape[1])
            streaming.check_streamable(settings, has_gaps=False, has_trend=covariates is not None)
            if chunks.compute(np.isnan(stacked.data).any())[0]:
                streaming.check_streamable(settings, has_gaps=True, has_trend=False)
        fitted = pipeline.fit(stacked.data, sites, settings, covariates, site_names=stacked[site_dim].values)
        fitted = _with_forecast_and_stream(fitted, stacked.data, settings)
        state = state_io.to_dataset(
            fitted, site_coords=site_coords(stacked, site_dim), site_dim=site_dim,
            space_dims=stack_order(stacked, site_dim, space_dims), time_dim=time_dim,
            times=stacked[time_dim].values, units=stacked.attrs.get("units", ""), features=features,
            parameters=self.get_params(),
        )
        # both at once, after every step succeeded: an error or an interrupt (Ctrl-C)
        # anywhere above leaves the adapter as it was (unfitted, or its previous fit)
        self._fitted, self._state = fitted, state
        return self

    # ------------------------------------------------------------------ fitted state
    @property
    def state(self):
        """The fitted state as one Dataset (what is saved to NetCDF)."""
        if self._state is None:
            raise NotFittedError("this SpatialAdapter is not fitted yet; call fit(residuals) first.")
        return self._state

    @property
    def fitted(self):
        """The fitted model as engine arrays (:class:`~xadapter.engine.fitted.FittedModel`)."""
        if self._fitted is None:
            self.state  # raises the not-fitted error
        return self._fitted

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
        return unstack(obj, self._site_dim, self._space_dims)

    def _site_index(self):
        return stacked_index(self.state, self._site_dim, self._space_dims)

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
        """Fitted fine-scale covariance (:class:`~xadapter.engine.finescale.FineScaleParams`) or None."""
        return self.fitted.fine

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

    def covariance(self):
        """Dense model covariance ``B diag(lambda) B^T + sigma^2 I`` (small N only).

        Returns
        -------
        xarray.DataArray
            (site, ``site_``) in residual units squared.

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
        fitted = self.fitted
        loadings = fitted.loadings
        matrix = (loadings * fitted.eigenvalues) @ loadings.T
        matrix[np.diag_indices_from(matrix)] += fitted.noise_variance
        if fitted.fine is not None:
            matrix += fitted.fine.covariance(fitted.sites.pairwise_km())
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
              first_stage=None, prediction=None):
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
        covariates : xarray.DataArray or xarray.Dataset, optional
            Covariates of the residual trend (as in :meth:`fit`) over the times of ``observed`` and every
            observed and target site (matched by space labels).
        first_stage : xarray.DataArray, optional
            First-stage prediction at the targets; added to ``mean``/``lower``/``upper``.
            ``task="binary"``: required, the first-stage probabilities (or logits)
            at the targets.
        prediction : xarray.DataArray, optional
            ``task="binary"`` only: the first stage at the fitted sites over the times
            of ``observed`` (default ``first_stage`` when ``at`` is None); the labels
            enter the kriging as the residual against it (:meth:`residual`).

        Returns
        -------
        xarray.Dataset
            ``mean``, ``variance``, ``lower``, ``upper`` with dims (time, target dims).
            ``task="binary"`` (``observed`` then holds 0/1 labels): ``mean`` and
            ``variance`` of the latent logit (first stage plus kriged residual,
            without the white noise, which is mostly Bernoulli noise),
            ``probability`` (the logistic-normal mean) and ``lower``/``upper`` the
            logistic-normal interval ``[sigmoid(m - q s), sigmoid(m + q s)]``.
        """
        if self.task == "binary":
            return self._krige_binary(_as_dataarray(observed, "observed"), at, level, first_stage, prediction)
        return self._krige_residuals(observed, at, level, include_noise, calibrate, covariates, first_stage)

    def _krige_residuals(self, observed, at, level, include_noise, calibrate, covariates, first_stage):
        """:meth:`krige` of residuals (the Gaussian path; binary labels arrive here as residuals)."""
        fitted = self.fitted
        observed = _as_dataarray(observed, "observed")
        time_dim, site_dim = self._time_dim, self._site_dim
        if time_dim not in observed.dims:
            raise InputError(f"observed has no {time_dim!r} dim (dims: {tuple(observed.dims)}); "
                             "it must match the fitted adapter.")
        self._check_units(observed)
        aligned = align_to_sites(observed, self._site_index(), site_dim, self._space_dims, time_dim)
        times = aligned[time_dim]
        # relabelled with the fitted coordinates only where they are read (xarray's
        # assign_coords is a good part of a small kriging call)
        obs_stacked = self._with_fitted_coords(aligned) if at is None or fitted.trend_coefficients is not None \
            else None
        observed_covariates = target_covariates = None
        if fitted.trend_coefficients is not None:
            observed_covariates = self._covariates_at(covariates, obs_stacked, site_dim, time_dim, "observed")
        if at is None:
            template = obs_stacked.isel({time_dim: 0}, drop=True)
            targets = None
        else:
            template, targets = target_sites(at)
            if fitted.trend_coefficients is not None:
                target_covariates = self._covariates_at(
                    covariates, template.expand_dims({time_dim: times.values}), template.dims[0], time_dim,
                    "kriging targets")
        result = pipeline.krige(
            fitted, aligned.data, targets=targets, covariates=observed_covariates,
            target_covariates=target_covariates, level=level, include_noise=include_noise,
            multiplier=_multiplier(calibrate, level),
        )
        shift = None
        if first_stage is not None:
            shift = self._first_stage_at(first_stage, template, times)
        return self._kriging_dataset(result, shift, template, times, level, include_noise, at is None)

    def _check_units(self, observed):
        fitted = self.state.attrs.get("units", "")
        given = observed.attrs.get("units")
        if given is not None and fitted and str(given) != str(fitted):
            raise InputError(
                f"observed has units {given!r} but the adapter was fitted on {fitted!r}; "
                "convert the observations to the fitted units first."
            )

    def _with_fitted_coords(self, aligned):
        """``aligned`` (time, site position) relabelled with the fitted site coordinates."""
        site_dim = self._site_dim
        coords = {k: (site_dim, v.values, v.attrs) for k, v in self.state[site_dim].coords.items()}
        return aligned.drop_vars(site_dim).assign_coords(coords)

    def _covariates_at(self, covariates, stacked, site_dim, time_dim, what):
        if covariates is None:
            raise InputError(
                "the adapter has a residual trend: pass covariates=... covering the observed "
                "times and every observed and target site."
            )
        if site_dim == self._site_dim:
            space_dims = self._space_dims
        else:
            space_dims = tuple(d for d in covariates.dims if d not in (time_dim, "feature"))
            target_dims = stack_order(stacked, site_dim, (site_dim,))
            if space_dims and set(space_dims) != set(target_dims):
                raise InputError(
                    f"covariates vary along {list(space_dims)} but the {what} along {list(target_dims)}; "
                    f"give covariates at the {what} on their own dims (or along time only)."
                )
        features, array = covariate_array(covariates, stacked, time_dim, site_dim, space_dims, what=what)
        expected = [state_io.jsonable(f) for f in self.state["feature"].values.tolist()]
        if features is None or list(features) != expected:
            raise InputError(f"covariates must have the fitted features {expected}, got {features}.")
        return array

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
        return stacked.data.astype(np.float64)

    def _kriging_dataset(self, result, shift, template, times, level, include_noise, fitted_targets):
        time_dim = self._time_dim
        dim = template.dims[0]
        units = self.state.attrs.get("units", "")
        coords = {time_dim: times.values}
        # coordinate attributes (units, standard_name) travel with the targets
        coords.update({k: (dim, v.values, v.attrs) for k, v in template.coords.items() if v.dims == (dim,)})
        what = "new observation" if include_noise else "latent residual field"
        specs = {
            "mean": (result.mean, units, f"kriged mean of the {what}"),
            "variance": (result.variance, squared_units(units), f"kriging variance of the {what}"),
            "lower": (result.lower, units, f"lower bound of the {level:.0%} interval"),
            "upper": (result.upper, units, f"upper bound of the {level:.0%} interval"),
        }
        data_vars = {}
        for name, (values, var_units, long_name) in specs.items():
            if shift is not None and name != "variance":
                values = values + shift
            data_vars[name] = ((time_dim, dim), values, {"units": var_units, "long_name": long_name})
        # one construction: adding the variables one by one aligns the Dataset each time
        out = xr.Dataset(data_vars, coords=coords)
        if isinstance(template.indexes.get(dim), pd.MultiIndex):
            out = out.assign_coords(xr.Coordinates.from_pandas_multiindex(template.indexes[dim], dim)).unstack(dim)
        elif fitted_targets:
            out = self._unstack(out)
        out.attrs.update(level=level, include_noise=int(include_noise), multiplier=float(result.multiplier),
                         xadapter_version=__version__,
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return out

    # ------------------------------------------------------------------ forecasting
    def forecast(self, steps, start=None, at=None, level=0.9):
        """Forecast the residual field ``1..steps`` time steps ahead.

        The kept component scores follow a ridge-regularised VAR (order
        ``var_order``, :mod:`xadapter.engine.forecast`); the forecast variance is the
        VAR's propagated innovation covariance through the loadings plus the variance
        of what the low rank leaves (fine-scale sill or white noise), for a new
        observation.

        Parameters
        ----------
        steps : int
            Horizon in time steps (>= 1).
        start : time label or xarray.DataArray, optional
            Where the forecast starts: default the last fitted time; a label of a
            fitted time; or residuals ``(time, space dims...)`` at the fitted sites
            (the last ``var_order`` times are used; gaps are filled with the kriged
            mean, whose uncertainty is then left out).
        at : xarray.Dataset or DataArray, optional
            Target locations as in :meth:`krige`; default the fitted sites.
        level : float, default 0.9
            Central probability of the intervals.

        Returns
        -------
        xarray.Dataset
            ``mean``, ``variance``, ``lower``, ``upper`` over (time, target dims); the
            time labels continue the start's spacing, ``step`` counts 1..steps.
        """
        fitted = self.fitted
        steps = forecast_engine.check_steps(steps)
        if fitted.trend_coefficients is not None:
            raise InputError("forecast of an adapter with a residual trend is not supported: the trend needs "
                             "covariates at the future times. Fit the adapter without covariates to forecast.")
        history, start_times = self._forecast_start(start, fitted)
        targets = None
        if at is None:
            template = self._fitted_template()
        else:
            template, targets = target_sites(at)
        mean, variance = forecast_engine.forecast_field(fitted, history, steps, targets)
        result = KrigingResult.from_moments(mean, variance, level)
        times = pd.Index(_continue_times(start_times, self.state[self._time_dim].values, steps), name=self._time_dim)
        out = self._kriging_dataset(result, None, template, times, level, True, at is None)
        for name, text in (("mean", "forecast mean"), ("variance", "forecast variance")):
            out[name].attrs["long_name"] = f"{text} of the residual field (new observation)"
        out = out.assign_coords(step=(self._time_dim, np.arange(1, steps + 1)))
        out.attrs.update(start=str(_plain_label(start_times[-1])), steps=steps, var_order=int(fitted.var.order))
        return out

    def _fitted_template(self):
        n_sites = self.state.sizes[self._site_dim]
        blank = xr.DataArray(np.zeros((1, n_sites)), dims=(self._time_dim, self._site_dim),
                             coords={self._site_dim: np.arange(n_sites)})
        return self._with_fitted_coords(blank).isel({self._time_dim: 0}, drop=True)

    def _forecast_start(self, start, fitted):
        """Component scores ``(p', L)`` the forecast starts from, and their time labels."""
        order = fitted.var.order if fitted.var is not None else int(self.var_order)
        time_dim = self._time_dim
        if isinstance(start, xr.DataArray):
            self._check_units(start)
            if time_dim not in start.dims:
                raise InputError(f"start has no {time_dim!r} dim (dims: {tuple(start.dims)}).")
            aligned = align_to_sites(start, self._site_index(), self._site_dim, self._space_dims, time_dim,
                                     what="start")
            data = np.asarray(aligned.values, dtype=np.float64)
            if data.shape[0] < order:
                raise InputError(f"start needs at least var_order={order} time steps, got {data.shape[0]}.")
            gaps = np.isnan(data)
            if gaps.all(axis=1).any():
                raise InputError("start has a time step with no observation at all.")
            if gaps.any():
                data = np.where(gaps, pipeline.krige(fitted, data, include_noise=False).mean, data)
            history = (data - fitted.mean) @ fitted.kept_loadings
            return history, aligned[time_dim].values
        times = self.state[time_dim].values
        series = forecast_engine.component_scores(fitted.scores, fitted.rotation, fitted.eigenvalues)
        if start is None:
            end = len(times)
        else:
            try:
                end = self.state.indexes[time_dim].get_loc(start) + 1
            except (KeyError, TypeError, ValueError):
                raise InputError(f"start={start!r} is not a fitted time; give a fitted time label, or the "
                                 "residuals to start from as a DataArray.") from None
            if not isinstance(end, (int, np.integer)):
                raise InputError(f"start={start!r} matches several fitted times; give one time label.")
        if end < order:
            raise InputError(f"start={start!r} leaves fewer than var_order={order} fitted times before it.")
        return series[end - order:end], times[:end]

    # ------------------------------------------------------------------ streaming
    def update(self, residuals):
        """Fold new time steps into the fitted adapter, without the old data.

        Needs an adapter fitted with ``streaming=True``. The running sums (Gram
        matrix, site sums, lag-one products) gain the new times; basis, site mean,
        covariance, scores and VAR are recomputed from them
        (:mod:`xadapter.engine.streaming`: the same basis and spectrum as a full
        refit on all times, up to rounding; old scores re-expressed through the old
        span). The fine-scale covariance and the site calibration are kept from the
        last full fit.

        Parameters
        ----------
        residuals : xarray.DataArray
            ``(time, space dims...)`` residuals at every fitted site, no NaN, all
            times after the last fitted time.

        Returns
        -------
        self
        """
        fitted = self.fitted
        settings = self.settings()
        residuals = _as_dataarray(residuals, "residuals")
        time_dim, site_dim = self._time_dim, self._site_dim
        if fitted.stream is None:
            raise InputError("this adapter keeps no running statistics: fit it with streaming=True to update it.")
        if time_dim not in residuals.dims:
            raise InputError(f"residuals have no {time_dim!r} dim (dims: {tuple(residuals.dims)}).")
        self._check_units(residuals)
        check_time_index(residuals, time_dim)
        aligned = align_to_sites(residuals, self._site_index(), site_dim, self._space_dims, time_dim,
                                 what="new residuals")
        data = np.asarray(aligned.values, dtype=np.float64)
        absent = np.flatnonzero(np.isnan(data).all(axis=0))
        if absent.size:
            raise InputError(f"new residuals lack {absent.size} fitted site(s) (e.g. position {int(absent[0])}): "
                             "an update needs every fitted site at every new time.")
        new_times = aligned[time_dim].values
        old_times = self.state[time_dim].values
        if not (np.all(new_times[1:] > new_times[:-1]) and new_times[0] > old_times[-1]):
            raise InputError(f"new residuals must have increasing times after the last fitted time "
                             f"({_plain_label(old_times[-1])}).")
        omega = pipeline.smoothness_penalty(fitted.sites, settings) if float(settings.tau1) else None
        updated = streaming.update(fitted, data, settings, omega)
        state = self.state
        site_coords = {k: (site_dim, v.values, v.attrs) for k, v in state[site_dim].coords.items()
                       if v.dims == (site_dim,)}
        new_state = state_io.to_dataset(
            updated, site_coords=site_coords, site_dim=site_dim, space_dims=self._space_dims, time_dim=time_dim,
            times=np.concatenate([old_times, new_times]), units=state.attrs.get("units", ""), features=None,
            parameters=self.get_params(),
        )
        self._fitted, self._state = updated, new_state
        return self

    # ------------------------------------------------------------------ binary targets
    def residual(self, target, prediction):
        """Residual of ``target`` against a first-stage ``prediction``, as this adapter models it.

        ``task="gaussian"``: ``target - prediction``. ``task="binary"``: the
        logit-scale residual of labels ``target`` (0/1, NaN where unobserved) against
        probabilities (or logits, ``prediction_scale``) ``prediction``
        (``binary_residual``, :func:`xadapter.engine.binary.residual`).

        Returns
        -------
        xarray.DataArray
        """
        target = _as_dataarray(target, "target")
        prediction = _as_dataarray(prediction, "prediction")
        if self.task != "binary":
            out = target - prediction
            out.attrs = {"units": target.attrs.get("units") or prediction.attrs.get("units", "")}
            return out
        settings = self.settings()
        target, prediction = xr.align(target, prediction, join="exact")
        values = binary_engine.residual(target.values, prediction.values, settings.binary_residual,
                                        settings.prediction_scale, settings.binary_clip)
        return target.copy(data=values).assign_attrs(
            units="1", long_name=f"logit-scale residual ({settings.binary_residual}) of the binary target")

    def _krige_binary(self, observed, at, level, first_stage, prediction):
        """Kriging of labels: latent logit mean/variance, predictive probability and its interval."""
        settings = self.settings()
        if first_stage is None:
            raise InputError("task='binary': pass first_stage=... (first-stage probabilities or logits at the "
                             "kriging targets, over the times of observed).")
        if prediction is None:
            if at is not None:
                raise InputError("task='binary' with at=...: pass prediction=... (the first stage at the fitted "
                                 "sites, over the times of observed) as well as first_stage at the targets.")
            prediction = first_stage
        residuals = self.residual(observed, _as_dataarray(prediction, "prediction").broadcast_like(observed))
        latent = self._krige_residuals(residuals, at, level, False, None, None, None)
        eta = xr.DataArray(binary_engine.first_stage_logit(first_stage.values, settings.prediction_scale,
                                                           settings.binary_clip),
                           dims=first_stage.dims, coords=first_stage.coords)
        eta = eta.transpose(*[d for d in latent["mean"].dims if d in eta.dims])
        if eta.shape != latent["mean"].shape:
            raise InputError(f"first_stage has dims {dict(first_stage.sizes)}; it must cover the kriging times and "
                             f"targets {dict(latent['mean'].sizes)}.")
        mean = latent["mean"] + eta.values
        variance = latent["variance"]
        multiplier = float(latent.attrs["multiplier"])
        lower, upper = binary_engine.logistic_normal_interval(mean.values, variance.values, multiplier)
        out = latent.copy()
        out["mean"] = mean.assign_attrs(units="1", long_name="kriged mean of the latent logit")
        out["variance"] = variance.assign_attrs(units="1", long_name="kriging variance of the latent logit")
        out["probability"] = mean.copy(data=binary_engine.logistic_normal_mean(mean.values, variance.values)).assign_attrs(
            units="1", long_name="predictive probability (logistic-normal mean, Gauss-Hermite)")
        out["lower"] = mean.copy(data=lower).assign_attrs(units="1", long_name=f"lower bound of the {level:.0%} "
                                                          "logistic-normal interval of the probability")
        out["upper"] = mean.copy(data=upper).assign_attrs(units="1", long_name=f"upper bound of the {level:.0%} "
                                                          "logistic-normal interval of the probability")
        out.attrs["task"] = "binary"
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
        units = squared_units(state.attrs.get("units", ""))
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
    """Restore a :class:`SpatialAdapter` written by :meth:`SpatialAdapter.to_netcdf`.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    InputError
        The file is not NetCDF (or is truncated or damaged), is not an xadapter state,
        or was written in a state format this version cannot read
        (:data:`xadapter.labelled.state.FORMAT_VERSION`).
    """
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file at {path}.")
    try:
        with xr.open_dataset(path) as ds:
            state = ds.load()
    except (OSError, ValueError, RuntimeError) as error:
        reason = (str(error).splitlines() or [""])[0][:160]
        raise InputError(
            f"cannot read {path} as NetCDF ({type(error).__name__}: {reason}); the file is truncated, "
            "damaged or not NetCDF: write it again with adapter.to_netcdf(path)."
        ) from error
    state_io.check_format(state, path)
    params = json.loads(state.attrs["parameters"])
    if isinstance(params.get("space_dims"), list):
        params["space_dims"] = tuple(params["space_dims"])
    try:
        adapter = SpatialAdapter(**params)
        fitted = state_io.from_dataset(state, params)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            f"{path} is an xadapter file (format {state.attrs.get('xadapter_format', 1)}, written by "
            f"xadapter {state.attrs.get('xadapter_version', '?')}) that this version ({__version__}) cannot "
            f"restore: {type(error).__name__}: {error}; refit the adapter and save it again."
        ) from error
    if fitted.var is None and fitted.scores.shape[0] >= adapter.settings().var_order + 2:
        # a file written before forecasting existed: its VAR follows from the stored scores
        settings = adapter.settings()
        series = forecast_engine.component_scores(fitted.scores, fitted.rotation, fitted.eigenvalues)
        fitted = fitted.replace(var=forecast_engine.fit_var(series, settings.var_order, settings.var_ridge))
    adapter._state = state
    adapter._fitted = fitted
    return adapter


# ---------------------------------------------------------------------- helpers
def _with_forecast_and_stream(fitted, data, settings):
    """``fitted`` with the VAR of its scores and, for ``streaming=True``, the running statistics."""
    var = None
    if fitted.scores.shape[0] >= settings.var_order + 2:
        series = forecast_engine.component_scores(fitted.scores, fitted.rotation, fitted.eigenvalues)
        var = forecast_engine.fit_var(series, settings.var_order, settings.var_ridge)
    stream = streaming.running_statistics(data, reference=fitted.mean) if settings.streaming else None
    return fitted.replace(var=var, stream=stream)


def _drop_empty_times(stacked, time_dim):
    """``stacked`` without its time steps that have no observation (every site NaN), with a warning.

    Such a time step carries no information; the fitting loop would fill it with its
    own reconstruction (the site mean) and count it as a time step in the covariance,
    the effective sample size and the scores.
    """
    site_dim = next(d for d in stacked.dims if d != time_dim)
    (empty,) = chunks.compute(np.isnan(stacked.data).all(axis=1))
    if not empty.any():
        return stacked
    labels = stacked[time_dim].values[empty]
    shown = ", ".join(str(_plain_label(t)) for t in labels[:5])
    more = f" and {labels.size - 5} more" if labels.size > 5 else ""
    warn(f"{labels.size} time step(s) of the residuals have no observation at any {site_dim!r} (all NaN): "
         f"{shown}{more}; they are dropped from the fit (scores cover the other times only).")
    return stacked.isel({time_dim: np.flatnonzero(~empty)})


def _continue_times(start_times, fitted_times, steps):
    """Time labels of the ``steps`` forecast times after ``start_times[-1]`` (same spacing)."""
    reference = start_times if len(start_times) >= 2 else fitted_times
    spacing = reference[-1] - reference[-2]
    return np.asarray([start_times[-1] + spacing * (h + 1) for h in range(steps)])


def _plain_label(value):
    if isinstance(value, np.datetime64):
        return np.datetime_as_string(value, unit="auto")
    return value.item() if hasattr(value, "item") else value


def _as_dataarray(obj, what):
    if not isinstance(obj, xr.DataArray):
        raise InputError(f"{what} must be an xarray.DataArray, got {type(obj).__name__}.")
    return obj


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
