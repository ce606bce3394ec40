"""EOF equivalence and cost: the adapter at tau1 = tau2 = 0 against xeofs' ``EOF``.

With no smoothness, no sparsity and no trend, the adapter's basis is the leading EOFs
of the time-centred residuals (DESIGN section 1), so it must span the same subspace as
xeofs' ``EOF`` of the same data, rank and centring (``use_coslat=False``,
``standardize=False``). Both are run on labelled data, as a user would:

* ``SpatialAdapter(rank=K, tau1=0, tau2=0, fine_scale=None, site_folds=None).fit(da)``
  (the basis plus its low-rank covariance; the fine scale and the cross-validation
  over sites, which xeofs has no counterpart of, are off);
* ``xeofs.single.EOF(n_modes=K, use_coslat=False, standardize=False).fit(da, dim="time")``
  with its default solver, and with ``solver="full"`` (exact SVD);
* for reference, ``numpy.linalg.svd`` of the centred data (exact).

Data sets: a synthetic station field (``--times`` x ``--sites``, default 2000 x 10,000:
20 smooth patterns with geometrically decaying variances plus white noise, made by
:func:`bench_basis.make_data`) and the bundled ozone residual grid (72 months x 24 x
24 cells).

Every contender runs in a fresh Python process (``--measure-one``), so that its peak
resident memory (the high-water mark above the resident size just before the fit,
read from ``/proc/self/status``) is its own: one warm-up fit on a tiny field loads the
libraries first, then the data are made, then ``--repeat`` fits are timed (median wall
and CPU time, ``time.process_time`` over every thread) and the first one's memory peak
is kept. The bases are written to a temporary file and compared in the parent:
subspace distance ``||P_a - P_b||_F`` of the spans, and the difference of the fraction
of variance the ``K`` patterns explain.

Targets (issue 10): subspace distance to xeofs below 1e-6, CPU time ratio (adapter /
xeofs) at most 0.5, peak memory ratio at most 0.5; checked against xeofs' default
solver (what a user gets; randomised on large fields, so not exact) and against its
exact ``solver="full"``.

Run by hand::

    python benchmarks/bench_eof.py                       # 2000 x 10,000 and the ozone grid
    python benchmarks/bench_eof.py --times 500 --sites 3000 --repeat 3
    python benchmarks/bench_eof.py --smoke               # tiny field, one repeat, in process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from xadapter.engine.basis import subspace_distance

from _common import fmt, machine_line, markdown_table, peak_memory_mib, ratio, repeated, verdict

RANK = 10
SIGNAL_RANK = 20

#: Contenders: name -> (runner key, needs xeofs).
CONTENDERS = {
    "xadapter SpatialAdapter": ("adapter", False),
    "xeofs EOF (solver auto)": ("xeofs", True),
    "xeofs EOF (solver full)": ("xeofs-full", True),
    "numpy.linalg.svd": ("svd", False),
}
OURS = "xadapter SpatialAdapter"
PEER = "xeofs EOF (solver auto)"
EXACT_PEER = "xeofs EOF (solver full)"

#: Fixed malloc threshold in the measuring processes: large arrays are mapped and given
#: back when freed, so the high-water mark of one fit does not depend on what the
#: allocator kept from earlier ones.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


# ----------------------------------------------------------------------------- data


def station_field(n_times, n_sites, seed=0):
    """The synthetic field as a labelled ``(time, station)`` DataArray with lat/lon."""
    import xarray as xr

    from bench_basis import make_data

    rng = np.random.default_rng(seed + 1)
    values = make_data(n_times, n_sites, SIGNAL_RANK, 1.0, seed)
    return xr.DataArray(values, dims=("time", "station"),
                        coords={"time": np.arange(n_times), "station": np.arange(n_sites),
                                "lat": ("station", rng.uniform(30, 45, n_sites)),
                                "lon": ("station", rng.uniform(-110, -90, n_sites))})


def ozone_field():
    """The bundled ozone residuals, ``(time, lat, lon)``, 72 months."""
    from xadapter import datasets

    return datasets.ozone_residuals()["residual"]


def make_field(spec):
    """The field of a data-set spec ``{"kind": "stations"|"ozone", ...}``."""
    if spec["kind"] == "ozone":
        return ozone_field()
    return station_field(spec["times"], spec["sites"], spec.get("seed", 0))


def space_dims(field):
    return [dim for dim in field.dims if dim != "time"]


# ----------------------------------------------------------------------------- runners


def fit_adapter(field, rank):
    """The adapter's basis, ``(space, mode)`` stacked in the field's own site order."""
    from xadapter import SpatialAdapter

    adapter = SpatialAdapter(rank=rank, tau1=0.0, tau2=0.0, fine_scale=None, site_folds=None,
                             progress=False).fit(field)
    return adapter.basis.stack(site=space_dims(field)).transpose("site", "mode").values


def fit_xeofs(field, rank, solver="auto"):
    """xeofs' EOF components, ``(space, mode)`` in the field's site order."""
    from xeofs.single import EOF

    model = EOF(n_modes=rank, use_coslat=False, standardize=False, solver=solver, random_state=0)
    model.fit(field, dim="time")
    return model.components().stack(site=space_dims(field)).transpose("site", "mode").values


def fit_svd(field, rank):
    """Leading right singular vectors of the time-centred data (exact reference)."""
    values = field.transpose("time", *space_dims(field)).values.reshape(field.sizes["time"], -1)
    centred = values - values.mean(axis=0)
    return np.linalg.svd(centred, full_matrices=False)[2][:rank].T


RUNNERS = {"adapter": fit_adapter, "xeofs": fit_xeofs,
           "xeofs-full": lambda field, rank: fit_xeofs(field, rank, solver="full"), "svd": fit_svd}


def measure_one(key, spec, rank, repeat, out):
    """Child process: warm up, make the data, measure one contender, save its basis."""
    runner = RUNNERS[key]
    runner(station_field(50, 40), 3)  # loads every library the runner uses
    field = make_field(spec)
    memory, basis = peak_memory_mib(runner, field, rank)
    timing = repeated(runner, repeat, field, rank)
    np.save(out, basis)
    print(json.dumps({"memory": memory, "wall": timing.wall, "cpu": timing.cpu,
                      "data_mib": field.nbytes / 2**20}))


def run_in_process(key, spec, rank, repeat):
    """Measure one contender in this process (memory then less exact: allocator reuse)."""
    field = make_field(spec)
    memory, basis = peak_memory_mib(RUNNERS[key], field, rank)
    timing = repeated(RUNNERS[key], repeat, field, rank)
    return {"memory": memory, "wall": timing.wall, "cpu": timing.cpu, "data_mib": field.nbytes / 2**20,
            "basis": basis}


def run_child(key, spec, rank, repeat, workdir):
    """Run :func:`measure_one` in a fresh process; its numbers and basis."""
    out = os.path.join(workdir, f"{key}.npy")
    command = [sys.executable, os.path.abspath(__file__), "--measure-one", key, "--spec", json.dumps(spec),
               "--rank", str(rank), "--repeat", str(repeat), "--out", out]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MEASURE_ENV},
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"{key} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["basis"] = np.load(out)
    return result


# ----------------------------------------------------------------------------- comparison


def explained_fraction(field, basis):
    """Fraction of the centred data's total variance in the span of ``basis``."""
    values = field.transpose("time", *space_dims(field)).values.reshape(field.sizes["time"], -1)
    centred = values - values.mean(axis=0)
    q = np.linalg.qr(basis)[0]
    return float(np.sum((centred @ q) ** 2) / np.sum(centred**2))


def compare(name, spec, results):
    """Markdown table of one data set: cost, ratios to xeofs and agreement."""
    field = make_field(spec)
    peer = results.get(PEER)
    exact = results.get("numpy.linalg.svd")
    rows = []
    for contender, result in results.items():
        explained = explained_fraction(field, result["basis"])
        rows.append([
            contender, fmt(result["wall"]), fmt(result["cpu"]), fmt(result["memory"]),
            ratio(result["cpu"], peer["cpu"]) if peer else "–",
            ratio(result["memory"], peer["memory"]) if peer else "–",
            f"{subspace_distance(result['basis'], peer['basis']):.1e}" if peer else "–",
            f"{subspace_distance(result['basis'], exact['basis']):.1e}" if exact else "–",
            f"{explained:.6f}",
            f"{explained - explained_fraction(field, peer['basis']):+.1e}" if peer else "–",
        ])
    header = ["contender", "wall (s)", "CPU (s)", "peak memory (MiB)", "CPU / xeofs", "memory / xeofs",
              "distance to xeofs", "distance to SVD", "explained fraction", "minus xeofs'"]
    return markdown_table(header, rows)


def targets(results):
    """The three targets of the adapter against xeofs, with each solver of xeofs."""
    ours = results[OURS]
    rows = []
    for peer_name in (PEER, EXACT_PEER):
        peer = results.get(peer_name)
        if peer is None:
            continue
        distance = subspace_distance(ours["basis"], peer["basis"])
        cpu, memory = ours["cpu"] / peer["cpu"], ours["memory"] / max(peer["memory"], 1e-9)
        rows += [[f"subspace distance to {peer_name} < 1e-6", f"{distance:.1e}", verdict(distance < 1e-6)],
                 [f"CPU time / {peer_name} <= 0.5", f"{cpu:.2f}", verdict(cpu <= 0.5)],
                 [f"peak memory / {peer_name} <= 0.5", f"{memory:.2f}", verdict(memory <= 0.5)]]
    return markdown_table(["target (adapter against xeofs)", "measured", "verdict"], rows)


def data_sets(args):
    """Name -> spec of the data sets to run."""
    sets = {f"stations, T = {args.times}, N = {args.sites}": {"kind": "stations", "times": args.times,
                                                             "sites": args.sites, "seed": args.seed}}
    if not args.no_ozone:
        sets["ozone residuals, T = 72, 24 x 24 grid"] = {"kind": "ozone"}
    return sets


def have_xeofs():
    try:
        import xeofs  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=2000, help="T of the station field (default 2000)")
    parser.add_argument("--sites", type=int, default=10000, help="N of the station field (default 10000)")
    parser.add_argument("--rank", type=int, default=RANK, help=f"number of patterns (default {RANK})")
    parser.add_argument("--repeat", type=int, default=3, help="timed fits per contender, median kept (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-xeofs", action="store_true", help="skip xeofs (no ratios then)")
    parser.add_argument("--no-svd", action="store_true", help="skip the exact SVD reference")
    parser.add_argument("--no-ozone", action="store_true", help="skip the ozone grid")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every contender in this process (faster, memory peaks less exact)")
    parser.add_argument("--smoke", action="store_true",
                        help="T = 60, N = 200, one repeat, in process, no ozone: a check that it runs")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_one:
        measure_one(args.measure_one, json.loads(args.spec), args.rank, args.repeat, args.out)
        return None
    if args.smoke:
        args.times, args.sites, args.repeat = 60, 200, 1
        args.in_process, args.no_ozone = True, True
    use_xeofs = not args.no_xeofs and have_xeofs()
    print(machine_line())
    tables = {}
    for name, spec in data_sets(args).items():
        results = {}
        with tempfile.TemporaryDirectory() as workdir:
            for contender, (key, needs_xeofs) in CONTENDERS.items():
                if (needs_xeofs and not use_xeofs) or (key == "svd" and args.no_svd):
                    continue
                if args.in_process:
                    results[contender] = run_in_process(key, spec, args.rank, args.repeat)
                else:
                    results[contender] = run_child(key, spec, args.rank, args.repeat, workdir)
        print(f"\n{name}: rank {args.rank}, tau1 = tau2 = 0, no trend; median of {args.repeat} fit(s), "
              f"data {results[OURS]['data_mib']:.0f} MiB\n")
        print(compare(name, spec, results))
        if PEER in results:
            print()
            print(targets(results))
        tables[name] = results
    return tables


if __name__ == "__main__":
    main()
