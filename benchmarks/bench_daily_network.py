"""A small daily station network with gaps: the defaults against per-day ordinary kriging.

The case: about 40 irregular stations reporting daily with ~6 % of the reports
missing, 243 training days and 60 later days to predict at 20 % of the stations that
never reported (held out). Per-day ordinary kriging is what a user would otherwise
run: GSTools with an exponential variogram (plus nugget) pooled over the per-day
estimates of the training days, one kriging system per test day on the stations that
reported that day. Both are timed in the same run (CPU seconds of the process,
fit + predict); the table gives the medians over repeats and the mean scores over
seeds.

Synthetic field per station and day::

    level (smooth trend + correlated part + station offset)
    + 3 smooth patterns with AR(1) scores (coefficients 0.7-0.9)
    + exponential fine-scale field (range 150 km, new every day)
    + white noise

Run ``python benchmarks/bench_daily_network.py [--seeds 5] [--repeats 3]`` (``--smoke``:
one seed, one repeat; ``--no-gstools``: the adapter and the zero-residual baseline).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd
import xarray as xr

from _common import machine_line, markdown_table, fmt, repeated
from xadapter import SpatialAdapter, datasets, metrics
from xadapter.engine import geometry
from xadapter.engine.geometry_cache import clear_geometry_cache

Z90 = 1.6448536269514722


def daily_network(seed, n_stations=48, n_times=303, missing=0.06):
    """``(time, station)`` residuals of a daily network with gaps (NaN), lat/lon coordinates."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(35.0, 45.0, n_stations)
    lon = rng.uniform(-100.0, -85.0, n_stations)
    xy = geometry.local_projection_km(lat, lon)
    distance = geometry.great_circle_km(lat[:, None], lon[:, None], lat[None], lon[None])
    jitter = 1e-10 * np.eye(n_stations)
    centres = xy.min(0) + (xy.max(0) - xy.min(0)) * rng.uniform(0.2, 0.8, (3, 2))
    patterns, _ = np.linalg.qr(np.exp(-((xy[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * 400.0**2)))
    scores = datasets.ar1(n_times, 3, rng.uniform(0.7, 0.9), np.array([4.0, 2.0, 1.0]) * n_stations, rng)
    shift = (xy - xy.mean(0)) / 1000.0
    correlated = np.linalg.cholesky(np.exp(-distance / 250.0) + jitter) @ rng.standard_normal(n_stations)
    level = 1.5 * shift[:, 0] - shift[:, 1] + correlated + 0.5 * rng.standard_normal(n_stations)
    fine = (np.linalg.cholesky(np.exp(-distance / 150.0) + jitter) @ rng.standard_normal((n_stations, n_times))).T
    values = level + scores @ patterns.T + 0.7 * fine + 0.5 * rng.standard_normal((n_times, n_stations))
    values[rng.random(values.shape) < missing] = np.nan
    return xr.DataArray(
        values, dims=("time", "station"),
        coords={"time": pd.date_range("2020-01-01", periods=n_times, freq="D"),
                "station": np.arange(n_stations), "lat": ("station", lat, {"units": "degrees_north"}),
                "lon": ("station", lon, {"units": "degrees_east"})},
    )


def split(field, seed, n_train=243, holdout=0.2):
    """Kept and held-out stations; training and test days."""
    n_stations = field.sizes["station"]
    held = np.sort(np.random.default_rng(1000 + seed).choice(n_stations, int(round(holdout * n_stations)),
                                                            replace=False))
    kept = np.setdiff1d(np.arange(n_stations), held)
    return kept, held, slice(0, n_train), slice(n_train, None)


def adapter_predict(field, kept, held, train, test, settings):
    at = xr.Dataset(coords={"station": field.station.values[held], "lat": ("station", field.lat.values[held]),
                            "lon": ("station", field.lon.values[held])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        clear_geometry_cache()  # a cold fit, as a user's first: no geometry from earlier repeats
        adapter = SpatialAdapter(progress=False, **settings).fit(field.isel(time=train, station=kept))
    result = adapter.krige(field.isel(time=test, station=kept), at=at, level=0.9)
    return result["mean"].values, result["variance"].values


def gstools_predict(field, kept, held, train, test):
    import gstools as gs

    xy = geometry.local_projection_km(field.lat.values, field.lon.values)
    values = field.transpose("time", "station").values
    bins = np.linspace(0.0, 1000.0, 16)
    gammas = []
    for day in values[train][:, kept]:
        seen = ~np.isnan(day)
        centre, gamma = gs.vario_estimate((xy[kept][seen, 0], xy[kept][seen, 1]), day[seen] - day[seen].mean(), bins)
        gammas.append(gamma)
    model = gs.Exponential(dim=2)
    model.fit_variogram(centre, np.mean(gammas, axis=0), nugget=True)
    target = (xy[held, 0], xy[held, 1])
    mean, variance = [], []
    for day in values[test][:, kept]:
        seen = ~np.isnan(day)
        krig = gs.krige.Ordinary(model, cond_pos=(xy[kept][seen, 0], xy[kept][seen, 1]), cond_val=day[seen])
        field_mean, krige_var = krig(target, return_var=True)
        mean.append(field_mean)
        variance.append(np.maximum(krige_var, 0.0) + model.nugget)
    return np.asarray(mean), np.asarray(variance)


def scores(truth, mean, variance):
    sd = np.sqrt(variance)
    observed = ~np.isnan(truth)
    truth, mean, variance, sd = truth[observed], mean[observed], variance[observed], sd[observed]
    return {"rmse": metrics.rmse(truth, mean), "crps": metrics.crps_gaussian(truth, mean, variance),
            "coverage": metrics.coverage(truth, mean - Z90 * sd, mean + Z90 * sd)}


def climatology_predict(field, kept, held, train, test):
    """No spatial model: zero residual, with the training variance of the kept stations."""
    spread = float(np.nanvar(field.isel(time=train, station=kept).values))
    shape = (field.isel(time=test).sizes["time"], held.size)
    return np.zeros(shape), np.full(shape, spread)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stations", type=int, default=48)
    parser.add_argument("--no-gstools", action="store_true", help="leave out per-day ordinary kriging")
    parser.add_argument("--smoke", action="store_true", help="one seed, one repeat (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.repeats = 1, 1
    contenders = {"zero residual (no spatial model)": climatology_predict,
                  "adapter, defaults": lambda *a: adapter_predict(*a, {})}
    if not args.no_gstools:
        try:
            import gstools  # noqa: F401

            contenders["GSTools, per-day OK"] = gstools_predict
        except ImportError:
            print("gstools not installed: no per-day kriging (pip install '.[bench]')")
    cpu = {name: [] for name in contenders}
    rows = {name: [] for name in contenders}
    for seed in range(args.seeds):
        field = daily_network(seed, n_stations=args.stations)
        kept, held, train, test = split(field, seed)
        truth = field.isel(time=test, station=held).values
        for name, predict in contenders.items():
            run = repeated(predict, args.repeats, field, kept, held, train, test)
            cpu[name].append(run.cpu)
            rows[name].append(scores(truth, *run.result))
    print(machine_line())
    print(f"daily network: {args.stations} stations (20 % held out), 6 % gaps, 243 training days, "
          f"60 test days, {args.seeds} seeds x {args.repeats} repeats\n")
    reference = float(np.median(cpu["GSTools, per-day OK"])) if "GSTools, per-day OK" in cpu else np.nan
    summary, table = {}, []
    for name in contenders:
        median = float(np.median(cpu[name]))
        summary[name] = {"cpu": median} | {key: float(np.mean([r[key] for r in rows[name]])) for key in rows[name][0]}
        table.append([name, fmt(median), fmt(median / reference, 2), fmt(summary[name]["rmse"]),
                      fmt(summary[name]["crps"]), fmt(summary[name]["coverage"])])
    print(markdown_table(["method", "CPU s", "/ per-day OK", "RMSE", "CRPS", "cov90"], table))
    return summary


if __name__ == "__main__":
    main()
