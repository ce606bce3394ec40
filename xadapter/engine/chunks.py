"""numpy or dask: the few operations the engine needs on either.

The engine's arrays are ``(time, site)``; a dask array is chunked along time only
(each chunk holds every site). These helpers keep the numpy path exactly as it is
(no copies, same arithmetic) and express the dask path as reductions over time
chunks or as ``map_blocks`` over them.
"""

from __future__ import annotations

import numpy as np

from ..exceptions import InputError


def is_lazy(array):
    """Whether ``array`` is a dask (or other deferred) array."""
    return hasattr(array, "dask") or (hasattr(array, "compute") and not isinstance(array, np.ndarray))


def as_float_array(data):
    """``data`` as float64 (numpy without a copy when it already is; dask lazily).

    Dask arrays are rechunked so that every chunk holds all sites.
    """
    if is_lazy(data):
        if data.ndim != 2:
            raise InputError(f"data must be a 2-D (time, site) array, got {data.ndim} dimension(s).")
        if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
            raise InputError(f"data must be real numbers, got dtype {data.dtype}.")
        if len(data.chunks[1]) > 1:
            data = data.rechunk({1: -1})
        return data.astype(np.float64) if data.dtype != np.float64 else data
    array = np.asarray(data)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise InputError(f"data must be real numbers, got dtype {array.dtype}.")
    if array.ndim != 2:
        raise InputError(f"data must be a 2-D (time, site) array, got shape {array.shape}.")
    return np.asarray(array, dtype=np.float64)


def materialise(array):
    """A numpy float64 array of ``array`` (computed if lazy)."""
    if is_lazy(array):
        array = array.compute()
    return np.asarray(array, dtype=np.float64)


def compute(*arrays):
    """Values of several (possibly lazy) expressions, sharing one pass over the data."""
    if any(is_lazy(a) for a in arrays):
        import dask

        return tuple(np.asarray(v) for v in dask.compute(*arrays))
    return tuple(np.asarray(a) for a in arrays)


def time_blocks(data, batch=1):
    """numpy blocks of a dask ``data`` along time, ``batch`` chunks computed at a time.

    A fold over the blocks (e.g. accumulating a Gram matrix in place) then holds one
    accumulator and ``batch`` chunks, whatever the number of chunks: a reduction tree
    of per-chunk partial results would hold several accumulator-sized partials at once.
    """
    import dask

    blocks = list(data.to_delayed().ravel())
    for start in range(0, len(blocks), batch):
        yield from dask.compute(*blocks[start:start + batch])


def take_rows(data, rows=None):
    """Rows (times) of ``data`` as numpy: all of them when ``rows`` is None."""
    subset = data if rows is None else data[rows]
    return materialise(subset) if is_lazy(subset) else subset


def like(values, reference):
    """numpy ``values`` (T, ...) as a dask array chunked along time like ``reference``."""
    import dask.array as da

    return da.from_array(np.asarray(values), chunks=(reference.chunks[0],) + tuple((s,) for s in values.shape[1:]))


def map_time_blocks(kernel, data, n_targets):
    """Apply ``kernel(block) -> (mean, variance)`` to every time chunk of a dask ``data``.

    Returns two dask arrays ``(T, n_targets)`` chunked like ``data`` along time; they
    share one task per chunk, so computing both together runs the kernel once.
    """
    import dask.array as da

    def both(block):
        mean, variance = kernel(block)
        return np.stack([mean, variance], axis=-1)

    stacked = da.map_blocks(both, data, chunks=(data.chunks[0], (n_targets,), (2,)), new_axis=2,
                            dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64))
    return stacked[..., 0], stacked[..., 1]


def top_singular_value(centred):
    """Largest singular value of a (T, N) array (numpy: LAPACK; dask: Lanczos on chunks)."""
    if not is_lazy(centred):
        return float(np.linalg.svd(centred, compute_uv=False)[0])
    import scipy.sparse.linalg as spla

    n_sites = centred.shape[1]

    def gram(v):
        return materialise(centred.T @ materialise(centred @ v))

    operator = spla.LinearOperator((n_sites, n_sites), matvec=gram, dtype=np.float64)
    top = spla.eigsh(operator, k=1, which="LA", tol=1e-6, return_eigenvectors=False)[0]
    return float(np.sqrt(max(top, 0.0)))
