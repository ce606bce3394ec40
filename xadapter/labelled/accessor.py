"""``.sadapter`` accessors on DataArray and Dataset: thin wrappers, no state, no maths.

xarray creates a new accessor object for every DataArray, so nothing is stored
here: ``fit`` returns the fitted :class:`~xadapter.SpatialAdapter`.
"""

from __future__ import annotations

import xarray as xr

from ..exceptions import InputError


def _model():
    # the model pulls in the engine (scipy); import it on first use, not with the package
    from .model import SpatialAdapter

    return SpatialAdapter


@xr.register_dataarray_accessor("sadapter")
class DataArrayAdapterAccessor:
    """Spatial adapter methods on a residual DataArray (``da.sadapter``)."""

    def __init__(self, obj):
        self._obj = obj

    def fit(self, covariates=None, **params):
        """Fit a :class:`SpatialAdapter` on this residual field and return it.

        ``params`` are the constructor parameters of :class:`SpatialAdapter`.
        """
        return _model()(**params).fit(self._obj, covariates=covariates)

    def krige(self, adapter, at=None, **kwargs):
        """Krige this field of observed residuals with a fitted ``adapter``.

        Same as ``adapter.krige(da, at=at, **kwargs)``.
        """
        if not isinstance(adapter, _model()):
            raise InputError("krige needs a fitted SpatialAdapter as its first argument.")
        return adapter.krige(self._obj, at=at, **kwargs)


@xr.register_dataset_accessor("sadapter")
class DatasetAdapterAccessor:
    """Spatial adapter methods on a Dataset of observations and predictions (``ds.sadapter``)."""

    def __init__(self, obj):
        self._obj = obj

    def residual(self, target, prediction=None):
        """The residual ``target - prediction`` (or ``target`` alone) as a DataArray."""
        ds = self._obj
        for name in (target, prediction):
            if name is not None and name not in ds.data_vars:
                raise InputError(f"{name!r} is not a variable of the Dataset (variables: {list(ds.data_vars)}).")
        if prediction is None:
            return ds[target]
        units_t, units_p = ds[target].attrs.get("units"), ds[prediction].attrs.get("units")
        if units_t and units_p and units_t != units_p:
            raise InputError(f"{target!r} is in {units_t!r} but {prediction!r} in {units_p!r}; convert one first.")
        residual = ds[target] - ds[prediction]
        residual.attrs = {"units": units_t or units_p or "", "long_name": f"residual of {prediction} against {target}"}
        return residual.rename(f"{target}_residual")

    def fit(self, target, prediction=None, covariates=None, **params):
        """Fit a :class:`SpatialAdapter` on ``target - prediction`` and return it.

        Parameters
        ----------
        target, prediction : str
            Names of the observed variable and of the first-stage prediction.
        covariates : list of str, optional
            Variables stacked along a new ``feature`` dim as residual-trend covariates.
        **params
            Constructor parameters of :class:`SpatialAdapter`. With ``task="binary"``
            ``target`` holds 0/1 labels and ``prediction`` the first-stage
            probabilities (or logits); the adapter is fitted on the logit-scale
            residual (:meth:`SpatialAdapter.residual`).
        """
        covariate_array = None
        if covariates:
            missing = [c for c in covariates if c not in self._obj.data_vars]
            if missing:
                raise InputError(f"covariates {missing} are not variables of the Dataset.")
            covariate_array = xr.concat([self._obj[c] for c in covariates], dim="feature").assign_coords(
                feature=list(covariates))
        model = _model()(**params)
        if params.get("task") == "binary":
            if prediction is None:
                raise InputError("task='binary' needs prediction=... (the first-stage probabilities or logits).")
            for name in (target, prediction):
                if name not in self._obj.data_vars:
                    raise InputError(f"{name!r} is not a variable of the Dataset (variables: {list(self._obj.data_vars)}).")
            return model.fit(model.residual(self._obj[target], self._obj[prediction]), covariates=covariate_array)
        return model.fit(self.residual(target, prediction), covariates=covariate_array)
