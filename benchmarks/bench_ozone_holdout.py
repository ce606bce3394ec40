"""Held-out-cell kriging on the bundled real ozone grid: adapter vs ordinary kriging.

Split (same for every method): the frozen first stage (OLS on latitude, longitude,
their squares and product and seasonal harmonics) is fitted on the first 48 months;
20 % of the cells are held out; the adapter is fitted on the training cells over the
first 48 months and kriges the held-out cells in the last 24 months from the observed
cells of the same month. Peer: per-month ordinary kriging with GSTools, exponential
variogram (with nugget) fitted once on the pooled training residuals, measured in the
same run. Repeated over 5 seeds of the cell split.

Run by hand::

    python benchmarks/bench_ozone_holdout.py [--seeds 5] [--no-gstools]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import xarray as xr

from xadapter import SpatialAdapter, datasets, metrics
from xadapter.engine.geometry import local_projection_km

N_TRAIN = 48
LEVEL = 0.9
Z90 = 1.6448536269514722


def split(resid, seed, holdout=0.2):
    rng = np.random.default_rng(seed)
    shape = (resid.sizes["lat"], resid.sizes["lon"])
    hidden = np.zeros(shape[0] * shape[1], bool)
    hidden[rng.choice(hidden.size, int(round(holdout * hidden.size)), replace=False)] = True
    return xr.DataArray(hidden.reshape(shape), dims=("lat", "lon"), coords={"lat": resid.lat, "lon": resid.lon})


def scores(truth, mean, variance, lower, upper):
    return {
        "rmse": metrics.rmse(truth, mean),
        "crps": metrics.crps_gaussian(truth, mean, variance),
        "cover": metrics.coverage(truth, lower, upper),
        "width": metrics.interval_width(lower, upper),
    }


def run_adapter(resid, hidden, settings):
    cells = datasets.grid_to_cells(resid)
    hidden_cells = hidden.stack(cell=("lat", "lon")).values
    train, test = cells.isel(cell=~hidden_cells), cells.isel(cell=hidden_cells)
    start = time.perf_counter()
    adapter = SpatialAdapter(**settings).fit(train.isel(time=slice(0, N_TRAIN)))
    result = adapter.krige(train.isel(time=slice(N_TRAIN, None)), at=test.isel(time=0, drop=True), level=LEVEL)
    elapsed = time.perf_counter() - start
    truth = test.isel(time=slice(N_TRAIN, None)).transpose("time", "cell").values
    pred = result.transpose("time", "cell")
    out = scores(truth, pred["mean"].values, pred["variance"].values, pred["lower"].values, pred["upper"].values)
    out["time"] = elapsed
    out["rank"] = adapter.effective_rank
    return out


def run_gstools(resid, hidden):
    import gstools as gs

    start = time.perf_counter()
    lat2, lon2 = np.meshgrid(resid.lat.values, resid.lon.values, indexing="ij")
    xy = local_projection_km(lat2.ravel(), lon2.ravel())
    keep = ~hidden.values.ravel()
    values = resid.transpose("time", "lat", "lon").values.reshape(resid.sizes["time"], -1)
    train = values[:N_TRAIN][:, keep]
    pos = (xy[keep, 0], xy[keep, 1])
    bins = np.linspace(0, 2500, 26)
    # pool the variogram over training months: average the per-month estimates
    gammas = []
    for month in train:
        centre, gamma = gs.vario_estimate(pos, month - month.mean(), bins)
        gammas.append(gamma)
    model = gs.Exponential(dim=2)
    model.fit_variogram(centre, np.mean(gammas, axis=0), nugget=True)
    truth, mean, var = [], [], []
    target = (xy[~keep, 0], xy[~keep, 1])
    for month in values[N_TRAIN:]:
        krig = gs.krige.Ordinary(model, cond_pos=pos, cond_val=month[keep])
        field, krige_var = krig(target, return_var=True)
        mean.append(field)
        # GSTools returns the variance of the latent field; a new observation adds the nugget
        var.append(np.maximum(krige_var, 0) + model.nugget)
        truth.append(month[~keep])
    elapsed = time.perf_counter() - start
    truth, mean, var = map(np.asarray, (truth, mean, var))
    sd = np.sqrt(var)
    out = scores(truth, mean, var, mean - Z90 * sd, mean + Z90 * sd)
    out["time"] = elapsed
    out["rank"] = np.nan
    return out


def run_first_stage(resid, hidden):
    test = resid.isel(time=slice(N_TRAIN, None)).where(hidden).values
    # the first stage alone: residual predicted as zero, interval from training spread
    sd = float(np.nanstd(resid.isel(time=slice(0, N_TRAIN)).where(~hidden).values))
    zero = np.zeros_like(test)
    out = scores(test, zero, np.full_like(test, sd**2), zero - Z90 * sd, zero + Z90 * sd)
    out["time"] = 0.0
    out["rank"] = np.nan
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-gstools", action="store_true")
    args = parser.parse_args()
    resid = datasets.ozone_residuals(n_train=N_TRAIN)["residual"]
    paper = {"gamma": 0.0, "fine_scale": None, "site_folds": None, "extension_smoothing": 0.0}
    methods = {
        "first stage alone": lambda h: run_first_stage(resid, h),
        "adapter, paper model (gamma=0, white)": lambda h: run_adapter(resid, h, paper),
        "adapter, noise-calibrated rank, white": lambda h: run_adapter(resid, h, {**paper, "gamma": None}),
        "adapter, + fine scale": lambda h: run_adapter(resid, h, {"site_folds": None, "extension_smoothing": 0.0}),
        "adapter, defaults": lambda h: run_adapter(resid, h, {}),
        "adapter, rank='auto'": lambda h: run_adapter(resid, h, {"rank": "auto"}),
    }
    if not args.no_gstools:
        methods["ordinary kriging (GSTools)"] = lambda h: run_gstools(resid, h)
    table = {name: [] for name in methods}
    for seed in range(args.seeds):
        hidden = split(resid, seed)
        for name, run in methods.items():
            table[name].append(run(hidden))
    print(f"ozone hold-out: 20 % of cells, months {N_TRAIN + 1}-72, {args.seeds} seeds (mean over seeds)")
    header = f"{'method':<40}{'RMSE':>7}{'CRPS':>7}{'cov90':>7}{'width':>7}{'rank':>6}{'time s':>8}"
    print(header)
    print("-" * len(header))
    summary = {}
    for name, rows in table.items():
        mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        summary[name] = mean
        print(f"{name:<40}{mean['rmse']:>7.3f}{mean['crps']:>7.3f}{mean['cover']:>7.3f}{mean['width']:>7.2f}"
              f"{mean['rank']:>6.1f}{mean['time']:>8.3f}")
    peer = summary.get("ordinary kriging (GSTools)")
    if peer is not None:
        ours = summary["adapter, defaults"]
        print(f"\nadapter defaults vs ordinary kriging: CRPS {100 * (ours['crps'] / peer['crps'] - 1):+.1f} %, "
              f"RMSE {100 * (ours['rmse'] / peer['rmse'] - 1):+.1f} %, speed-up {peer['time'] / ours['time']:.1f}x")


if __name__ == "__main__":
    main()
