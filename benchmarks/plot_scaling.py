"""Scaling curves: fit time against N * T, kriging time against the number of targets.

Reuses the machinery of ``bench_scale.py``: the same synthetic station field (written
to NetCDF chunk by chunk by :func:`bench_scale.write_field`), the same model
(``SpatialAdapter(rank=10, penalty="graph", tau1=...)`` with the defaults otherwise)
and the same measurement (:func:`bench_scale.run_in_subprocess`: one fresh process per
size, opening the file with time chunks), over a grid of sizes ``--sizes`` x
``--times``. Then one adapter, fitted on the smallest field, kriges the last 24 time
steps at ``--targets`` random new locations each (median of ``--repeat`` runs, wall
and CPU time).

Prints both tables and the fitted log-log slopes, and draws a two-panel log-log
figure (``--figure``, default ``docs/images/scaling.png``). ``--json`` keeps the
numbers; ``--from-json`` redraws the figure from them without measuring.

Run by hand (a few minutes; the 100,000-station size of ``bench_scale.py`` is left
to that script)::

    python benchmarks/plot_scaling.py                                  # N = 1e3, 3e3, 1e4; T = 500, 1000
    python benchmarks/plot_scaling.py --json scaling.json
    python benchmarks/plot_scaling.py --from-json scaling.json         # redraw only
    python benchmarks/plot_scaling.py --smoke --figure /tmp/scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np

import bench_scale
from _common import fmt, machine_line, markdown_table, repeated

DEFAULT_FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images",
                              "scaling.png")


def parse_list(text):
    return [int(float(item)) for item in text.split(",")]


def fit_sweep(sizes, times, folder, seed=0, chunk_mb=64.0):
    """Fit and krige (bench_scale's run) for every ``N`` x ``T``; a list of records."""
    records = []
    for n_times in times:
        for n_sites in sizes:
            path = os.path.join(folder, f"field_N{n_sites}_T{n_times}.nc")
            chunk = bench_scale.chunk_times(n_sites, n_times, chunk_mb)
            if not os.path.exists(path):
                bench_scale.write_field(path, n_times, n_sites, chunk, seed)
            tau1 = 1e-3 * bench_scale.leading_eigenvalue_scale(n_times, n_sites)
            result = bench_scale.run_in_subprocess(path, chunk, tau1, seed)
            records.append({"n_sites": n_sites, "n_times": n_times, "fit_s": result["fit_s"],
                            "krige_s": result["krige_s"], "peak_mb": result["peak_mb"],
                            "effective_rank": result["effective_rank"]})
            print(f"N = {n_sites}, T = {n_times}: fit {result['fit_s']:.1f} s, peak RSS {result['peak_mb']:.0f} MB",
                  flush=True)
    return records


def krige_sweep(path, targets, repeat, seed=0):
    """Kriging time of one fitted adapter at growing numbers of new locations."""
    import xarray as xr

    import xadapter

    with xr.open_dataset(path) as ds:
        field = ds["residual"].load()
    n_times, n_sites = field.shape
    tau1 = 1e-3 * bench_scale.leading_eigenvalue_scale(n_times, n_sites)
    adapter = xadapter.SpatialAdapter(rank=bench_scale.RANK, penalty="graph", tau1=tau1, progress=False).fit(field)
    observed = field.isel(time=slice(-bench_scale.KRIGE_TIMES, None))
    records = []
    for n_targets in targets:
        at = bench_scale.random_targets(n_targets, seed)
        timing = repeated(lambda: adapter.krige(observed, at=at), repeat)
        records.append({"n_targets": n_targets, "n_sites": n_sites, "wall": timing.wall, "cpu": timing.cpu})
        print(f"{n_targets} targets: {timing.wall:.2f} s", flush=True)
    return records


def slope(x, y):
    """Least-squares slope of ``log y`` against ``log x``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def draw(fits, kriging, figure_path):
    """Two log-log panels: fit time vs N*T (one line per T), kriging time vs targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
    for n_times in sorted({r["n_times"] for r in fits}):
        rows = sorted((r for r in fits if r["n_times"] == n_times), key=lambda r: r["n_sites"])
        left.loglog([r["n_sites"] * n_times for r in rows], [r["fit_s"] for r in rows], "o-", label=f"T = {n_times}")
    sizes = np.array([r["n_sites"] * r["n_times"] for r in fits], float)
    reference = np.array([sizes.min(), sizes.max()])
    base = min(r["fit_s"] for r in fits)
    left.loglog(reference, base * reference / reference[0], "k:", label="slope 1")
    left.set_xlabel("N x T (entries of the residual field)")
    left.set_ylabel("fit time (s)")
    left.set_title(f"fit (slope {slope(sizes, [r['fit_s'] for r in fits]):.2f})")
    left.legend(frameon=False)
    counts = [r["n_targets"] for r in kriging]
    times = [r["wall"] for r in kriging]
    right.loglog(counts, times, "o-", label=f"fitted on N = {kriging[0]['n_sites']}")
    right.loglog([counts[0], counts[-1]], [times[-1] * counts[0] / counts[-1], times[-1]], "k:", label="slope 1")
    right.set_xlabel("new locations kriged (24 time steps)")
    right.set_ylabel("kriging time (s)")
    right.set_title(f"kriging (slope {slope(counts, times):.2f})")
    right.legend(frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(figure_path)), exist_ok=True)
    fig.savefig(figure_path, dpi=110)
    plt.close(fig)


def report(fits, kriging):
    print(markdown_table(["N", "T", "N x T", "fit (s)", "krige 10,000 targets (s)", "peak RSS (MB)", "eff. rank"],
                         [[f"{r['n_sites']:,}", r["n_times"], f"{r['n_sites'] * r['n_times']:.1e}", fmt(r["fit_s"]),
                           fmt(r["krige_s"]), f"{r['peak_mb']:.0f}", r["effective_rank"]] for r in fits]))
    print(f"\nlog-log slope of fit time against N x T: "
          f"{slope([r['n_sites'] * r['n_times'] for r in fits], [r['fit_s'] for r in fits]):.2f}\n")
    print(markdown_table(["new locations", "wall (s)", "CPU (s)", "per 1,000 locations (ms)"],
                         [[f"{r['n_targets']:,}", fmt(r["wall"]), fmt(r["cpu"]), fmt(1000 * r["wall"] / r["n_targets"])]
                          for r in kriging]))
    print(f"\nlog-log slope of kriging time against targets: "
          f"{slope([r['n_targets'] for r in kriging], [r['wall'] for r in kriging]):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,10000", help="numbers of stations N (default 1e3,3e3,1e4)")
    parser.add_argument("--times", default="500,1000", help="numbers of time steps T (default 500,1000)")
    parser.add_argument("--targets", default="100,1000,10000,100000", help="new locations kriged")
    parser.add_argument("--repeat", type=int, default=3, help="kriging runs per size, median kept (default 3)")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help="PNG to write (default docs/images/scaling.png)")
    parser.add_argument("--json", help="write the measurements to this file")
    parser.add_argument("--from-json", help="redraw the figure from measurements saved with --json")
    parser.add_argument("--smoke", action="store_true", help="N = 150, 300; T = 40; two target counts")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as saved:
            data = json.load(saved)
        draw(data["fits"], data["kriging"], args.figure)
        report(data["fits"], data["kriging"])
        return data
    if args.smoke:
        args.sizes, args.times, args.targets, args.repeat = "150,300", "40", "100,1000", 1
    sizes, times, targets = parse_list(args.sizes), parse_list(args.times), parse_list(args.targets)
    print(machine_line(), flush=True)
    folder = tempfile.mkdtemp(prefix="plot_scaling_")
    try:
        fits = fit_sweep(sizes, times, folder)
        smallest = os.path.join(folder, f"field_N{min(sizes)}_T{min(times)}.nc")
        kriging = krige_sweep(smallest, targets, args.repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    data = {"machine": machine_line(), "fits": fits, "kriging": kriging}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(data, out, indent=1)
    draw(fits, kriging, args.figure)
    print()
    report(fits, kriging)
    print(f"\nfigure: {args.figure}")
    return data


if __name__ == "__main__":
    main()
