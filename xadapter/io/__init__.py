"""Reading and writing files: atomic NetCDF writes and readers of station archives."""

from .netcdf import atomic_to_netcdf
from .weather2k import WEATHER2K_VARIABLES, read_weather2k

__all__ = ["atomic_to_netcdf", "read_weather2k", "WEATHER2K_VARIABLES"]
