"""CPU cost of the defaults on the ozone hold-out protocol, against per-month kriging.

The protocol of ``benchmarks/bench_ozone_holdout.py``: 20 % of the cells held out,
the adapter fitted on the other cells over the first 48 months, the held-out cells
kriged from the observed ones in each of the last 24 months. Measured in one run:

* the defaults, ``SpatialAdapter().fit(train)`` then ``.krige(...)``;
* ``rank="auto"`` (and, with ``--tau1-cv``, ``rank="auto", tau1="cv"``);
* per-month ordinary kriging with GSTools (exponential variogram with nugget fitted
  once on the pooled training residuals), the peer.

CPU seconds (``time.process_time``, all threads of the process) are medians over the
seeds and repeats; accuracy (RMSE, CRPS, 90 % coverage) is the mean over seeds. The
per-stage breakdown of the defaults comes from ``cProfile`` (cumulative CPU of the
pipeline's steps; the profiler adds its own overhead, so the stages sum to more than
the unprofiled total).

Run by hand, one heavy measurement at a time::

    python benchmarks/profile_defaults.py [--seeds 5] [--repeats 3] [--auto-seeds 2] [--tau1-cv]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from _common import SETTLE_SECONDS
from xadapter import SpatialAdapter, datasets, metrics
from xadapter.engine.geometry_cache import clear_geometry_cache
from xadapter.engine.geometry import local_projection_km

N_TRAIN = 48
LEVEL = 0.9
Z90 = 1.6448536269514722

#: Pipeline stages reported by the breakdown: (label, module path suffix, function name).
STAGES = (
    ("fit, total", "engine/pipeline.py", "fit"),
    ("  ADMM / basis", "engine/admm.py", "fit_adapter"),
    ("  covariance (spectral rule)", "engine/pipeline.py", "fit_covariance"),
    ("  fine scale (variogram + split)", "engine/pipeline.py", "fit_fine_scale_of"),
    ("    local likelihood split", "engine/finescale.py", "_split_sill_locally"),
    ("  rank/smoothness search", "engine/pipeline.py", "search"),
    ("  site CV (calibration)", "engine/pipeline.py", "calibrate"),
    ("    extension in the site CV", "engine/validation.py", "extend_to_held_out"),
    ("    fine-scale kriging in the site CV", "engine/validation.py", "krige_held_out"),
    ("krige, total", "engine/pipeline.py", "krige"),
    ("  extension to the targets", "engine/extend.py", "extend_basis"),
    ("  fine-scale kriging", "engine/finescale.py", "krige_with_fine_scale"),
)


def split(cells, seed, holdout=0.2):
    """Boolean mask of held-out cells (same draw as the hold-out benchmark)."""
    rng = np.random.default_rng(seed)
    hidden = np.zeros(cells.sizes["cell"], bool)
    hidden[rng.choice(hidden.size, int(round(holdout * hidden.size)), replace=False)] = True
    return hidden


def adapter_run(cells, hidden, settings):
    """Fit on the training cells and months, krige the held-out cells; CPU s and scores."""
    train, test = cells.isel(cell=~hidden), cells.isel(cell=hidden)
    clear_geometry_cache()  # a cold fit, as a user's first: no geometry from earlier runs
    time.sleep(SETTLE_SECONDS)  # BLAS threads of earlier work stop spinning
    start = time.process_time()
    adapter = SpatialAdapter(**settings).fit(train.isel(time=slice(0, N_TRAIN)))
    result = adapter.krige(train.isel(time=slice(N_TRAIN, None)), at=test.isel(time=0, drop=True), level=LEVEL)
    cpu = time.process_time() - start
    truth = test.isel(time=slice(N_TRAIN, None)).transpose("time", "cell").values
    pred = result.transpose("time", "cell")
    return cpu, _scores(truth, pred["mean"].values, pred["variance"].values, pred["lower"].values,
                        pred["upper"].values) | {"rank": adapter.effective_rank}


def gstools_run(cells, hidden):
    """Per-month ordinary kriging with GSTools; CPU s and scores."""
    import gstools as gs

    time.sleep(SETTLE_SECONDS)
    start = time.process_time()
    xy = local_projection_km(cells.lat.values, cells.lon.values)
    keep = ~hidden
    values = cells.transpose("time", "cell").values
    train = values[:N_TRAIN][:, keep]
    pos = (xy[keep, 0], xy[keep, 1])
    bins = np.linspace(0, 2500, 26)
    gammas = []
    for month in train:
        centre, gamma = gs.vario_estimate(pos, month - month.mean(), bins)
        gammas.append(gamma)
    model = gs.Exponential(dim=2)
    model.fit_variogram(centre, np.mean(gammas, axis=0), nugget=True)
    mean, var = [], []
    target = (xy[hidden, 0], xy[hidden, 1])
    for month in values[N_TRAIN:]:
        field, krige_var = gs.krige.Ordinary(model, cond_pos=pos, cond_val=month[keep])(target, return_var=True)
        mean.append(field)
        var.append(np.maximum(krige_var, 0) + model.nugget)
    cpu = time.process_time() - start
    truth = values[N_TRAIN:][:, hidden]
    mean, var = np.asarray(mean), np.asarray(var)
    sd = np.sqrt(var)
    return cpu, _scores(truth, mean, var, mean - Z90 * sd, mean + Z90 * sd)


def _scores(truth, mean, variance, lower, upper):
    return {"rmse": metrics.rmse(truth, mean), "crps": metrics.crps_gaussian(truth, mean, variance),
            "cover": metrics.coverage(truth, lower, upper)}


def measure(run, seeds, repeats):
    """Median CPU over seeds x repeats and mean scores over seeds."""
    cpus, rows = [], []
    for seed in seeds:
        for repeat in range(repeats):
            cpu, row = run(seed)
            cpus.append(cpu)
        rows.append(row)
    return float(np.median(cpus)), {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def stage_breakdown(cells, hidden, settings):
    """Cumulative CPU s of the pipeline stages in one profiled run."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    adapter_run(cells, hidden, settings)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    out = []
    for label, path, name in STAGES:
        total = sum(entry[3] for (file, _, function), entry in stats.items()
                    if file.replace("\\", "/").endswith(path) and function == name)
        out.append((label, total))
    return out, pstats.Stats(profiler)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--auto-seeds", type=int, default=2, help="seeds for rank='auto' (slower)")
    parser.add_argument("--tau1-cv", action="store_true", help="also time rank='auto', tau1='cv'")
    parser.add_argument("--top", type=int, default=0, help="print the N most expensive functions")
    args = parser.parse_args()
    cells = datasets.grid_to_cells(datasets.ozone_residuals(n_train=N_TRAIN)["residual"])
    seeds = range(args.seeds)
    masks = {seed: split(cells, seed) for seed in seeds}

    rows = {}
    rows["defaults"] = measure(lambda s: adapter_run(cells, masks[s], {}), seeds, args.repeats)
    auto_seeds = list(seeds)[:args.auto_seeds]
    rows["rank='auto'"] = measure(lambda s: adapter_run(cells, masks[s], {"rank": "auto"}), auto_seeds, 1)
    if args.tau1_cv:
        rows["rank='auto', tau1='cv'"] = measure(
            lambda s: adapter_run(cells, masks[s], {"rank": "auto", "tau1": "cv"}), auto_seeds[:1], 1)
    rows["GSTools, per-month OK"] = measure(lambda s: gstools_run(cells, masks[s]), seeds, 1)

    peer = rows["GSTools, per-month OK"][0]
    ours = rows["defaults"][0]
    print(f"ozone hold-out, {args.seeds} seeds: median CPU s (process_time), mean scores")
    header = f"{'method':<26}{'CPU s':>8}{'/ GSTools':>10}{'/ defaults':>11}{'RMSE':>7}{'CRPS':>7}{'cov90':>7}"
    print(header)
    print("-" * len(header))
    for name, (cpu, score) in rows.items():
        print(f"{name:<26}{cpu:>8.3f}{cpu / peer:>10.3f}{cpu / ours:>11.2f}{score['rmse']:>7.3f}"
              f"{score['crps']:>7.3f}{score['cover']:>7.3f}")
    print(f"\nGSTools / defaults: {peer / ours:.1f}x less CPU for the defaults")

    breakdown, stats = stage_breakdown(cells, masks[0], {})
    print("\nper-stage CPU s of the defaults (cProfile, cumulative, seed 0):")
    for label, seconds in breakdown:
        print(f"  {label:<40}{seconds:>8.3f}")
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
