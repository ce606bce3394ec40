"""xadapter: spatial adapters for the residuals of frozen forecast models, on xarray.

Importing the package registers the ``.sadapter`` accessors on DataArray and Dataset.
The model, the engine and the readers are imported on first use, so ``import
xadapter`` costs little more than importing xarray.

Layout: :mod:`xadapter.engine` (arrays only), :mod:`xadapter.labelled` (the model and
the accessors), :mod:`xadapter.io` (files), :mod:`xadapter.cli` (the command).
"""

import importlib

from ._version import __version__
from .exceptions import (
    CoordinateError,
    DuplicateSiteError,
    InputError,
    MissingCoordinateError,
    NotFittedError,
    ProblemTooLargeError,
    XAdapterError,
)
from .labelled import accessor as _accessor  # noqa: F401  (registers .sadapter)

#: Public names imported on first use: name -> (module, attribute or None for the module).
_LAZY = {
    "SpatialAdapter": ("xadapter.labelled.model", "SpatialAdapter"),
    "load": ("xadapter.labelled.model", "load"),
    "datasets": ("xadapter.datasets", None),
    "io": ("xadapter.io", None),
    "metrics": ("xadapter.engine.metrics", None),
    "plot": ("xadapter.plot", None),
    "engine": ("xadapter.engine", None),
}

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


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'xadapter' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
