"""The Weather2K station archive as a labelled, lazy Dataset.

The archive is a ``.npy`` array of shape ``(station, 3 + variables, time)``: latitude,
longitude and altitude rows followed by 20 hourly meteorological variables (1866
Chinese stations in the published file). :func:`open_weather2k` memory-maps the file
and wraps each requested variable in a dask array, so nothing is read until a value
is computed, and only the rows and time steps that are needed.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
import pandas as pd
import xarray as xr

from ..exceptions import InputError

#: Weather2K variables after the three position constants, with units: the variable
#: of name ``WEATHER2K_VARIABLES[i][0]`` is row ``FIRST_VARIABLE_ROW + i`` of the archive.
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

#: Rows 0-2 of the archive: latitude, longitude, altitude (constant over time).
POSITION_ROWS = 3
#: Row of the first meteorological variable.
FIRST_VARIABLE_ROW = POSITION_ROWS
#: Rows per station in the published layout.
N_ROWS = POSITION_ROWS + len(WEATHER2K_VARIABLES)

_NAMES = tuple(name for name, _, _ in WEATHER2K_VARIABLES)


class _ArchiveRow:
    """One variable of the archive as a ``(time, station)`` array read on demand.

    Dask reads chunks through ``__getitem__``. The memory map is opened on first
    access in each process and left out of pickles, so a task sent to a
    dask.distributed worker carries the file name, not the data (pickling a
    ``np.memmap`` would copy the whole archive).
    """

    def __init__(self, path, row, shape, dtype):
        self.path = path
        self.row = row
        self.shape = shape  # (time, station)
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self._map = None

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def __getitem__(self, key):
        if self._map is None:
            self._map = np.load(self.path, mmap_mode="r")
        time_key, station_key = key
        # copy: a chunk must not keep the file mapped after it is computed
        return np.array(self._map[station_key, self.row, time_key].T)


def _rows(variables):
    """The archive rows of ``variables`` (names, row indices, "all"), in the order given."""
    if isinstance(variables, str) and variables == "all":
        return list(range(FIRST_VARIABLE_ROW, N_ROWS))
    if isinstance(variables, (str, numbers.Integral)):
        variables = [variables]
    try:
        variables = list(variables)
    except TypeError:
        raise InputError(
            f"variables must be short names (e.g. 't', 'rh'), row indices {FIRST_VARIABLE_ROW}-{N_ROWS - 1} "
            f"or 'all', got {variables!r}."
        ) from None
    if not variables:
        raise InputError("variables is empty; name at least one Weather2K variable (e.g. 't'), or 'all'.")
    rows = []
    for item in variables:
        if isinstance(item, str):
            if item not in _NAMES:
                raise InputError(f"unknown Weather2K variables [{item!r}]; choose from {list(_NAMES)}.")
            row = FIRST_VARIABLE_ROW + _NAMES.index(item)
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            row = int(item)
            if not FIRST_VARIABLE_ROW <= row < N_ROWS:
                hint = (" (rows 0-2 are latitude, longitude and altitude: they are the lat, lon and altitude "
                        "coordinates of every variable)" if 0 <= row < FIRST_VARIABLE_ROW else "")
                raise InputError(
                    f"Weather2K row index {row} is not a variable{hint}; variable rows are "
                    f"{FIRST_VARIABLE_ROW}-{N_ROWS - 1} ({FIRST_VARIABLE_ROW} = {_NAMES[0]!r}, "
                    f"{N_ROWS - 1} = {_NAMES[-1]!r})."
                )
        else:
            raise InputError(
                f"Weather2K variable {item!r} is neither a short name (e.g. 't') nor a row index "
                f"{FIRST_VARIABLE_ROW}-{N_ROWS - 1}."
            )
        if row in rows:
            raise InputError(f"Weather2K variable {_NAMES[row - FIRST_VARIABLE_ROW]!r} (row {row}) is requested twice.")
        rows.append(row)
    return rows


def _time_chunks(chunks):
    """``chunks`` as dask chunks of a ``(time, station)`` array, stations whole by default."""
    if chunks == "auto":
        # the engine needs every site of a time step in one chunk
        return ("auto", -1)
    if isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool) and chunks > 0:
        return (int(chunks), -1)
    if isinstance(chunks, dict):
        unknown = [dim for dim in chunks if dim not in ("time", "station")]
        if unknown:
            raise InputError(f"chunks has dims {unknown} that a Weather2K Dataset lacks; use 'time' and 'station'.")
        return (chunks.get("time", "auto"), chunks.get("station", -1))
    raise InputError(
        f"chunks must be 'auto', a positive number of time steps, a dict like {{'time': 744}} or None "
        f"(load into memory), got {chunks!r}."
    )


def open_weather2k(path, variables=("t",), *, start="2017-01-01T00:00", freq="h", station_ids=None, chunks="auto"):
    """Open the Weather2K ``.npy`` station archive as a lazy labelled Dataset.

    The file is memory-mapped and each variable is a dask array over time chunks:
    opening costs no reading beyond the station positions, and computing a value
    reads only the rows and time steps it needs.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npy`` file, shape ``(station, 23, time)``: rows 0-2 are latitude
        (degrees), longitude (degrees) and altitude (m), rows 3-22 the hourly
        variables of :data:`WEATHER2K_VARIABLES` in that order.
    variables : str, int, sequence of str or int, or "all", default ("t",)
        Variables to read, by short name (``"t"`` air temperature, ``"rh"``
        relative humidity, ...) or by row index of the published layout (3-22;
        e.g. 4 is ``"t"``). Names and indices may be mixed; the Dataset's
        variables carry the short names in the order given.
    start : str or datetime-like, default "2017-01-01T00:00"
        Time stamp of the first step.
    freq : str, default "h"
        pandas frequency of the time steps (hourly in the published file).
    station_ids : sequence, optional
        Labels of the stations (e.g. from ``idx2stat.txt``); default 0..N-1.
    chunks : "auto", int, dict or None, default "auto"
        Dask chunks of the variables: ``"auto"`` (dask's chunk size along time,
        every station in each chunk, as the engine expects), a number of time
        steps, a dict ``{"time": n, "station": m}``, or None to load the
        variables into memory as numpy arrays.

    Returns
    -------
    xarray.Dataset
        One ``(time, station)`` variable per requested name, in the file's dtype,
        with ``units`` and ``long_name``, and ``lat``, ``lon``, ``altitude``
        station coordinates with CF attributes.

    Raises
    ------
    InputError
        If the file is missing or not of the Weather2K layout, a variable name or
        row index is unknown, or ``start``/``freq``/``station_ids``/``chunks``
        are invalid.

    Examples
    --------
    >>> ds = open_weather2k("weather2k.npy", variables=["t", "rh"])  # doctest: +SKIP
    >>> ds = open_weather2k("weather2k.npy", variables=[4, 8])       # the same, by row  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file; pass the path of the Weather2K .npy archive.")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path} as a .npy array ({error}); is it the Weather2K archive?") from None
    if array.ndim != 3 or array.shape[1] != N_ROWS:
        raise InputError(
            f"{path} has shape {array.shape}; a Weather2K archive has shape (station, {N_ROWS}, time)."
        )
    rows = _rows(variables)
    n_stations, _, n_times = array.shape
    try:
        times = pd.date_range(start, periods=n_times, freq=freq)
    except (ValueError, TypeError) as error:
        raise InputError(f"cannot build the time stamps from start={start!r}, freq={freq!r}: {error}") from None
    stations = np.arange(n_stations) if station_ids is None else np.asarray(station_ids)
    if stations.shape != (n_stations,):
        raise InputError(f"station_ids has {stations.size} labels for {n_stations} stations.")
    # position constants are stored at every time step; the first one is enough
    lat, lon, alt = (np.asarray(array[:, row, 0], dtype=np.float64) for row in range(POSITION_ROWS))
    coords = {
        "time": times,
        "station": stations,
        "lat": ("station", lat, {"units": "degrees_north", "standard_name": "latitude"}),
        "lon": ("station", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        "altitude": ("station", alt, {"units": "m", "standard_name": "height_above_mean_sea_level"}),
    }
    dask_chunks = None if chunks is None else _time_chunks(chunks)
    data_vars = {}
    for row in rows:
        name, long_name, units = WEATHER2K_VARIABLES[row - FIRST_VARIABLE_ROW]
        if dask_chunks is None:
            values = np.array(array[:, row, :].T)
        else:
            import dask.array as da

            source = _ArchiveRow(path, row, (n_times, n_stations), array.dtype)
            values = da.from_array(source, chunks=dask_chunks, name=f"weather2k-{name}-{_token(path)}",
                                   asarray=False, fancy=False)
        data_vars[name] = (("time", "station"), values, {"units": units, "long_name": long_name, "weather2k_row": row})
    del array  # the coordinates are copies; let the map of the whole file go
    return xr.Dataset(data_vars, coords=coords, attrs={"source": "Weather2K", "source_file": path})


def _token(path):
    """A dask name part that changes when the file does (so stale results are not reused)."""
    stat = os.stat(path)
    from dask.base import tokenize

    return tokenize(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


#: The former name of :func:`open_weather2k` (same signature).
read_weather2k = open_weather2k
