"""xadapter: spatial adapters for the residuals of frozen forecast models, on xarray.

Importing the package registers the ``.sadapter`` accessors on DataArray and Dataset.
"""

__version__ = "0.1.0"

from . import accessor as _accessor  # noqa: E402,F401  (registers .sadapter)
from .exceptions import (  # noqa: E402
    CoordinateError,
    DuplicateSiteError,
    InputError,
    MissingCoordinateError,
    NotFittedError,
    ProblemTooLargeError,
    XAdapterError,
)
from .model import SpatialAdapter, load  # noqa: E402

__all__ = [
    "SpatialAdapter",
    "load",
    "XAdapterError",
    "InputError",
    "CoordinateError",
    "MissingCoordinateError",
    "DuplicateSiteError",
    "ProblemTooLargeError",
    "NotFittedError",
    "__version__",
]
