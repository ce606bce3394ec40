"""Benchmark of the Phi-step at tau1 = tau2 = 0 (plain EOF analysis).

Compares, on the same data and in the same run,

* ``xadapter.basis.solve_basis`` (``method="auto"``),
* ``numpy.linalg.svd(Dc, full_matrices=False)`` of the centred data (the reference),
* xeofs' ``EOF`` (``use_coslat=False``, ``standardize=False``) on a DataArray,

for wall time (best of ``--repeat`` runs), peak Python allocation (``tracemalloc``, a
separate run) and the subspace distance ``||P - P_svd||_F`` of the leading ``rank``
patterns to the SVD's.

The data are a smooth low-rank field (``--signal-rank`` Gaussian bumps on a random
set of sites, geometrically decaying variances) plus white noise, so that the leading
patterns are well defined.

Run by hand::

    python benchmarks/bench_basis.py            # T = 2000, N = 10,000, rank 10
    python benchmarks/bench_basis.py --times 500 --sites 3000 --no-svd
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import numpy as np

from xadapter.engine.basis import solve_basis, subspace_distance


def make_data(n_times, n_sites, signal_rank, noise, seed):
    """Low-rank smooth field plus white noise, shape (T, N), with a non-zero mean."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0.0, 1.0, size=(n_sites, 2))
    centres = rng.uniform(0.0, 1.0, size=(signal_rank, 2))
    widths = rng.uniform(0.1, 0.3, size=signal_rank)
    distance2 = ((coords[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    patterns = np.linalg.qr(np.exp(-distance2 / widths**2))[0]
    std = np.sqrt(n_sites) * 0.8 ** np.arange(signal_rank)
    scores = rng.standard_normal((n_times, signal_rank)) * std
    data = scores @ patterns.T
    data += noise * rng.standard_normal((n_times, n_sites))
    data += rng.standard_normal(n_sites)
    return data


def run_ours(data, rank):
    return solve_basis(data, rank)


def run_svd(data, rank):
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:rank].T


def _xeofs_eof_class():
    import xeofs

    single = getattr(xeofs, "single", None)
    if single is not None and hasattr(single, "EOF"):
        return single.EOF, f"xeofs {xeofs.__version__} (xeofs.single.EOF)"
    return xeofs.models.EOF, f"xeofs {xeofs.__version__} (xeofs.models.EOF)"


def make_xeofs_runner():
    import xarray as xr

    eof_class, label = _xeofs_eof_class()

    def run_xeofs(data, rank):
        n_times, n_sites = data.shape
        array = xr.DataArray(data, dims=("time", "space"),
                             coords={"time": np.arange(n_times), "space": np.arange(n_sites)})
        model = eof_class(n_modes=rank, use_coslat=False, standardize=False)
        model.fit(array, dim="time")
        return model.components().transpose("space", "mode").values

    return run_xeofs, label


def measure(function, data, rank, repeat):
    """(best wall time in s, peak traced allocation in MB, result)."""
    best = np.inf
    result = None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = function(data, rank)
        best = min(best, time.perf_counter() - start)
    gc.collect()
    tracemalloc.start()
    function(data, rank)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 2**20, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=2000, help="T, time steps (default 2000)")
    parser.add_argument("--sites", type=int, default=10000, help="N, sites (default 10000)")
    parser.add_argument("--rank", type=int, default=10, help="number of patterns (default 10)")
    parser.add_argument("--signal-rank", type=int, default=20, help="rank of the true signal (default 20)")
    parser.add_argument("--noise", type=float, default=1.0, help="noise standard deviation (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-svd", action="store_true", help="skip the full SVD (reference from ours)")
    parser.add_argument("--no-xeofs", action="store_true", help="skip xeofs")
    args = parser.parse_args(argv)

    data = make_data(args.times, args.sites, args.signal_rank, args.noise, args.seed)
    print(f"data: T = {args.times}, N = {args.sites}, rank = {args.rank}, "
          f"{data.nbytes / 2**20:.0f} MB float64; tau1 = tau2 = 0")

    runs = [("xadapter solve_basis", run_ours)]
    if not args.no_svd:
        runs.append(("numpy.linalg.svd", run_svd))
    if not args.no_xeofs:
        run_xeofs, label = make_xeofs_runner()
        runs.append((label, run_xeofs))

    results = {}
    for name, function in runs:
        results[name] = measure(function, data, args.rank, args.repeat)

    reference_name = "numpy.linalg.svd" if not args.no_svd else "xadapter solve_basis"
    reference = results[reference_name][2]
    header = f"{'method':<34} {'time (s)':>9} {'peak (MB)':>10} {'dist to ' + ('SVD' if not args.no_svd else 'ours'):>12}"
    print(header)
    print("-" * len(header))
    for name, (seconds, peak, basis) in results.items():
        distance = subspace_distance(basis, reference)
        print(f"{name:<34} {seconds:>9.3f} {peak:>10.1f} {distance:>12.2e}")


if __name__ == "__main__":
    main()
