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


#: Entries of the row blocks in which numpy data are centred (32 MB of float64): no
#: centred copy of the whole field is made.
BLOCK_ENTRIES = 4_000_000


def centred_moments(data, mean, basis):
    """``Dc @ basis``, ``||Dc||_F^2``, ``sum_t <dc_t, dc_{t-1}>`` of ``Dc = data - mean``, finiteness.

    numpy: in blocks of rows (never a centred copy of the whole field); dask: one pass
    over the time chunks.

    Returns
    -------
    scores : ndarray, shape (T, K)
    total, lag_one : float
    finite : bool
        Whether every entry of ``data`` is finite.
    """
    if is_lazy(data):
        centred = data - mean
        scores, total, lag_one, finite = compute(centred @ basis, (centred**2).sum(),
                                                 (centred[1:] * centred[:-1]).sum(), np.isfinite(data).all())
        return scores, float(total), float(lag_one), bool(finite)
    n_times, n_sites = data.shape
    step = max(2, BLOCK_ENTRIES // max(n_sites, 1))
    scores = np.empty((n_times, basis.shape[1]))
    total = lag_one = 0.0
    previous = None
    finite = True
    for start in range(0, n_times, step):
        block = data[start:start + step] - mean
        scores[start:start + step] = block @ basis
        total += float(np.vdot(block, block))
        if previous is not None:
            lag_one += float(np.vdot(block[0], previous))
        lag_one += float(np.vdot(block[1:], block[:-1]))
        previous = block[-1].copy()
    return scores, total, lag_one, finite and bool(np.isfinite(total))
