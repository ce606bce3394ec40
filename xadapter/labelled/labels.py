"""Labelled data in and out: find the time dim, the space dims and the site coordinates.

Coordinates are detected by a small table of rules (names, CF ``standard_name``,
``units``), with explicit overrides ``time_dim=`` and ``space_dims=``. Gridded data
(``lat``/``lon`` dims in any order) is stacked to one ``space`` dim; station data keeps
its own dim. This module owns labels only; no maths happens here.
"""

from __future__ import annotations

import numpy as np
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
