"""Shared helpers of the benchmark scripts: machine line, timing, memory, tables.

Every script of ``benchmarks/`` prints markdown tables headed by the line of
:func:`machine_line` (CPU count, BLAS and its threads, library versions), so that a
table pasted into ``docs/benchmarks.md`` says where it was measured. Times are taken
as wall time and as CPU time of the whole process (``time.process_time``, which adds
up every thread, BLAS threads included): on a shared machine CPU time is the steadier
of the two, and ratios are given on it.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

#: Seconds to wait before a timed call. OpenBLAS worker threads keep spinning for about
#: 0.1 s after a multi-threaded call returns; the next call's process CPU time would
#: count them (measured: twice the thread time of a one-thread fit right after a
#: 300 x 300 product, the same after a 0.2 s pause).
SETTLE_SECONDS = 0.25

#: Libraries whose versions the machine line reports, when installed.
LIBRARIES = ("xadapter", "numpy", "scipy", "xarray", "xeofs", "gstools", "pykrige", "dask")


@dataclass
class Timing:
    """Wall and CPU seconds of one call, and its result."""

    wall: float
    cpu: float
    result: object = None


def timed(function, *args, **kwargs):
    """Run ``function(*args, **kwargs)`` once and time it.

    Returns
    -------
    Timing
        Wall time (``time.perf_counter``), CPU time of the process (all threads,
        ``time.process_time``) and the function's result. Starts after
        :data:`SETTLE_SECONDS`, so that threads left spinning by earlier work are not
        billed to this call.
    """
    gc.collect()
    time.sleep(SETTLE_SECONDS)
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, result)


def repeated(function, repeats, *args, **kwargs):
    """Median wall and CPU time over ``repeats`` runs, with the last run's result."""
    runs = [timed(function, *args, **kwargs) for _ in range(max(1, repeats))]
    return Timing(float(np.median([r.wall for r in runs])), float(np.median([r.cpu for r in runs])),
                  runs[-1].result)


def _status_kib(key):
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(function, *args, **kwargs):
    """Peak resident memory added by one call, in MiB, and its result.

    Resets the process's high-water mark (``/proc/self/clear_refs``) before the call
    and reads ``VmHWM`` after it, so the peak counts every allocation (numpy, BLAS
    work space, threads), not only Python's. Falls back to ``tracemalloc`` (Python
    allocations only) where ``/proc`` is not writable.

    Returns
    -------
    (float, object)
        Peak minus the resident size before the call (MiB), and the result.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_kib("VmRSS")
        result = function(*args, **kwargs)
        return (_status_kib("VmHWM") - before) / 1024.0, result
    except (OSError, TypeError):
        import tracemalloc

        tracemalloc.start()
        result = function(*args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 2**20, result


def _blas_description():
    """BLAS library, version and thread count (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return "unknown BLAS"
    return ", ".join(f"{p['internal_api']} {p.get('version') or ''} ({p['num_threads']} threads)".replace("  ", " ")
                     for p in pools)


def library_versions(names=LIBRARIES):
    """``name version`` of each installed library of ``names``."""
    found = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found.append(f"{name} {getattr(module, '__version__', '?')}")
    return ", ".join(found)


def machine_line():
    """One line describing where a table was measured (CPUs, BLAS, versions, date)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {usable} usable CPUs of {os.cpu_count()} ({platform.machine()}), "
            f"BLAS {_blas_description()}; Python {platform.python_version()}; {library_versions()}; "
            f"{dt.date.today().isoformat()}")


def markdown_table(header, rows):
    """A markdown table: ``header`` a list of column titles, ``rows`` lists of cells.

    Cells are printed as given (format numbers before); the first column is left
    aligned, the others right aligned.
    """
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits=3):
    """A number for a table: ``digits`` significant figures, "–" for NaN or None."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def ratio(ours, peer):
    """``ours / peer`` formatted as ``0.12x``, "–" when undefined."""
    if peer is None or ours is None or not np.isfinite(peer) or peer <= 0:
        return "–"
    return f"{ours / peer:.3g}x"


def verdict(met):
    """"met" or "MISSED" for a target."""
    return "met" if met else "MISSED"
