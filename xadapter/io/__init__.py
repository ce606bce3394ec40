"""Reading and writing files: atomic NetCDF writes and readers of station archives.

Readers follow xarray's naming: ``open_*`` returns a lazy (dask-backed) Dataset.
"""

from .netcdf import atomic_to_netcdf
from .weather2k import WEATHER2K_VARIABLES, open_weather2k, read_weather2k

__all__ = ["atomic_to_netcdf", "open_weather2k", "read_weather2k", "WEATHER2K_VARIABLES"]
