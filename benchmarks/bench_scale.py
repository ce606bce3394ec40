"""Scaling of fitting and kriging with the size of dask-backed NetCDF inputs.

For each number of stations ``N`` (``--sizes``) and ``T`` time steps (``--times``) a
synthetic residual field is written to a NetCDF file chunk by chunk (the writer never
holds the whole array), then a fresh Python process opens it with
``xr.open_dataset(path, chunks={"time": C})`` (``C`` such that a chunk holds about
``--chunk-mb`` MB) and runs

* ``SpatialAdapter(rank=10, penalty="graph", tau1=TAU1, progress=False).fit(field)``,
* ``adapter.krige(observed, at=targets)`` with ``observed`` the last 24 time steps of
  the file and 10,000 random target locations inside the station box, computed to
  numpy.

Each size runs in its own process, so that its peak resident set size
(``VmHWM`` of ``/proc/self/status``) belongs to that size alone; the resident set
size before the fit (after the imports and the opening of the file) is printed next to
it. The fit is also timed by phase (penalty, ADMM/Phi-step, covariance, fine scale,
site cross-validation), by wrapping the steps of :mod:`xadapter.engine.pipeline`.

The field: stations uniformly at random in a mid-latitude box (30-45 N, 110-90 W),
four smooth Gaussian-bump patterns (300 km scale, unit norm), AR(1) scores
(coefficient 0.8) with standard deviations ``sqrt(N) * (1, 0.7, 0.5, 0.35)`` (so that
the signal per station, and the signal-to-noise ratio, do not change with ``N``),
plus unit white noise, float64. The smoothness weight is a fixed fraction
(``--tau1-fraction``, default 1e-3) of the leading eigenvalue scale
``T * max(score variance)`` of the generated field, so that it acts alike at every
size; ``--tau1 VALUE`` fixes it instead (``--tau1 0`` switches the penalty off).

Then the largest size (or ``--cluster-size``) is fitted and kriged once more on a
``dask.distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` client, and the
log-log slope of fit time against ``N * T`` is fitted by least squares over the sizes
run. The design targets checked: peak RSS of the ``N = 100,000`` fit below 4 GB, and a
slope of at most 1.1.

The files go to a temporary folder removed at the end (``--keep DIR`` writes them to
``DIR`` and keeps them; existing files of the right shape are reused); free disk space
is checked first.

Run by hand::

    python benchmarks/bench_scale.py --quick          # N = 1e3, 1e4; T = 500 (smoke test)
    python benchmarks/bench_scale.py                  # N = 1e3, 1e4, 1e5; T = 2000
    python benchmarks/bench_scale.py --sizes 1000,10000,100000 --times 2000 --tau1 0
    python benchmarks/bench_scale.py --no-cluster --keep /data/bench_scale
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

#: Box of the stations, degrees.
LAT_RANGE = (30.0, 45.0)
LON_RANGE = (-110.0, -90.0)

#: Smooth patterns of the field: length scale (km) and score standard deviations in
#: units of sqrt(N).
PATTERN_SCALE_KM = 300.0
SCORE_SPREAD = np.array([1.0, 0.7, 0.5, 0.35])
AR_COEFFICIENT = 0.8
NOISE_SD = 1.0

RANK = 10
KRIGE_TIMES = 24
N_TARGETS = 10_000

#: Design targets.
RSS_TARGET_SITES = 100_000
RSS_TARGET_GB = 4.0
SLOPE_TARGET = 1.1


# ----------------------------------------------------------------------------- data


def station_coordinates(n_sites, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(*LAT_RANGE, n_sites), rng.uniform(*LON_RANGE, n_sites)


def score_sd(n_sites):
    return np.sqrt(n_sites) * SCORE_SPREAD


def leading_eigenvalue_scale(n_times, n_sites):
    """``T * max(score variance)``: the size of the leading eigenvalue of ``Dc^T Dc``."""
    return n_times * float(score_sd(n_sites).max() ** 2)


def write_field(path, n_times, n_sites, chunk, seed):
    """Write the synthetic field to ``path``, one time chunk at a time (dask-backed)."""
    import dask
    import dask.array as da
    import xarray as xr

    from xadapter.engine.geometry import local_projection_km

    lat, lon = station_coordinates(n_sites, seed)
    xy = local_projection_km(lat, lon)
    rng = np.random.default_rng(seed + 1)
    centres = xy[rng.choice(n_sites, SCORE_SPREAD.size, replace=False)]
    patterns = np.exp(-((xy[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * PATTERN_SCALE_KM**2))
    patterns /= np.linalg.norm(patterns, axis=0)
    # AR(1) scores with stationary standard deviations score_sd (T x 4: small, made whole)
    innovations = rng.standard_normal((n_times, SCORE_SPREAD.size)) * np.sqrt(1 - AR_COEFFICIENT**2)
    scores = np.empty_like(innovations)
    scores[0] = rng.standard_normal(SCORE_SPREAD.size)
    for t in range(1, n_times):
        scores[t] = AR_COEFFICIENT * scores[t - 1] + innovations[t]
    scores *= score_sd(n_sites)

    def block(start, stop, index):
        noise = np.random.default_rng([seed, index]).standard_normal((stop - start, n_sites))
        return scores[start:stop] @ patterns.T + NOISE_SD * noise

    blocks = []
    for index, start in enumerate(range(0, n_times, chunk)):
        stop = min(start + chunk, n_times)
        blocks.append(da.from_delayed(dask.delayed(block)(start, stop, index), (stop - start, n_sites),
                                      dtype=np.float64))
    field = xr.DataArray(
        da.concatenate(blocks), dims=("time", "station"), name="residual",
        coords={"time": np.arange(n_times), "station": np.arange(n_sites),
                "lat": ("station", lat, {"units": "degrees_north"}),
                "lon": ("station", lon, {"units": "degrees_east"})},
        attrs={"units": "1", "long_name": "synthetic residual"},
    )
    partial = path + ".part"
    with dask.config.set(scheduler="synchronous"):  # one chunk in memory at a time
        xr.Dataset({"residual": field}).to_netcdf(partial, engine="netcdf4")
    os.replace(partial, path)


def chunk_times(n_sites, n_times, chunk_mb):
    """Time steps per chunk for chunks of about ``chunk_mb`` MB."""
    return int(max(1, min(n_times, round(chunk_mb * 2**20 / (8 * n_sites)))))


def random_targets(n_targets, seed):
    import xarray as xr

    rng = np.random.default_rng(seed + 2)
    lat, lon = rng.uniform(*LAT_RANGE, n_targets), rng.uniform(*LON_RANGE, n_targets)
    return xr.Dataset(coords={"lat": ("target", lat), "lon": ("target", lon)})


# ----------------------------------------------------------------------------- one size, in its own process


def rss_mb():
    import resource

    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    except OSError:  # not Linux: the peak so far is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb():
    import resource

    try:
        # VmHWM is this process's own peak; ru_maxrss also carries the parent's peak
        # across fork and exec
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PhaseTimer:
    """Wall time spent in the steps of the engine's fit, by wrapping them."""

    STEPS = (
        ("checks", "xadapter.engine.pipeline", None, "check_data"),
        ("penalty", "xadapter.engine.pipeline", None, "_penalty"),
        ("ADMM + Phi-step", "xadapter.engine.pipeline", "_Run", "fit_core"),
        ("covariance", "xadapter.engine.pipeline", "_Run", "covariance"),
        ("fine scale", "xadapter.engine.pipeline", "_Run", "fine_scale"),
        ("site CV", "xadapter.engine.pipeline", "_Run", "calibrate"),
        # inside the steps above: passes over the data of the Phi-step, Dc V and Dc^T (Dc V)
        ("data passes", "xadapter.engine.basis", "_CentredData", "times"),
        ("data passes", "xadapter.engine.basis", "_CentredData", "gram_times"),
    )

    #: Steps timed silently (called many times).
    QUIET = ("data passes",)

    def __init__(self):
        import importlib

        self.seconds = {}
        self.calls = {}
        for label, module_name, owner_name, attribute in self.STEPS:
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            original = getattr(owner, attribute, None)
            if original is not None:
                setattr(owner, attribute, self._timed(label, original))

    def _timed(self, label, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1
                if label not in self.QUIET:
                    print(f"  [{label}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)

        return timed


def run_size(path, chunk, tau1, seed, cluster):
    """Fit and krige the file at ``path``; returns a dict of measurements."""
    import xarray as xr

    import xadapter
    import xadapter.engine.pipeline  # noqa: F401  (code, not data: imported before the baseline)

    client = None
    if cluster:
        from dask.distributed import Client, LocalCluster

        client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
    timer = PhaseTimer()
    targets = random_targets(N_TARGETS, seed)
    with xr.open_dataset(path, chunks={"time": chunk}) as ds:
        field = ds["residual"]
        before = rss_mb()
        adapter = xadapter.SpatialAdapter(rank=RANK, penalty="graph", tau1=tau1, progress=False)
        start = time.perf_counter()
        adapter.fit(field)
        fit_seconds = time.perf_counter() - start
        fit_peak = peak_rss_mb()
        observed = field.isel(time=slice(-KRIGE_TIMES, None))
        start = time.perf_counter()
        result = adapter.krige(observed, at=targets).compute()
        krige_seconds = time.perf_counter() - start
    finite = bool(np.isfinite(result["mean"].values).all() and np.isfinite(result["variance"].values).all())
    out = {
        "fit_s": fit_seconds, "krige_s": krige_seconds, "rss_before_mb": before, "fit_peak_mb": fit_peak,
        "peak_mb": peak_rss_mb(), "effective_rank": adapter.effective_rank, "phases": timer.seconds,
        "calls": timer.calls,
        "kriged_finite": finite, "noise_variance": adapter.noise_variance,
    }
    if client is not None:
        import resource

        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out["worker_peak_mb"] = max(workers.values())
        client.close()
    return out


def run_in_subprocess(path, chunk, tau1, seed, cluster=False):
    command = [sys.executable, os.path.abspath(__file__), "--run-one", path, "--chunk", str(chunk),
               "--tau1", repr(tau1), "--seed", str(seed)] + (["--cluster-run"] if cluster else [])
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run on {path} failed (exit code {done.returncode}); see its stderr above.")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def blas_description():
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                 for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return ", ".join(pools)
    except ImportError:
        pass
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dicts mode
        return "unknown"


def machine_line():
    import dask
    import scipy
    import xarray as xr

    import xadapter

    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, BLAS {blas_description()}; "
            f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"dask {dask.__version__}, xarray {xr.__version__}, xadapter {xadapter.__version__}")


def loglog_slope(x, y):
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_sizes(text):
    return [int(float(part)) for part in text.split(",") if part.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="numbers of stations N (default 1e3,1e4,1e5)")
    parser.add_argument("--times", type=int, default=2000, help="T, time steps (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 1000,10000 and T = 500")
    parser.add_argument("--tau1", type=float, default=None,
                        help="smoothness weight (default: --tau1-fraction of T * max score variance)")
    parser.add_argument("--tau1-fraction", type=float, default=1e-3,
                        help="tau1 as a fraction of the leading eigenvalue scale (default 1e-3)")
    parser.add_argument("--chunk-mb", type=float, default=64.0, help="size of a time chunk in MB (default 64)")
    parser.add_argument("--cluster-size", type=int, default=None, help="N of the LocalCluster run (default largest)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster run")
    parser.add_argument("--keep", metavar="DIR", default=None, help="write the NetCDF files to DIR and keep them")
    parser.add_argument("--seed", type=int, default=0)
    # internal: one fit and kriging in this process
    parser.add_argument("--run-one", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cluster-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_size(args.run_one, args.chunk, args.tau1, args.seed, args.cluster_run)))
        return

    sizes = [1000, 10000] if args.quick else parse_sizes(args.sizes)
    n_times = 500 if args.quick else args.times
    cluster_size = None if args.no_cluster else (args.cluster_size or max(sizes))
    needed = sorted(set(sizes) | ({cluster_size} if cluster_size else set()))

    folder = args.keep or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(folder, exist_ok=True)
    paths = {n: os.path.join(folder, f"field_N{n}_T{n_times}_seed{args.seed}.nc") for n in needed}
    to_write = [n for n in needed if not os.path.exists(paths[n])]
    need_bytes = sum(8 * n * n_times for n in to_write)
    free = shutil.disk_usage(folder).free
    if need_bytes > 0.9 * free:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        sys.exit(f"not enough disk space in {folder}: the files need {need_bytes / 1e9:.2f} GB and "
                 f"{free / 1e9:.2f} GB are free; use --keep DIR on a larger disk or smaller --sizes/--times.")

    print(machine_line())
    print(f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"files in {folder} ({need_bytes / 1e9:.2f} GB to write, {free / 1e9:.1f} GB free)")
    try:
        rows, fits, cluster = [], {}, None
        for n_sites in needed:
            chunk = chunk_times(n_sites, n_times, args.chunk_mb)
            written = 0.0
            if n_sites in to_write:
                start = time.perf_counter()
                write_field(paths[n_sites], n_times, n_sites, chunk, args.seed)
                written = time.perf_counter() - start
            tau1 = args.tau1
            if tau1 is None:
                tau1 = args.tau1_fraction * leading_eigenvalue_scale(n_times, n_sites)
            chunk_mb = chunk * n_sites * 8 / 2**20
            how = f"written in {written:.1f} s" if n_sites in to_write else "existing file reused"
            print(f"N = {n_sites}, T = {n_times}: {how}; chunks of {chunk} times "
                  f"({chunk_mb:.1f} MB); tau1 = {tau1:.4g}", flush=True)
            if n_sites in sizes:
                r = run_in_subprocess(paths[n_sites], chunk, tau1, args.seed)
                fits[n_sites] = r
                phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items() if k not in PhaseTimer.QUIET)
                print(f"  fit {r['fit_s']:.1f} s ({phases}), krige {r['krige_s']:.1f} s, "
                      f"peak RSS {r['peak_mb']:.0f} MB", flush=True)
                rows.append([f"{n_sites:,}", n_times, f"{n_times * n_sites * 8 / 2**20:,.0f}",
                             f"{chunk} ({chunk_mb:.0f} MB)", f"{tau1:.3g}", f"{r['rss_before_mb']:.0f}",
                             f"{r['fit_s']:.1f}", f"{r['krige_s']:.1f}", f"{r['fit_peak_mb']:.0f}",
                             f"{r['peak_mb']:.0f}", r["effective_rank"]])
            if n_sites == cluster_size:
                cluster = run_in_subprocess(paths[n_sites], chunk, tau1, args.seed, cluster=True)
                print(f"  LocalCluster: fit {cluster['fit_s']:.1f} s, krige {cluster['krige_s']:.1f} s",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(f"SpatialAdapter(rank={RANK}, penalty='graph', tau1=TAU1, progress=False); "
          f"krige: last {KRIGE_TIMES} times at {N_TARGETS:,} random targets, computed to numpy; "
          f"tau1 = {'%g' % args.tau1 if args.tau1 is not None else f'{args.tau1_fraction:g} * T * max score variance'}")
    print()
    print(markdown_table(["N", "T", "array (MB)", "chunk (times)", "tau1", "RSS before (MB)", "fit (s)",
                          "krige (s)", "peak RSS fit (MB)", "peak RSS (MB)", "eff. rank"], rows))
    print()
    phase_names = list(dict.fromkeys(k for r in fits.values() for k in r["phases"] if k not in PhaseTimer.QUIET))
    phase_rows = []
    for n, r in fits.items():
        spent = [r["phases"].get(k, 0.0) for k in phase_names]
        passes = f"{r['calls'].get('data passes', 0)} in {r['phases'].get('data passes', 0.0):.1f} s"
        phase_rows.append([f"{n:,}"] + [f"{v:.1f}" for v in spent] + [f"{r['fit_s'] - sum(spent):.1f}", passes])
    print("fit time by phase (s); data passes: Phi-step products Dc V and Dc^T (Dc V) read from the file:")
    print()
    print(markdown_table(["N"] + phase_names + ["other", "data passes"], phase_rows))
    print()
    if cluster is not None:
        print(markdown_table(
            ["LocalCluster(n_workers=2, threads_per_worker=1)", "fit (s)", "krige (s)", "client peak RSS (MB)",
             "worker peak RSS (MB)", "eff. rank", "data passes"],
            [[f"N = {cluster_size:,}, T = {n_times}", f"{cluster['fit_s']:.1f}", f"{cluster['krige_s']:.1f}",
              f"{cluster['peak_mb']:.0f}", f"{cluster['worker_peak_mb']:.0f}", cluster["effective_rank"],
              f"{cluster['calls'].get('data passes', 0)} in {cluster['phases'].get('data passes', 0.0):.1f} s"]]))
        print()
    if len(fits) >= 2:
        slope = loglog_slope([n * n_times for n in fits], [r["fit_s"] for r in fits.values()])
        print(f"log-log slope of fit time against N*T: {slope:.2f} "
              f"(target <= {SLOPE_TARGET}: {'met' if slope <= SLOPE_TARGET else 'MISSED'})")
    if RSS_TARGET_SITES in fits:
        peak_gb = fits[RSS_TARGET_SITES]["fit_peak_mb"] / 1024
        print(f"peak RSS of the N = {RSS_TARGET_SITES:,} fit: {peak_gb:.2f} GB "
              f"(target < {RSS_TARGET_GB:g} GB: {'met' if peak_gb < RSS_TARGET_GB else 'MISSED'})")
    else:
        print(f"peak RSS target (N = {RSS_TARGET_SITES:,} fit < {RSS_TARGET_GB:g} GB): not run at this size")
    bad = [n for n, r in fits.items() if not r["kriged_finite"]]
    if bad:
        print(f"WARNING: non-finite kriged values at N = {bad}")


if __name__ == "__main__":
    main()
