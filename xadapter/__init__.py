"""xadapter: spatial adapters for the residuals of frozen forecast models, on xarray."""

__version__ = "0.1.0"
