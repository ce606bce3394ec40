"""The fitted model as one labelled Dataset, and back: what ``to_netcdf`` writes.

:func:`to_dataset` serialises an engine :class:`~xadapter.engine.fitted.FittedModel`
with the labels of the data it was fitted on (site and time coordinates, units,
features, parameters); :func:`from_dataset` restores the model from it. The Dataset
holds nothing the model does not.
"""

from __future__ import annotations

import datetime as _dt
import json

import numpy as np
import xarray as xr

from .._version import __version__
from ..engine.finescale import FineScaleParams
from ..engine.fitted import Calibration, FittedModel
from ..engine.sites import Sites
from ..exceptions import InputError
from .labels import LATITUDE_RULES, LONGITUDE_RULES, find_coordinate, site_coordinates

#: Version of the layout of the state Dataset, stored as the ``xadapter_format``
#: attribute and checked by :func:`check_format`. Raise it when a change makes older
#: readers misread new files (a renamed or re-meant variable); files without the
#: attribute predate it and have format 1.
FORMAT_VERSION = 1

#: Variables every state holds, whatever the options of the fit.
REQUIRED_VARIABLES = ("basis", "scores", "mean", "eigenvalues", "sample_eigenvalues", "rotation",
                      "noise_variance", "low_rank_noise_variance", "effective_rank")

#: Columns of the rank/smoothness search table: name, long name, units ("" = data units).
SELECTION_COLUMNS = (
    ("tau1", "smoothness weight tried", None),
    ("rank", "effective rank tried", "1"),
    ("crps", "site cross-validated CRPS", ""),
    ("rmse", "site cross-validated RMSE", ""),
    ("coverage", "site cross-validated coverage of 90 % intervals", "1"),
)


def squared_units(units):
    """CF units string of a variance in ``units``."""
    if not units:
        return ""
    return f"({units})^2" if " " in units or "/" in units else f"{units}^2"


def jsonable(value):
    """``value`` with numpy scalars made plain, for JSON attributes."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if callable(value):
        return None
    return value


def to_dataset(model, *, site_coords, site_dim, space_dims, time_dim, times, units, features, parameters):
    """The state Dataset of a fitted model.

    Parameters
    ----------
    model : FittedModel
    site_coords : dict
        Coordinates along the site dim (``name -> (dim, values, attrs)``).
    site_dim, time_dim : str
    space_dims : tuple of str
        The space dims in stacking order.
    times : array_like
        Training time labels.
    units : str
        Units of the residuals.
    features : list or None
        Trend feature labels.
    parameters : dict
        Constructor parameters of the model (stored as JSON).
    """
    squared = squared_units(units)
    data_vars = {
        "basis": ((site_dim, "mode"), model.basis, {"long_name": "orthonormal spatial basis", "units": "1"}),
        "scores": ((time_dim, "mode"), model.scores, {"long_name": "basis scores", "units": units}),
        "mean": ((site_dim,), model.mean, {"long_name": "per-site time mean of training residuals",
                                           "units": units}),
        "eigenvalues": (("mode",), model.eigenvalues,
                        {"long_name": "thresholded eigenvalues of the low-rank covariance", "units": squared}),
        "sample_eigenvalues": (("mode",), model.sample_eigenvalues,
                               {"long_name": "eigenvalues of Phi^T S Phi", "units": squared}),
        "rotation": (("mode", "component"), model.rotation,
                     {"long_name": "rotation V of the basis to covariance eigenvectors", "units": "1"}),
        "noise_variance": ((), model.noise_variance, {"long_name": "white-noise variance", "units": squared}),
        "low_rank_noise_variance": ((), float(model.low_rank_noise_variance),
                                    {"long_name": "noise variance of the low-rank spectral rule "
                                                  "(everything beyond the effective rank)", "units": squared}),
        "effective_rank": ((), model.effective_rank,
                           {"long_name": "number of positive eigenvalues", "units": "1"}),
    }
    fine = model.fine
    if fine is not None:
        data_vars["fine_partial_sill"] = ((), float(fine.partial_sill),
                                          {"long_name": "partial sill eta^2 of the fine-scale covariance",
                                           "units": squared})
        data_vars["fine_range"] = ((), float(fine.range_km),
                                   {"long_name": "range ell of the fine-scale covariance", "units": "km"})
    if model.trend_coefficients is not None:
        data_vars["trend_coefficients"] = (("feature",), np.asarray(model.trend_coefficients),
                                           {"long_name": "residual trend coefficients"})
    history = {key: np.asarray(value) for key, value in model.history.items() if np.ndim(value) == 1}
    for key, values in history.items():
        data_vars[f"history_{key}"] = (("iteration",), values.astype(np.float64))
    if model.selection is not None:
        for column, (name, long_name, var_units) in enumerate(SELECTION_COLUMNS):
            data_vars[f"selection_{name}"] = (("candidate",), model.selection[:, column],
                                              {"long_name": long_name, "units": units if var_units == "" else
                                               (var_units or "")})
    calibration = model.calibration
    if calibration is not None:
        data_vars["cv_squared_error"] = ((site_dim,), calibration.squared_error, {
            "long_name": "sum over times of squared site-cross-validated kriging error", "units": squared})
        data_vars["cv_model_variance"] = ((site_dim,), calibration.model_variance, {
            "long_name": "sum over the same times of the model predictive variance", "units": squared})
        data_vars["cv_count"] = ((site_dim,), calibration.count.astype(np.int64), {"long_name": "times summed"})
        data_vars["cv_distance"] = ((site_dim,), calibration.distance_km, {
            "long_name": "distance to the nearest site kept in the cross-validation fold", "units": "km"})
        for key in ("coverage_model", "coverage_calibrated", "count"):
            data_vars[f"calibration_{key}"] = (("distance_bin",), calibration.by_distance[key])
        data_vars["calibration_distance"] = (("distance_bin",), calibration.by_distance["distance_km"], {
            "long_name": "upper edge of the distance bin", "units": "km"})
    data_vars.update(_var_variables(model.var, units))
    data_vars.update(_stream_variables(model.stream, site_dim, units))
    coords = dict(site_coords)
    coords[time_dim] = np.asarray(times)
    coords["mode"] = np.arange(model.rank)
    coords["component"] = np.arange(model.rank)
    if features is not None:
        coords["feature"] = features
    n_history = len(next(iter(history.values()))) if history else 0
    if n_history:
        coords["iteration"] = np.arange(n_history)
    attrs = {
        "xadapter_version": __version__,
        "xadapter_format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": json.dumps(jsonable(parameters)),
        "time_dim": str(time_dim),
        "site_dim": str(site_dim),
        "space_dims": json.dumps([str(d) for d in space_dims]),
        "geographic": int(model.geographic),
        "units": units,
        "n_times": int(model.scores.shape[0]),
        "n_sites": int(model.n_sites),
        "converged": int(model.converged),
        "n_iter": int(model.n_iter),
        "skipped_loop": int(model.skipped_loop),
        "n_eff": np.nan if model.n_eff is None else float(model.n_eff),
        "fine_scale": "none" if fine is None else fine.kind,
        "fine_neighbors": int(model.fine_neighbors),
        "extension": json.dumps(jsonable(model.extension)),
    }
    centre = model.sites.centre()
    if centre is not None:
        attrs["projection_centre"] = json.dumps(list(centre))
    if calibration is not None:
        attrs["cv_crps"] = float(calibration.crps)
        attrs["cv_rmse"] = float(calibration.rmse)
        attrs["cv_coverage"] = float(calibration.coverage)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _var_variables(var, units):
    """State variables of the VAR of the scores (none when there is no VAR)."""
    if var is None:
        return {}
    dims = ("var_component", "var_component_")
    return {
        "var_coefficients": (("var_lag",) + dims, np.asarray(var.coefficients, dtype=np.float64), {
            "long_name": "VAR coefficients A_j of the kept component scores: c_t = sum_j A_j c_(t-j) + eps_t",
            "units": "1"}),
        "var_innovation_covariance": (dims, np.asarray(var.innovation_covariance, dtype=np.float64), {
            "long_name": "innovation covariance Q of the VAR of the scores", "units": squared_units(units)}),
    }


def _stream_variables(stream, site_dim, units):
    """State variables of the running statistics of streaming updates (none when not kept)."""
    if stream is None:
        return {}
    other = f"{site_dim}_"
    squared = squared_units(units)
    return {
        "stream_reference": ((site_dim,), stream.reference, {
            "long_name": "reference level the running sums are taken about", "units": units}),
        "stream_sum": ((site_dim,), stream.total, {
            "long_name": "running sum over times of residual minus reference", "units": units}),
        "stream_gram": ((site_dim, other), stream.gram, {
            "long_name": "running sum over times of outer products of residual minus reference",
            "units": squared}),
        "stream_first": ((site_dim,), stream.first, {"long_name": "first fitted residual", "units": units}),
        "stream_last": ((site_dim,), stream.last, {"long_name": "latest fitted residual", "units": units}),
        "stream_lag_one": ((), float(stream.lag_one), {
            "long_name": "running sum of lag-one products of residual minus reference", "units": squared}),
        "stream_count": ((), int(stream.n_times), {"long_name": "times summed", "units": "1"}),
    }


def _var_of(state):
    from ..engine.forecast import VarModel

    if "var_coefficients" not in state:
        return None
    return VarModel(state["var_coefficients"].values, state["var_innovation_covariance"].values)


def _stream_of(state):
    from ..engine.streaming import RunningStatistics

    if "stream_gram" not in state:
        return None
    return RunningStatistics(
        n_times=int(state["stream_count"]), reference=state["stream_reference"].values,
        total=state["stream_sum"].values, gram=state["stream_gram"].values, lag_one=float(state["stream_lag_one"]),
        first=state["stream_first"].values, last=state["stream_last"].values)


def check_format(state, path):
    """Refuse a Dataset that is not an xadapter state of a format this version reads.

    Raises
    ------
    InputError
        No ``parameters`` attribute (not written by xadapter), a format newer than
        :data:`FORMAT_VERSION`, or required variables missing.
    """
    attrs = state.attrs
    if "parameters" not in attrs or "xadapter_version" not in attrs:
        raise InputError(
            f"{path} is not an xadapter file (no 'parameters'/'xadapter_version' attributes); "
            "load files written by SpatialAdapter.to_netcdf."
        )
    try:
        version = int(attrs.get("xadapter_format", 1))
    except (TypeError, ValueError):
        version = -1
    if not 1 <= version <= FORMAT_VERSION:
        raise InputError(
            f"{path} has state format {version if version != -1 else repr(attrs.get('xadapter_format'))} "
            f"(written by xadapter "
            f"{attrs['xadapter_version']}); this version ({__version__}) reads formats 1 to "
            f"{FORMAT_VERSION}: upgrade xadapter, or refit and save with this version."
        )
    missing = [name for name in REQUIRED_VARIABLES if name not in state.variables]
    missing += [name for name in ("time_dim", "site_dim", "space_dims", "geographic") if name not in attrs]
    if missing:
        raise InputError(
            f"{path} is an incomplete xadapter state: {missing} missing; the file is damaged or "
            "was edited: refit the adapter and save it again."
        )


def fitted_sites(state):
    """The :class:`Sites` of a state Dataset."""
    site_dim = state.attrs["site_dim"]
    if bool(state.attrs["geographic"]):
        lat = state[find_coordinate(state, LATITUDE_RULES)].values
        lon = state[find_coordinate(state, LONGITUDE_RULES)].values
        return Sites(True, lat=np.asarray(lat, dtype=np.float64), lon=np.asarray(lon, dtype=np.float64))
    return site_coordinates(state["mean"], site_dim, tuple(json.loads(state.attrs["space_dims"])))


def from_dataset(state, parameters):
    """The :class:`FittedModel` serialised in ``state`` (``parameters``: the model's)."""
    attrs = state.attrs
    kind = attrs.get("fine_scale", "none")
    fine = None
    if kind != "none":
        fine = FineScaleParams(kind, float(state["fine_partial_sill"]), float(state["fine_range"]),
                               float(state["noise_variance"]))
    history = {}
    for name in state.data_vars:
        if name.startswith("history_"):
            values = state[name].values
            key = name[len("history_"):]
            history[key] = values.astype(np.int64) if key == "iteration" else values
    selection = None
    if "selection_tau1" in state:
        selection = np.column_stack([state[f"selection_{name}"].values for name, _, _ in SELECTION_COLUMNS])
    calibration = None
    if "cv_squared_error" in state:
        by_distance = {key: state[f"calibration_{key}"].values
                       for key in ("coverage_model", "coverage_calibrated", "count")}
        by_distance["distance_km"] = state["calibration_distance"].values
        calibration = Calibration(
            squared_error=state["cv_squared_error"].values, model_variance=state["cv_model_variance"].values,
            count=state["cv_count"].values, distance_km=state["cv_distance"].values, by_distance=by_distance,
            crps=float(attrs["cv_crps"]), rmse=float(attrs["cv_rmse"]), coverage=float(attrs["cv_coverage"]),
        )
    n_eff = float(attrs["n_eff"]) if np.isfinite(attrs.get("n_eff", np.nan)) else None
    extension = json.loads(attrs["extension"]) if "extension" in attrs else {
        "method": parameters.get("extension", "auto"), "neighbors": parameters.get("extension_neighbors", 50),
        "smoothing": parameters.get("extension_smoothing", 0.3)}
    return FittedModel(
        basis=state["basis"].values, scores=state["scores"].values, mean=state["mean"].values,
        rotation=state["rotation"].values, eigenvalues=state["eigenvalues"].values,
        sample_eigenvalues=state["sample_eigenvalues"].values,
        low_rank_noise_variance=float(state["low_rank_noise_variance"]), fine=fine, sites=fitted_sites(state),
        trend_coefficients=state["trend_coefficients"].values if "trend_coefficients" in state else None,
        n_eff=n_eff, history=history, converged=bool(attrs["converged"]), n_iter=int(attrs["n_iter"]),
        skipped_loop=bool(attrs["skipped_loop"]), calibration=calibration, selection=selection,
        fine_neighbors=int(attrs.get("fine_neighbors", parameters.get("fine_neighbors", 30))),
        extension=extension, var=_var_of(state), stream=_stream_of(state),
    )
