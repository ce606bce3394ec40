"""NetCDF writing that never leaves a half-written file.

:func:`atomic_to_netcdf` writes a Dataset to a temporary file in the destination
folder and renames it into place only when the write succeeded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..exceptions import InputError


def atomic_to_netcdf(dataset, path, **kwargs):
    """Write ``dataset`` to ``path`` atomically.

    The file is written next to the destination under a temporary name and renamed
    over ``path`` (``os.replace``) only after a complete write, so an exception or an
    interruption leaves no partial file and never clobbers an existing one.

    Parameters
    ----------
    dataset : xarray.Dataset
    path : str or os.PathLike
    **kwargs
        Passed to :meth:`xarray.Dataset.to_netcdf` (e.g. ``encoding``).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist.")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        dataset.to_netcdf(temporary, **kwargs)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
