"""Arrays that depend on site locations only, kept by content for reuse.

The same sites and targets are kriged under many fine-scale models in the rank search
and the site cross-validation, and the basis is re-extended to the same held-out sites
for every candidate: neighbour lists, distances within neighbourhoods, variogram pair
samples and the factorised thin-plate system of a set of sites (not the model) are much
of the cost of each. :data:`GEOMETRY_CACHE` keeps them; :func:`clear_geometry_cache`
drops them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class GeometryCache:
    """Tuples of arrays keyed by a digest of the arrays (and settings) they derive from.

    Entries are read-only and dropped oldest first beyond ``total_bytes``; results above
    ``max_bytes`` are not kept.
    """

    def __init__(self, total_bytes, max_bytes):
        self.total_bytes, self.max_bytes = total_bytes, max_bytes
        self.entries = OrderedDict()
        self.held_bytes = 0  # of all entries: kept as they come and go, not summed on each insert
        self.lock = threading.Lock()

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.held_bytes = 0

    @staticmethod
    def key(*parts):
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            if isinstance(part, np.ndarray):
                digest.update(np.ascontiguousarray(part).tobytes())
                digest.update(str((part.shape, part.dtype.str)).encode())
            else:
                digest.update(repr(part).encode())
        return digest.digest()

    def get(self, key, expected_bytes, compute):
        """The cached result of ``compute()`` (a tuple of arrays) under ``key``."""
        if expected_bytes > self.max_bytes:
            return compute()
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        result = compute()
        for array in result:
            array.setflags(write=False)
        with self.lock:
            if key not in self.entries:  # another thread may have stored it meanwhile
                self.entries[key] = result
                self.held_bytes += _size(result)
            while self.held_bytes > self.total_bytes:
                self.held_bytes -= _size(self.entries.popitem(last=False)[1])
        return result


def _size(entry):
    return sum(array.nbytes for array in entry)


#: The process-wide cache, 128 MB in all, 16 MB an entry at most.
GEOMETRY_CACHE = GeometryCache(128_000_000, 16_000_000)


def clear_geometry_cache():
    """Drop the cached neighbour lists, pair samples, distances and thin-plate factors.

    They are kept by content and reused by later fits on the same sites; clearing them
    frees their memory (128 MB at most) and makes the next fit pay for its geometry, as
    the first fit in a process does (benchmarks time such cold fits).
    """
    GEOMETRY_CACHE.clear()
