"""Where the ADMM keeps its per-entry state: ``(T, N)`` arrays in blocks of whole times.

The ADMM with gaps or a trend carries the filled residual, the split variable ``Z``,
the scaled dual ``U`` (and the observation mask) for every entry: three to four
times the data. A store holds them in blocks along time, one block per time chunk of
the input, and runs *kernels* on blocks: a kernel reads and updates one block's
arrays and returns a small result (column sums, squared norms), which the driver
reduces. Nothing but one block at a time, and the small results, is ever in the
driver's memory, except in :class:`MemoryStore`.

* :class:`MemoryStore` - numpy input: one block, the arrays themselves (no copies).
* :class:`DiskStore` - dask input on a local scheduler: each block's arrays are
  ``.npy`` files in a scratch directory (dask's ``temporary-directory`` setting, else
  the system's), read and written one block at a time; the directory is removed with
  the last reference to the store (arrays over it hold one).
* :class:`WorkerStore` - dask input under a ``dask.distributed`` client: each block
  lives on a worker (a future); kernels run where the block is. A worker lost
  mid-fit costs nothing but time when dask can recompute its blocks from their
  history of kernel calls (the same calls on the same values, so the same answer);
  when it cannot (a value shared with :meth:`WorkerStore.share` is gone with the
  worker), the fit stops with a :class:`WorkerLostError` naming the lost worker(s)
  and blocks, never with a wrong answer.

``store.array(name)`` gives a state variable as one ``(T, N)`` array (numpy for the
memory store, a dask array over the blocks otherwise) for the passes that read the
whole field (the basis step, means, the objective).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from operator import itemgetter

import numpy as np

from .chunks import is_lazy, time_blocks
from ..exceptions import WorkerLostError


#: Arguments of kernels larger than this are sent to the workers once per call
#: (:meth:`WorkerStore.share`); smaller ones travel with each task.
_SHARE_BYTES = 1_000_000


def block_rows(chunk_sizes):
    """Global row slices of consecutive blocks of ``chunk_sizes`` rows."""
    edges = np.concatenate([[0], np.cumsum(chunk_sizes)]).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def open_store(data, workspace=None, observed=None):
    """A store holding ``data`` (T, N) as its ``"data"`` variable.

    Parameters
    ----------
    data : ndarray or dask array
        numpy: a :class:`MemoryStore` of one block. dask (chunked along time only):
        a :class:`WorkerStore` when a ``dask.distributed`` client is the current
        scheduler, else a :class:`DiskStore` in ``workspace``.
    workspace : str, optional
        Parent directory of the disk store's scratch directory.
    observed : ndarray of bool, shape (T, N), optional
        numpy data: the observation mask when the caller has it (stored as
        ``"observed"``, not recomputed).
    """
    if not is_lazy(data):
        return MemoryStore(data, observed)
    client = _current_client()
    if client is not None:
        return WorkerStore(data, client)
    return DiskStore(data, workspace)


def _current_client():
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        client = default_client()
    except ValueError:
        return None
    import dask

    # a client that exists but is not the scheduler in use (scheduler="threads") is not asked
    scheduler = dask.config.get("scheduler", None)
    return client if scheduler in (None, "dask.distributed", "distributed") else None


class _Store:
    """Blocks along time; see the module docstring."""

    rows: list
    shape: tuple
    #: Variables known to be stored (the worker store does not track them).
    names = frozenset()

    def __len__(self):
        return len(self.rows)

    def overlapping(self, window):
        """``(block index, rows of the block inside window, global rows)`` for a global slice."""
        for index, rows in enumerate(self.rows):
            start, stop = max(rows.start, window.start), min(rows.stop, window.stop)
            if start < stop:
                yield index, slice(start - rows.start, stop - rows.start), slice(start, stop)

    def share(self, value):
        """``value`` as passed to kernels (the worker store ships it to the workers once)."""
        return value

    def reduce(self, kernel, indices=None, args=(), block_args=None, writes=(), reads=None):
        """The sum over blocks of the kernel's results (tuples summed entry by entry).

        Folded block by block, so one partial result is held at a time (a Gram matrix
        per block would otherwise be held for every block).
        """
        total = None
        for index in (range(len(self.rows)) if indices is None else indices):
            (part,) = self.apply(kernel, [index], args, block_args, writes, reads)
            total = add_results(total, part)
        return total

    def close(self):
        """Release the blocks."""


class MemoryStore(_Store):
    """One block: the arrays themselves, updated in place."""

    def __init__(self, data, observed=None):
        self.shape = data.shape
        self.rows = [slice(0, data.shape[0])]
        self.block = {"data": data} if observed is None else {"data": data, "observed": observed}

    @property
    def names(self):
        return set(self.block)

    def apply(self, kernel, indices=None, args=(), block_args=None, writes=(), reads=None):
        """``[kernel(block, rows, *block_args[i], *args) for each block]``.

        ``writes`` names the arrays the kernel updates (in place or by assignment) and
        ``reads`` those it needs (None: all); the memory store needs neither.
        """
        out = []
        for index in (range(len(self.rows)) if indices is None else indices):
            extra = () if block_args is None else block_args[index]
            out.append(kernel(self.block, self.rows[index], *extra, *args))
        return out

    def array(self, name):
        return self.block[name]


class DiskStore(_Store):
    """Blocks as ``.npy`` files, one block in memory at a time."""

    def __init__(self, data, workspace=None):
        import dask

        parent = workspace or dask.config.get("temporary-directory", None) or None
        self.directory = tempfile.mkdtemp(prefix="xadapter-state-", dir=parent)
        # removed with the last reference to the store (arrays over it hold one), and at exit
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self.shape = data.shape
        self.rows = block_rows(data.chunks[0])
        self.names = set()
        try:
            for index, block in enumerate(time_blocks(data)):
                self._save(index, {"data": np.asarray(block, dtype=np.float64)}, ("data",))
        except BaseException:
            self.close()
            raise

    def _path(self, name, index):
        return os.path.join(self.directory, f"{name}-{index}.npy")

    def _save(self, index, block, names):
        for name in (n for n in names if n in block):
            self.names.add(name)
            np.save(self._path(name, index), block[name], allow_pickle=False)

    def _load(self, index, reads=None):
        names = self.names if reads is None else self.names & set(reads)
        return {name: np.load(self._path(name, index)) for name in names}

    def read(self, name, index):
        """One block's array ``name`` (used by :meth:`array`'s tasks)."""
        return np.load(self._path(name, index))

    def apply(self, kernel, indices=None, args=(), block_args=None, writes=(), reads=None):
        out = []
        for index in (range(len(self.rows)) if indices is None else indices):
            block = self._load(index, reads)
            extra = () if block_args is None else block_args[index]
            out.append(kernel(block, self.rows[index], *extra, *args))
            self._save(index, block, writes)
            del block
        return out

    def array(self, name):
        import dask
        import dask.array as da

        parts = []
        for index, rows in enumerate(self.rows):
            # the task holds the store, so the files live as long as any array over them
            load = dask.delayed(self.read, pure=False)(name, index)
            dtype = bool if name == "observed" else np.float64
            parts.append(da.from_delayed(load, shape=(rows.stop - rows.start, self.shape[1]), dtype=dtype))
        return da.concatenate(parts, axis=0)

    def __getstate__(self):
        # a copy (in another process) reads the files but never removes them
        return {key: value for key, value in self.__dict__.items() if key != "_cleanup"}

    def close(self):
        self._cleanup()


def add_results(a, b):
    """``a + b`` for kernel results: numbers, arrays, None, or tuples of them (entry by entry)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(add_results(x, y) for x, y in zip(a, b))
    return a + b


def _run_kernel(block, rows, kernel, writes, extra, args):
    """Worker side of :meth:`WorkerStore.apply`: blocks held by the cluster are never
    modified in place (a task may be run twice), so the written arrays are copied."""
    block = {name: (value.copy() if name in writes else value) for name, value in block.items()}
    result = kernel(block, rows, *extra, *args)
    return block, result


class WorkerStore(_Store):
    """Blocks as futures on the workers of a ``dask.distributed`` client."""

    def __init__(self, data, client):
        self.client = client
        self.shape = data.shape
        self.rows = block_rows(data.chunks[0])
        # should the state be lost, the message names the workers gone since
        self.workers_at_start = set(client.nthreads())
        chunks = client.compute(list(data.to_delayed().ravel()))
        self.blocks = [client.submit(_as_block, chunk, pure=False) for chunk in chunks]
        del chunks

    def share(self, value):
        # small values travel inside the task messages; large ones go to every worker once
        if value is None or np.isscalar(value) or getattr(value, "nbytes", _SHARE_BYTES + 1) <= _SHARE_BYTES:
            return value
        # not kept here: the tasks that take it hold it, and it is released after them
        return self.client.scatter(value, broadcast=True, hash=False)

    def apply(self, kernel, indices=None, args=(), block_args=None, writes=(), reads=None):
        indices = range(len(self.rows)) if indices is None else list(indices)
        pairs = []
        for index in indices:
            extra = () if block_args is None else block_args[index]
            pairs.append(self.client.submit(_run_kernel, self.blocks[index], self.rows[index], kernel,
                                            tuple(writes), extra, args, pure=False))
        results = []
        for index, pair in zip(indices, pairs):
            self.blocks[index] = self.client.submit(itemgetter(0), pair, pure=False)
            results.append(self.client.submit(itemgetter(1), pair, pure=False))
        return self._gather(results, indices)

    def reduce(self, kernel, indices=None, args=(), block_args=None, writes=(), reads=None):
        """As :meth:`_Store.reduce`, summed pairwise on the workers: one result comes back."""
        indices = range(len(self.rows)) if indices is None else list(indices)
        parts = []
        for index in indices:
            extra = () if block_args is None else block_args[index]
            pair = self.client.submit(_run_kernel, self.blocks[index], self.rows[index], kernel,
                                      tuple(writes), extra, args, pure=False)
            if writes:
                self.blocks[index] = self.client.submit(itemgetter(0), pair, pure=False)
            parts.append(self.client.submit(itemgetter(1), pair, pure=False))
        while len(parts) > 1:
            parts = [self.client.submit(add_results, *parts[i:i + 2], pure=False) if i + 1 < len(parts)
                     else parts[i] for i in range(0, len(parts), 2)]
        return self._gather(parts[0], indices) if parts else None

    def _gather(self, futures, indices):
        """``client.gather(futures)``, the results of kernels on the blocks ``indices``.

        Raises
        ------
        WorkerLostError
            A worker left and took with it values the blocks need that dask cannot
            recompute (it then cancels the futures, or gives up on a task that
            killed its workers): the message names the workers gone and the blocks.
        """
        from concurrent.futures import CancelledError

        from distributed import KilledWorker

        try:
            return self.client.gather(futures)
        except (CancelledError, KilledWorker) as error:
            raise WorkerLostError(self._lost_message(indices, error)) from error

    def _lost_message(self, indices, error):
        try:
            gone = sorted(self.workers_at_start - set(self.client.nthreads()))
        except Exception:  # the scheduler itself may be unreachable: the message goes without
            gone = []
        workers = f"worker(s) {', '.join(gone)}" if gone else "a worker"
        rows = [self.rows[i] for i in indices]
        shown = ", ".join(f"{r.start}-{r.stop - 1}" for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        return (f"the fit lost part of its iterative state on the dask.distributed cluster: {workers} left "
                f"holding values needed by the blocks of time rows {shown}, and dask cannot recompute them "
                f"({type(error).__name__}: {error}). Nothing was returned; run the fit again on a healthy "
                "cluster (or without a distributed Client, on the local scheduler).")

    def array(self, name):
        import dask.array as da

        dtype = bool if name == "observed" else np.float64
        parts = [da.from_delayed(self.client.submit(itemgetter(name), block, pure=False),
                                 shape=(rows.stop - rows.start, self.shape[1]), dtype=dtype)
                 for block, rows in zip(self.blocks, self.rows)]
        return da.concatenate(parts, axis=0)

    def close(self):
        self.blocks = []


def _as_block(chunk):
    return {"data": np.asarray(chunk, dtype=np.float64)}
