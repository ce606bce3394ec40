"""The Weather2K station archive as a labelled, lazy Dataset.

The archive is a ``.npy`` array of shape ``(station, 3 + variables, time)``: latitude,
longitude and altitude rows followed by 20 hourly meteorological variables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..exceptions import InputError

#: Weather2K variables after the three position constants, with units.
WEATHER2K_VARIABLES = (
    ("ap", "air pressure", "hPa"),
    ("t", "air temperature", "degC"),
    ("mxt", "maximum temperature", "degC"),
    ("mnt", "minimum temperature", "degC"),
    ("dt", "dewpoint temperature", "degC"),
    ("rh", "relative humidity", "%"),
    ("wvp", "water vapour pressure", "hPa"),
    ("p1", "precipitation in 1 h", "mm"),
    ("p2", "precipitation in 3 h", "mm"),
    ("p3", "precipitation in 6 h", "mm"),
    ("p4", "precipitation in 12 h", "mm"),
    ("p5", "precipitation in 24 h", "mm"),
    ("wd", "wind direction", "degree"),
    ("ws", "wind speed", "m s-1"),
    ("mwd", "maximum wind direction", "degree"),
    ("mws", "maximum wind speed", "m s-1"),
    ("st", "land surface temperature", "degC"),
    ("hv1", "horizontal visibility in 1 min", "m"),
    ("hv2", "horizontal visibility in 10 min", "m"),
    ("vv", "vertical visibility", "m"),
)


def read_weather2k(path, variables=("t",), *, start="2017-01-01T00:00", freq="h", station_ids=None, chunks="auto"):
    """Read the Weather2K ``.npy`` station archive as a lazy labelled Dataset.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npy`` file, shape ``(station, 23, time)``: rows 0-2 are latitude
        (degrees), longitude (degrees) and altitude (m), rows 3-22 the hourly
        variables of :data:`WEATHER2K_VARIABLES`.
    variables : sequence of str or "all"
        Short names of the variables to read (e.g. ``"t"`` for air temperature).
    start : str
        Time stamp of the first step.
    freq : str
        pandas frequency of the time steps (hourly).
    station_ids : sequence, optional
        Labels of the stations (e.g. from ``idx2stat.txt``); default 0..N-1.
    chunks : dict or "auto" or None
        Dask chunks of the returned variables; None loads them into memory.

    Returns
    -------
    xarray.Dataset
        One ``(time, station)`` variable per requested name with CF units, and
        ``lat``, ``lon``, ``altitude`` station coordinates.
    """
    array = np.load(path, mmap_mode="r")
    if array.ndim != 3 or array.shape[1] != 3 + len(WEATHER2K_VARIABLES):
        raise InputError(
            f"{path} has shape {array.shape}; a Weather2K archive has shape "
            f"(station, {3 + len(WEATHER2K_VARIABLES)}, time)."
        )
    n_stations, _, n_times = array.shape
    names = [name for name, _, _ in WEATHER2K_VARIABLES]
    if variables == "all":
        variables = names
    unknown = [v for v in variables if v not in names]
    if unknown:
        raise InputError(f"unknown Weather2K variables {unknown}; choose from {names}.")
    # position constants are stored at every time step; take the first
    lat = np.asarray(array[:, 0, 0], dtype=np.float64)
    lon = np.asarray(array[:, 1, 0], dtype=np.float64)
    alt = np.asarray(array[:, 2, 0], dtype=np.float64)
    stations = np.arange(n_stations) if station_ids is None else np.asarray(station_ids)
    if len(stations) != n_stations:
        raise InputError(f"station_ids has {len(stations)} labels for {n_stations} stations.")
    coords = {
        "time": pd.date_range(start, periods=n_times, freq=freq),
        "station": stations,
        "lat": ("station", lat, {"units": "degrees_north", "standard_name": "latitude"}),
        "lon": ("station", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        "altitude": ("station", alt, {"units": "m", "standard_name": "height_above_mean_sea_level"}),
    }
    data_vars = {}
    for name in variables:
        index = 3 + names.index(name)
        long_name, units = dict((n, (l, u)) for n, l, u in WEATHER2K_VARIABLES)[name]
        values = array[:, index, :]
        if chunks is None:
            values = np.array(values.T, dtype=np.float64)
        else:
            import dask.array as da

            values = da.from_array(array, chunks=(n_stations, 1, "auto"))[:, index, :].T
            if isinstance(chunks, dict) and chunks:
                values = values.rechunk(tuple(chunks.get(d, -1) for d in ("time", "station")))
        data_vars[name] = (("time", "station"), values, {"units": units, "long_name": long_name})
    return xr.Dataset(data_vars, coords=coords, attrs={"source": "Weather2K", "source_file": str(path)})
