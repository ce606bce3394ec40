"""The ``xadapter`` command.

``xadapter demo``: fit an adapter on the bundled real ozone residuals and krige
held-out grid cells, printing skill against the first stage alone and writing the
fitted adapter and the kriged fields as NetCDF.

``xadapter fit FILE``: fit an adapter on a residual variable of a NetCDF file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _demo(args):
    import xarray as xr

    from . import SpatialAdapter, datasets, metrics

    def say(text):
        if not args.quiet:
            print(text, flush=True)

    n_train = 48
    ds = datasets.ozone_residuals(n_train=n_train)
    cells = datasets.grid_to_cells(ds["residual"])
    rng = np.random.default_rng(args.seed)
    n_cells = cells.sizes["cell"]
    held_out = np.zeros(n_cells, bool)
    held_out[rng.choice(n_cells, int(round(args.holdout * n_cells)), replace=False)] = True
    train_cells, test_cells = cells.isel(cell=~held_out), cells.isel(cell=held_out)
    say(f"ozone residuals: {n_cells} grid cells, {cells.sizes['time']} months; fitting on months 1-{n_train} "
        f"at {int((~held_out).sum())} cells, kriging the {int(held_out.sum())} unseen cells in months "
        f"{n_train + 1}-{cells.sizes['time']} from the others")

    start = time.perf_counter()
    adapter = SpatialAdapter(
        rank=args.rank, tau1=args.tau1, fine_scale=None if args.fine_scale == "none" else args.fine_scale,
        seed=args.seed, progress=not args.quiet,
    ).fit(train_cells.isel(time=slice(0, n_train)))
    observed = train_cells.isel(time=slice(n_train, None))
    targets = test_cells.isel(time=0, drop=True)
    result = adapter.krige(observed, at=targets, level=0.9)
    elapsed = time.perf_counter() - start
    say(repr(adapter))

    truth = test_cells.isel(time=slice(n_train, None)).transpose("time", "cell").values
    pred = result.transpose("time", "cell")
    first_stage_rmse = metrics.rmse(truth, np.zeros_like(truth))
    rows = [
        ("first stage alone", first_stage_rmse, float("nan"), float("nan")),
        ("first stage + adapter", metrics.rmse(truth, pred["mean"].values),
         metrics.crps_gaussian(truth, pred["mean"].values, pred["variance"].values),
         metrics.coverage(truth, pred["lower"].values, pred["upper"].values)),
    ]
    say(f"\nunseen cells, months {n_train + 1}-{cells.sizes['time']} (DU); fit + krige {elapsed:.2f} s")
    say(f"{'model':<24}{'RMSE':>8}{'CRPS':>8}{'cover90':>9}")
    for name, rmse, crps, cover in rows:
        say(f"{name:<24}{rmse:>8.3f}{crps:>8.3f}{cover:>9.3f}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    adapter.to_netcdf(out / "ozone_adapter.nc")
    from .io.netcdf import atomic_to_netcdf

    # the whole grid for the first forecast month, as maps of mean and variance
    grid = xr.Dataset(coords={"lat": ds["lat"], "lon": ds["lon"]})
    maps = adapter.krige(observed.isel(time=slice(0, 1)), at=grid, level=0.9)
    atomic_to_netcdf(result, out / "ozone_kriged_cells.nc")
    atomic_to_netcdf(maps, out / "ozone_kriged_map.nc")
    written = [out / "ozone_adapter.nc", out / "ozone_kriged_cells.nc", out / "ozone_kriged_map.nc"]
    if not args.no_plot:
        written += _demo_plots(adapter, maps, train_cells, out, say)
    say("\nwrote " + ", ".join(str(path) for path in written))
    return 0


def _demo_plots(adapter, maps, train_cells, out, say):
    try:
        from . import plot

        plt = plot._pyplot()
    except ImportError:
        say("(matplotlib not installed: no plots; pip install 'xadapter[plot]')")
        return []
    plt.switch_backend("Agg")
    figures = {
        "ozone_basis.png": plot.basis_maps(adapter, modes=6),
        "ozone_kriged_map.png": plot.kriging_maps(maps, sites=train_cells.isel(time=0, drop=True)),
    }
    if adapter.calibration is not None:
        figures["ozone_calibration.png"] = plot.calibration_plot(adapter).figure
    paths = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(out / name)
    return paths


def _fit(args):
    import xarray as xr

    from . import SpatialAdapter

    with xr.open_dataset(args.file) as ds:
        if args.variable not in ds:
            print(f"error: {args.variable!r} is not a variable of {args.file} ({list(ds.data_vars)})",
                  file=sys.stderr)
            return 2
        resid = ds[args.variable].load()
    adapter = SpatialAdapter(rank=args.rank, tau1=args.tau1, max_iter=args.max_iter, tol=args.tol,
                             progress=not args.quiet).fit(resid)
    adapter.to_netcdf(args.output)
    if not args.quiet:
        print(repr(adapter))
        print(f"wrote {args.output}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="xadapter", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit and krige the bundled real ozone data")
    demo.add_argument("--rank", type=int, default=10)
    demo.add_argument("--tau1", type=float, default=0.0)
    demo.add_argument("--fine-scale", default="exponential", choices=["none", "exponential", "matern32"])
    demo.add_argument("--holdout", type=float, default=0.2, help="fraction of cells held out")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output", default="xadapter-demo", help="folder for the NetCDF outputs")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--no-plot", action="store_true", help="do not write PNG maps")
    demo.set_defaults(run=_demo)

    fit = sub.add_parser("fit", help="fit an adapter on a residual variable of a NetCDF file")
    fit.add_argument("file")
    fit.add_argument("variable")
    fit.add_argument("--rank", type=int, default=10)
    fit.add_argument("--tau1", type=float, default=0.0)
    fit.add_argument("--max-iter", type=int, default=200, help="ADMM iteration limit (default 200)")
    fit.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the ADMM stopping rule")
    fit.add_argument("--output", default="adapter.nc")
    fit.add_argument("--quiet", action="store_true")
    fit.set_defaults(run=_fit)

    args = parser.parse_args(argv)
    from .exceptions import XAdapterError

    try:
        return args.run(args)
    except XAdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
