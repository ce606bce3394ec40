"""Labelled data in and out: find the time dim, the space dims and the site coordinates.

Coordinates are detected by a small table of rules (names, CF ``standard_name``,
``units``), with explicit overrides ``time_dim=`` and ``space_dims=``. Gridded data
(``lat``/``lon`` dims in any order) is stacked to one ``space`` dim; station data keeps
its own dim. This module owns labels and is the one place that stacks and unstacks them; no maths
happens here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..exceptions import InputError, MissingCoordinateError
from ..engine.geometry import validate_latlon, validate_planar
from ..engine.sites import Sites

#: Name of the stacked site dim for gridded input.
STACKED_DIM = "space"

LATITUDE_RULES = {
    "names": ("lat", "latitude", "nav_lat", "lats", "y_lat"),
    "standard_name": ("latitude", "grid_latitude"),
    "units": ("degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"),
}
LONGITUDE_RULES = {
    "names": ("lon", "longitude", "nav_lon", "lons", "long", "x_lon"),
    "standard_name": ("longitude", "grid_longitude"),
    "units": ("degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"),
}
X_RULES = {"names": ("x", "easting", "projection_x_coordinate"), "standard_name": ("projection_x_coordinate",)}
Y_RULES = {"names": ("y", "northing", "projection_y_coordinate"), "standard_name": ("projection_y_coordinate",)}
TIME_NAMES = ("time", "t", "valid_time", "date", "datetime", "init_time")
LENGTH_UNITS_KM = {"m": 1e-3, "metre": 1e-3, "meter": 1e-3, "metres": 1e-3, "meters": 1e-3, "km": 1.0,
                   "kilometre": 1.0, "kilometer": 1.0, "kilometres": 1.0, "kilometers": 1.0}


def _matches(name, variable, rules):
    attrs = variable.attrs
    if str(name).lower() in rules["names"]:
        return True
    if str(attrs.get("standard_name", "")).lower() in rules.get("standard_name", ()):
        return True
    units = str(attrs.get("units", "")).lower().replace(" ", "_")
    return units in rules.get("units", ())


def find_coordinate(obj, rules):
    """Name of the first coordinate (or dim) of ``obj`` matching ``rules``, or None."""
    for name, variable in obj.coords.items():
        if _matches(name, variable, rules):
            return name
    return None


def find_time_dim(obj, time_dim=None):
    """The time dim of ``obj``: ``time_dim`` if given, else found by name or dtype."""
    if time_dim is not None:
        if time_dim not in obj.dims:
            raise InputError(
                f"time_dim={time_dim!r} is not a dim of the data (dims: {tuple(obj.dims)})."
            )
        return time_dim
    for name in obj.dims:
        if str(name).lower() in TIME_NAMES:
            return name
    for name in obj.dims:
        if name in obj.coords and np.issubdtype(obj[name].dtype, np.datetime64):
            return name
    raise InputError(
        f"no time dim found among {tuple(obj.dims)}; name it 'time' or pass time_dim='...'."
    )


def check_time_index(obj, time_dim, *, what="residuals"):
    """Refuse a duplicated or unordered time index along ``time_dim``.

    The fit reads time order (lag-1 autocorrelation for the effective sample size,
    contiguous mini-batches and time blocks) and one score per time label, so a time
    step given twice or times out of order would be fitted without a word and give
    wrong statistics. Times may increase or decrease, strictly. Without a time
    coordinate (positions only) there is nothing to check.
    """
    if time_dim not in obj.indexes:
        return
    index = obj.indexes[time_dim]
    duplicated = index[index.duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(str(_plain(t)) for t in duplicated[:5])
        more = f" and {len(duplicated) - 5} more" if len(duplicated) > 5 else ""
        raise InputError(
            f"the {what} have duplicated {time_dim!r} labels: {shown}{more}; each time step must "
            f"appear once: drop or average the repeats (e.g. .groupby({time_dim!r}).mean())."
        )
    if not (index.is_monotonic_increasing or index.is_monotonic_decreasing):
        values = np.asarray(index)
        forward = [bool(later > earlier) for earlier, later in zip(values[:-1], values[1:])]
        first = forward.index(not forward[0]) + 1
        raise InputError(
            f"the {what} have {time_dim!r} labels out of order (e.g. {_plain(values[first])} after "
            f"{_plain(values[first - 1])} at position {first}); the fit uses the time order: sort them "
            f"first with .sortby({time_dim!r})."
        )


def space_dims_of(obj, time_dim, space_dims=None, exclude=("feature",)):
    """The space dims of ``obj``: every dim but time (and ``exclude``) unless given."""
    if space_dims is not None:
        space_dims = (space_dims,) if isinstance(space_dims, str) else tuple(space_dims)
        missing = [d for d in space_dims if d not in obj.dims]
        if missing:
            raise InputError(f"space_dims {missing} are not dims of the data (dims: {tuple(obj.dims)}).")
        return space_dims
    dims = tuple(d for d in obj.dims if d != time_dim and d not in exclude)
    if not dims:
        raise InputError(f"the data has no space dim besides {time_dim!r}; it needs sites to fit a spatial basis.")
    if len(dims) > 2:
        raise InputError(
            f"found {len(dims)} candidate space dims {dims}; pass space_dims=(...) "
            "naming the one station dim or the two grid dims."
        )
    return dims


def stack_space(obj, space_dims):
    """Stack the space dims of ``obj`` to one site dim (no-op for one dim)."""
    if len(space_dims) == 1:
        return obj, space_dims[0]
    ordered = _grid_order(obj, space_dims)
    return obj.stack({STACKED_DIM: ordered}), STACKED_DIM


def _grid_order(obj, space_dims):
    # lat before lon, whatever order the input dims have, so that transposed grids
    # stack to the same site order
    lat_name = find_coordinate(obj, LATITUDE_RULES)
    y_name = find_coordinate(obj, Y_RULES)
    first = lat_name if lat_name in space_dims else y_name if y_name in space_dims else None
    if first is None:
        return tuple(sorted(space_dims))
    return (first,) + tuple(d for d in space_dims if d != first)


def site_coordinates(stacked, dim, space_dims, *, allow_duplicates=False, what="data"):
    """Find and validate the coordinates of the sites of ``stacked`` along ``dim``."""
    lat_name = find_coordinate(stacked, LATITUDE_RULES)
    lon_name = find_coordinate(stacked, LONGITUDE_RULES)
    if lat_name is not None and lon_name is not None:
        lat = _along(stacked, lat_name, dim, what)
        lon = _along(stacked, lon_name, dim, what)
        lat, lon = validate_latlon(lat, lon, allow_duplicates=allow_duplicates)
        return Sites(geographic=True, lat=lat, lon=lon)
    x_name = find_coordinate(stacked, X_RULES)
    y_name = find_coordinate(stacked, Y_RULES)
    if x_name is not None and y_name is not None:
        scale = _length_scale_km(stacked[x_name])
        xy = np.column_stack([_along(stacked, x_name, dim, what), _along(stacked, y_name, dim, what)]) * scale
        xy = validate_planar(xy, allow_duplicates=allow_duplicates)
        return Sites(geographic=False, xy_km=xy)
    raise MissingCoordinateError(
        f"no site coordinates found on the {what}: give lat/lon coordinates (degrees, names "
        "'lat'/'lon' or 'latitude'/'longitude', or CF standard_name/units) or projected "
        f"'x'/'y' coordinates in metres along the space dims {tuple(space_dims)}."
    )


def _along(obj, name, dim, what):
    coord = obj[name]
    if coord.dims != (dim,):
        raise MissingCoordinateError(
            f"coordinate {name!r} of the {what} has dims {coord.dims}; it must vary along the "
            f"site dim {dim!r} only."
        )
    return np.asarray(coord.values, dtype=np.float64)


def _length_scale_km(coord):
    units = str(coord.attrs.get("units", "m")).strip().lower()
    if units not in LENGTH_UNITS_KM:
        raise InputError(
            f"projected coordinate {coord.name!r} has units {units!r}; use metres ('m') or km."
        )
    return LENGTH_UNITS_KM[units]


def target_sites(at, *, what="targets"):
    """Coordinates of kriging targets given as a Dataset/DataArray of locations.

    The space dims of ``at`` are all its dims except a time dim if present.
    Returns the stacked template (a DataArray of zeros over the target sites, carrying
    the coordinates) and the :class:`Sites`.
    """
    if isinstance(at, xr.Dataset):
        template = xr.zeros_like(next(iter(at.data_vars.values()))) if at.data_vars else None
        if template is None:
            template = xr.DataArray(np.zeros(tuple(at.sizes.values())), dims=tuple(at.sizes), coords=at.coords)
    elif isinstance(at, xr.DataArray):
        template = xr.zeros_like(at, dtype=np.float64)
    else:
        raise InputError("`at` must be an xarray Dataset or DataArray of target locations with lat/lon or x/y coordinates.")
    dims = tuple(d for d in template.dims if str(d).lower() not in TIME_NAMES)
    template = template.isel({d: 0 for d in template.dims if d not in dims}, drop=True)
    if not dims:
        raise MissingCoordinateError("`at` has no space dims; give target locations along a station dim or a lat/lon grid.")
    stacked, dim = stack_space(template, dims)
    sites = site_coordinates(stacked, dim, dims, allow_duplicates=True, what=what)
    return stacked, sites


# ----------------------------------------------------------------------------- stacking


def stack_order(stacked, site_dim, space_dims):
    """The space dims in the order they were stacked (the MultiIndex levels)."""
    index = stacked.indexes.get(site_dim)
    if index is not None and hasattr(index, "levels"):
        return tuple(index.names)
    return tuple(space_dims)


def stacked_index(stacked, dim, space_dims):
    """The site labels of ``stacked`` along ``dim`` as a (Multi)Index over ``space_dims``.

    Grid labels come from the stacked MultiIndex, or from plain coordinates along
    ``dim`` once it was flattened (as in the saved state).
    """
    if len(space_dims) == 1:
        return pd.Index(stacked[dim].values)
    index = stacked.indexes.get(dim)
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_arrays([index.get_level_values(d) for d in space_dims])
    return pd.MultiIndex.from_arrays([stacked[d].values for d in space_dims])


def site_coords(stacked, site_dim):
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


def unstack(obj, site_dim, space_dims):
    """Unstack the site dim of ``obj`` back to ``space_dims`` (no-op for stations)."""
    if len(space_dims) == 1 or site_dim not in obj.dims:
        return obj
    order = []
    for dim in obj.dims:
        order.extend(space_dims if dim == site_dim else [dim])
    return obj.set_index({site_dim: list(space_dims)}).unstack(site_dim).transpose(*order)


def align_to_sites(obj, fitted_index, site_dim, space_dims, time_dim, *, what="observed"):
    """Stack ``obj`` and put its sites in the fitted order, NaN for fitted sites it lacks.

    Stays lazy on dask-backed input. Returns a ``(time, site_dim)`` DataArray whose site
    coordinate is the fitted position.
    """
    missing = [d for d in space_dims if d not in obj.dims]
    if missing:
        raise InputError(
            f"{what} lacks the fitted space dims {missing} (dims: {tuple(obj.dims)}); "
            "give observations on the fitted sites (NaN where unobserved)."
        )
    stacked, dim = stack_space(obj, space_dims)
    stacked = stacked.transpose(time_dim, dim)
    given_index = stacked_index(stacked, dim, space_dims)
    positions = fitted_index.get_indexer(given_index)
    if np.any(positions < 0):
        unknown = [_plain(given_index[i]) for i in np.flatnonzero(positions < 0)[:5]]
        raise InputError(
            f"{what} has sites that the adapter was not fitted on, e.g. {unknown}; "
            "krige new locations with at=... and give observations on fitted sites only."
        )
    plain = xr.DataArray(stacked.data, dims=(time_dim, site_dim),
                         coords={time_dim: stacked[time_dim].values, site_dim: positions}, attrs=obj.attrs)
    if len(positions) == len(fitted_index) and np.array_equal(positions, np.arange(len(positions))):
        return plain
    return plain.reindex({site_dim: np.arange(len(fitted_index))})


def _plain(value):
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value.item() if hasattr(value, "item") else value


def _stack_features(dataset):
    """A Dataset of one variable per covariate as one DataArray along ``feature``."""
    if not dataset.data_vars:
        raise InputError("covariates is an empty Dataset; give one variable per covariate.")
    # each variable keeps its own dims (a site-only elevation next to a (time, site)
    # temperature): broadcast them against each other before stacking
    variables = xr.broadcast(*[dataset[name].drop_vars(dataset[name].coords.keys() - dataset[name].dims)
                               for name in dataset.data_vars])
    return xr.concat(variables, dim="feature").assign_coords(feature=[str(name) for name in dataset.data_vars])


def covariate_array(covariates, stacked, time_dim, site_dim, space_dims, *, what="residuals"):
    """Covariates as (T, N, p), (T, p) or (N, p) numpy aligned with ``stacked``.

    Returns ``(feature values, array)``, or ``(None, None)`` without covariates.
    ``what`` names the data the covariates must cover, for the messages.
    """
    if covariates is None:
        return None, None
    if isinstance(covariates, xr.Dataset):
        covariates = _stack_features(covariates)
    if not isinstance(covariates, xr.DataArray):
        raise InputError(f"covariates must be an xarray.DataArray with a 'feature' dim or a Dataset of one "
                         f"variable per covariate, got {type(covariates).__name__}.")
    if "feature" not in covariates.dims:
        raise InputError(f"covariates need a 'feature' dim (dims: {tuple(covariates.dims)}).")
    allowed = (time_dim, "feature") + tuple(space_dims)
    unknown = [d for d in covariates.dims if d not in allowed]
    partial = [d for d in space_dims if d in covariates.dims]
    if unknown or (partial and len(partial) != len(space_dims)):
        raise InputError(
            f"covariates have dims {tuple(covariates.dims)} but the {what} are on "
            f"{(time_dim,) + tuple(space_dims)}; give covariates along 'feature' and {time_dim!r} "
            f"and/or all of the space dims {tuple(space_dims)} (rename or transpose them to match)."
        )
    has_time = time_dim in covariates.dims
    has_space = bool(partial)
    if has_time:
        if time_dim in covariates.indexes and time_dim in stacked.indexes:
            wanted = stacked.indexes[time_dim]
            positions = covariates.indexes[time_dim].get_indexer(wanted)
            if np.any(positions < 0):
                lacking = [str(_plain(wanted[i])) for i in np.flatnonzero(positions < 0)[:3]]
                raise InputError(
                    f"covariates do not cover the times of the {what} (e.g. {', '.join(lacking)} "
                    f"missing, {int((positions < 0).sum())} in all); give covariates at every time."
                )
            covariates = covariates.isel({time_dim: positions})
        if covariates.sizes[time_dim] != stacked.sizes[time_dim]:
            raise InputError(f"covariates have {covariates.sizes[time_dim]} times but the {what} "
                             f"{stacked.sizes[time_dim]}; give covariates at every time.")
    if has_space:
        cov_stacked, dim = stack_space(covariates, space_dims)
        index = stacked_index(cov_stacked, dim, space_dims)
        wanted = stacked_index(stacked, site_dim, space_dims) if site_dim in stacked.indexes else None
        if wanted is not None:
            positions = index.get_indexer(wanted)
            if np.any(positions < 0):
                raise InputError(f"covariates do not cover every site of the {what} (matched by space labels).")
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
    if "feature" in covariates.coords:
        features = [_plain(f) for f in covariates["feature"].values]
    else:
        features = list(range(covariates.sizes["feature"]))
    return features, array
